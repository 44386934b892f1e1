// The chunk kernel for x86-64 CPUs with AVX2, built with -mavx2 (see CMakeLists.txt).
#define TV_CPU_ISA cpu_avx2
#include "stats_cpu_chunk.h"
