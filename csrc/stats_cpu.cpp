// CPU backend driver: splits the tensors into chunks, spreads them over torch's OpenMP
// threads, and combines the chunk results in chunk order, so results do not depend on the
// thread count. The per-chunk kernel (stats_cpu_chunk.h) exists once per instruction set;
// the one this CPU runs best is picked here, once.
#include "stats_cpu.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace torchvitals {
namespace {

struct ChunkKernel {
  const char* isa;
  void (*reduce)(const StatsBuffers&, const Chunk&, ChunkResult&, ChunkResult*);
};

ChunkKernel pick_chunk_kernel() {
#if defined(TORCHVITALS_WITH_AVX2)
  const char* forced = std::getenv("TORCHVITALS_CPU_ISA");
  const bool baseline = forced != nullptr && std::strcmp(forced, "baseline") == 0;
  __builtin_cpu_init();  // we may run before the constructor that would call it
  if (!baseline && __builtin_cpu_supports("avx2")) return {"avx2", cpu_avx2::reduce_chunk};
#endif
  return {"baseline", cpu_baseline::reduce_chunk};
}

const ChunkKernel g_chunk_kernel = pick_chunk_kernel();

int64_t count_zero_flags(const uint8_t* flags, int64_t n) {
  int64_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) zeros += flags[i] == 0;
  return zeros;
}

// The process that loaded the engine. A fork()ed child inherits OpenMP's state but not
// its threads, and a parallel region there would wait forever: children run serially.
const pid_t g_loaded_by = getpid();

// Whether this thread flushes subnormals to zero (torch.set_flush_denormal(True)): then
// torch.relu turns positive subnormals into zeros, which a row derived from its input would
// not, so every rectified row is read instead.
bool flushes_subnormals() {
#if defined(__x86_64__) || defined(_M_X64)
  return (_mm_getcsr() & 0x8040) != 0;  // FTZ (bit 15) or DAZ (bit 6)
#elif defined(__aarch64__)
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  return (fpcr >> 24) & 1;  // FZ
#else
  return false;
#endif
}

// A rectified row's histogram from its source's: max(x, 0) turns every negative element
// (-Inf included) into a zero and keeps the rest (NaN stays NaN).
void rectify_hist(const int64_t* source, int64_t* out) {
  const int64_t* all = source + kHistAll * kHistBins;
  const int64_t* negative = source + kHistNegative * kHistBins;
  int64_t negatives = 0;
  for (int b = 0; b < kHistBins; ++b) {
    out[kHistAll * kHistBins + b] = all[b] - negative[b];
    out[kHistNegative * kHistBins + b] = 0;
    negatives += negative[b];
  }
  out[kHistAll * kHistBins + kHistZero] += negatives;
}

}  // namespace

const char* cpu_isa() { return g_chunk_kernel.isa; }

void tensor_stats_cpu(const StatsBuffers& buf, int num_threads) {
  const int64_t T = buf.num_tensors;
  auto desc = [&](int64_t t) { return buf.desc + t * kDescCols; };
  const bool derive = !flushes_subnormals();
  auto source_of = [&](int64_t t) { return derive ? desc(t)[kDescRectifiedOf] : int64_t{-1}; };
  // The row each tensor's pass also fills with the statistics of max(x, 0), or -1.
  std::vector<int64_t> rectified_by(static_cast<size_t>(T), -1);
  bool any_rectified = false;
  for (int64_t t = 0; t < T; ++t) {
    if (source_of(t) < 0) continue;
    rectified_by[source_of(t)] = t;
    any_rectified = true;
  }
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(buf.num_chunks));
  std::vector<size_t> first_chunk(static_cast<size_t>(T) + 1);
  for (int64_t t = 0; t < T; ++t) {
    first_chunk[t] = chunks.size();
    if (source_of(t) >= 0) continue;  // never read: its source's pass fills it
    const int64_t n = desc(t)[kDescNumel];
    for (int64_t b = 0; b < n; b += kChunkElems)
      chunks.push_back({t, b, std::min(n, b + kChunkElems), rectified_by[t]});
  }
  first_chunk[T] = chunks.size();
  std::vector<ChunkResult> results(chunks.size());
  // The rectified rows' results, by the chunk of the source they come from.
  std::vector<ChunkResult> rectified(any_rectified ? chunks.size() : 0);

  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next.fetch_add(1); i < chunks.size(); i = next.fetch_add(1))
      g_chunk_kernel.reduce(buf, chunks[i], results[i],
                            chunks[i].rectified >= 0 ? &rectified[i] : nullptr);
  };
  // OpenMP is torch's own CPU thread pool (one libgomp per process): its threads, already
  // awake after the training step's last op, take the chunks with no start-up and without
  // competing for the cores. Chunks are few per thread only when that is worth a region.
  int threads =
      static_cast<int>(std::clamp<size_t>(chunks.size() / 2, 1, std::max(num_threads, 1)));
  if (getpid() != g_loaded_by) threads = 1;
  if (threads == 1) {
    work();
  } else {
#pragma omp parallel num_threads(threads)
    work();
  }

  // Rows read by a pass first, then the rectified rows, which need their source's totals.
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* d = desc(t);
      const int64_t source = source_of(t);
      if ((source >= 0) != (pass == 1)) continue;
      double* m = buf.moments + t * kMomentCols;
      int64_t* cnt = buf.counts + t * kCountCols;
      int64_t* h = buf.hist + t * kHistRows * kHistBins;
      m[kSum] = m[kSumSq] = m[kMaxAbs] = 0.0;
      std::fill(h, h + kHistRows * kHistBins, 0);
      int64_t nan = 0, saturated = 0;
      const int64_t read = source >= 0 ? source : t;
      for (size_t ci = first_chunk[read]; ci < first_chunk[read + 1]; ++ci) {
        const ChunkResult& r = source >= 0 ? rectified[ci] : results[ci];
        m[kSum] += r.sum;
        m[kSumSq] += r.sumsq;
        m[kMaxAbs] = std::max(m[kMaxAbs], r.max_abs);
        nan += r.nan;
        saturated += r.saturated;
        for (int row = 0; row < kHistRows; ++row)
          for (int b = 0; b < kHistBins; ++b) h[row * kHistBins + b] += r.hist[row][b];
      }
      if (source >= 0) {
        rectify_hist(buf.hist + source * kHistRows * kHistBins, h);
        nan = buf.counts[source * kCountCols + kNan];
      }
      const int64_t units = d[kDescUnits];
      const int64_t off = d[kDescFlagOffset];
      const int64_t never_positive = count_zero_flags(buf.unit_positive + off, units);
      const int64_t never_unsaturated = count_zero_flags(buf.unit_unsaturated + off, units);
      finalize_counts(d[kDescNumel], units, buf.saturation[t], h, nan, saturated, never_positive,
                      never_unsaturated, cnt);
    }
  }
}

}  // namespace torchvitals
