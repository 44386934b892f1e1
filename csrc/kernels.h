// Entry points of the two backends. Layouts are defined in stats.h.
#pragma once

#include <cstdint>

namespace torchvitals {

// Buffers shared by both backends. All pointers address memory of the backend's device.
struct StatsBuffers {
  const int64_t* desc;       // [T, kDescCols]
  const double* saturation;  // [T]; NaN disables the saturation test for that tensor
  int64_t num_tensors;
  int64_t num_chunks;      // total work chunks, desc[T-1].chunk_begin + chunks of the last tensor
  uint8_t* unit_positive;  // [total units], zero on entry: 1 once a unit saw an element > 0
  uint8_t* unit_unsaturated;  // [total units], zero on entry: 1 once a unit saw !(|x| >=
                              // threshold), which NaN values and a NaN threshold satisfy
  double* moments;            // [T, kMomentCols] out
  int64_t* counts;            // [T, kCountCols] out; zero on entry for CUDA
  int64_t* hist;              // [T, kHistRows, kHistBins] out; zero on entry for CUDA
  double* partials;           // CUDA only: [num_chunks, kMomentCols] scratch
};

// Multi-threaded CPU reduction; deterministic for any num_threads and either CPU kernel.
void tensor_stats_cpu(const StatsBuffers& buf, int num_threads);

// The CPU kernel in use: "avx2", or "baseline" (any CPU; forced by TORCHVITALS_CPU_ISA=baseline).
const char* cpu_isa();

// Enqueues the reduction on `stream` (a cudaStream_t passed as an integer) and returns
// at once: no host sync, no allocation. Defined only when built with CUDA.
void tensor_stats_cuda(const StatsBuffers& buf, intptr_t stream);

}  // namespace torchvitals
