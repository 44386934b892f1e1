// What the CPU driver (stats_cpu.cpp) and the per-instruction-set chunk kernels
// (stats_cpu_chunk.h, compiled once per target) share.
#pragma once

#include <cstdint>

#include "kernels.h"
#include "stats.h"

namespace torchvitals {

// Elements [begin, end) of tensor `tensor`, at most kChunkElems of them; `rectified` is -1
// or the row whose statistics (those of max(x, 0)) the same pass also takes.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t rectified;
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

// Reduces one chunk into r (and the sums and maximum of max(x, 0) into *rectified when the
// chunk names a rectified row) and sets its units' flags (the rectified row's units, when
// it has one). The same source compiled for two targets; both give bit-identical results
// (same lanes, same order, no FMA).
namespace cpu_baseline {
void reduce_chunk(const StatsBuffers& buf, const Chunk& c, ChunkResult& r, ChunkResult* rectified);
}
#if defined(TORCHVITALS_WITH_AVX2)
namespace cpu_avx2 {
void reduce_chunk(const StatsBuffers& buf, const Chunk& c, ChunkResult& r, ChunkResult* rectified);
}
#endif

}  // namespace torchvitals
