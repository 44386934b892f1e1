// The chunk kernel for any CPU GCC or Clang targets (SSE2 on x86-64): 32-byte vectors are
// emulated with two 16-byte ones.
#define TV_CPU_ISA cpu_baseline
#include "stats_cpu_chunk.h"
