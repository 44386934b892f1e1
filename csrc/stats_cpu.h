// What the CPU driver (stats_cpu.cpp) and the per-instruction-set chunk kernels
// (stats_cpu_chunk.h, compiled once per target) share.
#pragma once

#include <cstdint>

#include "kernels.h"
#include "stats.h"

namespace torchvitals {

// Elements [begin, end) of tensor `tensor`, at most kChunkElems of them.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Result of one chunk, combined with the others in chunk order.
struct ChunkResult {
  double sum = 0.0;
  double sumsq = 0.0;
  double max_abs = 0.0;
  int64_t nan = 0;
  int64_t saturated = 0;
  int64_t hist[kHistRows][kHistBins] = {};  // every element, then the negative ones
};

// Reduces one chunk and sets its units' flags. The same source compiled for two targets;
// both give bit-identical results (same lanes, same order, no FMA).
namespace cpu_baseline {
void reduce_chunk(const StatsBuffers& buf, const Chunk& c, ChunkResult& r);
}
#if defined(TORCHVITALS_WITH_AVX2)
namespace cpu_avx2 {
void reduce_chunk(const StatsBuffers& buf, const Chunk& c, ChunkResult& r);
}
#endif

}  // namespace torchvitals
