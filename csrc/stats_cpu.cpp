// CPU backend: one pass per element, chunks spread over threads, partial results
// combined in chunk order so the float64 sums do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "stats.h"

namespace torchvitals {
namespace {

struct ChunkResult {
  double sum = 0.0;
  double sumsq = 0.0;
  double max_abs = 0.0;
  int64_t nan = 0;
  int64_t inf = 0;
  int64_t saturated = 0;
  int64_t hist[kHistBins] = {};
};

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Histogram bin of every biased fp64 exponent; zero and subnormal share exponent 0
// and are told apart by the mantissa. The table keeps the loop free of branches that
// random data would mispredict.
template <int kExpBits, int kBias>
struct ExponentBins {
  uint8_t bin[1 << kExpBits];
  ExponentBins() {
    bin[0] = kHistZero;
    for (int e = 1; e < (1 << kExpBits) - 1; ++e) bin[e] = hist_bin_for_exponent(e - kBias);
    bin[(1 << kExpBits) - 1] = kHistNonFinite;
  }
};
const ExponentBins<11, 1023> kF64Bins;

// The hot loops are compiled twice, for AVX2 and for baseline x86-64, and picked at
// load time, so one wheel runs everywhere and uses the wide vectors where they exist.
#if defined(__x86_64__)
#define kVectorClones __attribute__((target_clones("avx2", "default")))
#else
#define kVectorClones
#endif

// Element i widened to the accumulation type (fp16/bf16 widen to fp32 exactly).
template <typename T>
struct Loader;

template <>
struct Loader<float> {
  using Acc = float;
  static float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};

template <>
struct Loader<double> {
  using Acc = double;
  static double load(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
};

struct Half {};
struct BFloat16 {};

template <>
struct Loader<Half> {
  using Acc = float;
  static float load(const void* p, int64_t i) {
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
};

template <>
struct Loader<BFloat16> {
  using Acc = float;
  static float load(const void* p, int64_t i) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
};

inline int bin_of(double v) {
  const uint64_t bits = f64_bits(v);
  const uint64_t e = (bits >> 52) & 0x7ffu;
  return kF64Bins.bin[e] + ((e == 0) & ((bits & 0xfffffffffffffull) != 0));
}

// Histogram keys. The hot loop counts one byte-sized key per element and the keys are
// folded into bins once per chunk: for fp32 the key is the biased exponent (one shift,
// which vectorises), for fp64 the bin itself from the exponent table.
struct F32Keys {
  static uint8_t key(float v) { return static_cast<uint8_t>(f32_bits(v) >> 23); }
  // Exponent 0 holds zeros and subnormals; `zeros` tells them apart.
  static void fold(const uint32_t* counts, int64_t zeros, int64_t* hist) {
    hist[kHistZero] += zeros;
    hist[kHistBelow] += counts[0] - zeros;
    for (int e = 1; e < 0xff; ++e) hist[hist_bin_for_exponent(e - 127)] += counts[e];
    hist[kHistNonFinite] += counts[0xff];
  }
};

struct F64Keys {
  static uint8_t key(double v) { return static_cast<uint8_t>(bin_of(v)); }
  static void fold(const uint32_t* counts, int64_t /*zeros*/, int64_t* hist) {
    for (int k = 0; k < kHistBins; ++k) hist[k] += counts[k];
  }
};

// The moments run over independent lanes so the compiler can vectorise them without
// reassociating float adds; histogram keys are counted in a separate scalar pass over
// the same cache-hot block, spread over several tables to break repeated-key store chains.
template <typename T>
kVectorClones void reduce_chunk(const void* data, int64_t begin, int64_t end, double threshold,
                                ChunkResult& r) {
  using L = Loader<T>;
  using Acc = typename L::Acc;
  using Keys = std::conditional_t<std::is_same_v<Acc, float>, F32Keys, F64Keys>;
  constexpr int kLanes = 8;
  constexpr int kBlock = 512;
  constexpr int kCopies = 4;
  uint32_t counts[kCopies][256] = {};
  // Every lane is double, counts included (exact below 2^53), so that the lanes have
  // one width and vectorise as a whole.
  double sum[kLanes] = {}, sumsq[kLanes] = {}, max_abs[kLanes] = {};
  double saturated[kLanes] = {}, nan[kLanes] = {}, zeros[kLanes] = {};
  Acc block[kBlock];
  uint8_t keys[kBlock];

  auto visit = [&](int j, Acc x) {
    const double v = static_cast<double>(x);
    const double a = std::fabs(v);
    const bool finite = a <= std::numeric_limits<double>::max();
    const double f = finite ? v : 0.0;
    sum[j] += f;
    sumsq[j] += f * f;
    max_abs[j] = std::max(max_abs[j], finite ? a : 0.0);
    nan[j] += v != v ? 1.0 : 0.0;
    zeros[j] += a == 0 ? 1.0 : 0.0;
    saturated[j] += a >= threshold ? 1.0 : 0.0;  // false for NaN values and a NaN threshold
  };
  for (int64_t b = begin; b < end; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b));
    for (int i = 0; i < n; ++i) block[i] = L::load(data, b + i);
    const int whole = n - n % kLanes;
    for (int i = 0; i < whole; i += kLanes)
      for (int j = 0; j < kLanes; ++j) visit(j, block[i + j]);
    for (int i = whole; i < n; ++i) visit(i - whole, block[i]);
    for (int i = 0; i < n; ++i) keys[i] = Keys::key(block[i]);
    int i = 0;
    for (; i + kCopies <= n; i += kCopies)
      for (int c = 0; c < kCopies; ++c) ++counts[c][keys[i + c]];
    for (; i < n; ++i) ++counts[0][keys[i]];
  }

  int64_t total_zeros = 0;
  for (int j = 0; j < kLanes; ++j) {
    r.sum += sum[j];
    r.sumsq += sumsq[j];
    r.max_abs = std::max(r.max_abs, max_abs[j]);
    r.saturated += static_cast<int64_t>(saturated[j]);
    r.nan += static_cast<int64_t>(nan[j]);
    total_zeros += static_cast<int64_t>(zeros[j]);
  }
  for (int c = 1; c < kCopies; ++c)
    for (int k = 0; k < 256; ++k) counts[0][k] += counts[c][k];
  Keys::fold(counts[0], total_zeros, r.hist);
  r.inf = r.hist[kHistNonFinite] - r.nan;
}

// Marks which units saw a positive element and which saw an unsaturated one. Shared flags
// are only ever set to 1, with relaxed atomic stores, so concurrent chunks cannot undo each
// other; the hot loops OR into thread-local flags or scalars, which vectorises.
inline void set_flag(uint8_t* flag) {
  if (!__atomic_load_n(flag, __ATOMIC_RELAXED))
    __atomic_store_n(flag, uint8_t{1}, __ATOMIC_RELAXED);
}

template <typename T>
kVectorClones void mark_units(const void* data, int64_t begin, int64_t end, int64_t inner,
                              int64_t units, double threshold, uint8_t* positive,
                              uint8_t* unsaturated) {
  using L = Loader<T>;
  auto is_positive = [](double v) -> uint8_t { return v > 0; };
  auto is_unsaturated = [threshold](double v) -> uint8_t { return !(std::fabs(v) >= threshold); };
  const int64_t first_unit = (begin / inner) % units;
  if (inner == 1) {  // [..., F]: consecutive elements are consecutive units
    thread_local std::vector<uint8_t> pos_slots, unsat_slots;
    const int64_t n = end - begin;
    const int64_t slots = std::min(n, units);  // slot k is unit first_unit + k (mod units)
    pos_slots.assign(static_cast<size_t>(slots), 0);
    unsat_slots.assign(static_cast<size_t>(slots), 0);
    // Raw restrict pointers: byte stores through the vectors could alias anything,
    // which would reload their data pointers on every element.
    uint8_t* __restrict pos = pos_slots.data();
    uint8_t* __restrict unsat = unsat_slots.data();
    for (int64_t i = begin; i < end; i += slots) {
      const int64_t m = std::min(slots, end - i);
      for (int64_t k = 0; k < m; ++k) {
        const double v = static_cast<double>(L::load(data, i + k));
        pos[k] |= is_positive(v);
        unsat[k] |= is_unsaturated(v);
      }
    }
    for (int64_t k = 0; k < slots; ++k) {
      int64_t u = first_unit + k;
      if (u >= units) u -= units;
      if (pos[k]) set_flag(positive + u);
      if (unsat[k]) set_flag(unsaturated + u);
    }
    return;
  }
  // Channel-first: runs of `inner` elements share a unit; reduce each run, then set once.
  int64_t unit = first_unit;
  for (int64_t i = begin, run = inner - begin % inner; i < end; run = inner) {
    const int64_t m = std::min(run, end - i);
    uint8_t pos = 0, unsat = 0;
    for (int64_t k = 0; k < m; ++k) {
      const double v = static_cast<double>(L::load(data, i + k));
      pos |= is_positive(v);
      unsat |= is_unsaturated(v);
    }
    if (pos) set_flag(positive + unit);
    if (unsat) set_flag(unsaturated + unit);
    i += m;
    unit = unit + 1 == units ? 0 : unit + 1;
  }
}

template <typename T>
void process_chunk(const int64_t* d, double threshold, const Chunk& c, uint8_t* positive,
                   uint8_t* unsaturated, ChunkResult& r) {
  const void* data = reinterpret_cast<const void*>(d[kDescData]);
  reduce_chunk<T>(data, c.begin, c.end, threshold, r);
  const int64_t units = d[kDescUnits];
  if (units > 0) {
    const int64_t off = d[kDescFlagOffset];
    mark_units<T>(data, c.begin, c.end, d[kDescInner], units, threshold, positive + off,
                  unsaturated + off);
  }
}

void dispatch_chunk(const StatsBuffers& buf, const Chunk& c, ChunkResult& r) {
  const int64_t* d = buf.desc + c.tensor * kDescCols;
  const double threshold = buf.saturation[c.tensor];
  switch (d[kDescDType]) {
    case kFloat32:
      return process_chunk<float>(d, threshold, c, buf.unit_positive, buf.unit_unsaturated, r);
    case kFloat16:
      return process_chunk<Half>(d, threshold, c, buf.unit_positive, buf.unit_unsaturated, r);
    case kBFloat16:
      return process_chunk<BFloat16>(d, threshold, c, buf.unit_positive, buf.unit_unsaturated, r);
    case kFloat64:
      return process_chunk<double>(d, threshold, c, buf.unit_positive, buf.unit_unsaturated, r);
  }
}

int64_t count_zero_flags(const uint8_t* flags, int64_t n) {
  int64_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) zeros += flags[i] == 0;
  return zeros;
}

}  // namespace

void tensor_stats_cpu(const StatsBuffers& buf, int num_threads) {
  const int64_t T = buf.num_tensors;
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(buf.num_chunks));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = buf.desc[t * kDescCols + kDescNumel];
    for (int64_t b = 0; b < n; b += kChunkElems)
      chunks.push_back({t, b, std::min(n, b + kChunkElems)});
  }
  std::vector<ChunkResult> results(chunks.size());

  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next.fetch_add(1); i < chunks.size(); i = next.fetch_add(1))
      dispatch_chunk(buf, chunks[i], results[i]);
  };
  // A thread costs tens of microseconds to start: only spread work worth that.
  const size_t threads = std::clamp<size_t>(chunks.size() / 4, 1, std::max(num_threads, 1));
  std::vector<std::thread> pool;
  for (size_t i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();

  size_t ci = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t* d = buf.desc + t * kDescCols;
    double* m = buf.moments + t * kMomentCols;
    int64_t* cnt = buf.counts + t * kCountCols;
    int64_t* h = buf.hist + t * kHistBins;
    m[kSum] = m[kSumSq] = m[kMaxAbs] = 0.0;
    std::fill(cnt, cnt + kCountCols, 0);
    std::fill(h, h + kHistBins, 0);
    for (; ci < chunks.size() && chunks[ci].tensor == t; ++ci) {
      const ChunkResult& r = results[ci];
      m[kSum] += r.sum;
      m[kSumSq] += r.sumsq;
      m[kMaxAbs] = std::max(m[kMaxAbs], r.max_abs);
      cnt[kNan] += r.nan;
      cnt[kInf] += r.inf;
      cnt[kSaturated] += r.saturated;
      for (int b = 0; b < kHistBins; ++b) h[b] += r.hist[b];
    }
    cnt[kNumel] = d[kDescNumel];
    cnt[kZeros] = h[kHistZero];
    const int64_t units = d[kDescUnits];
    cnt[kUnits] = units;
    if (units > 0) {
      const int64_t off = d[kDescFlagOffset];
      cnt[kDeadUnits] = count_zero_flags(buf.unit_positive + off, units);
      const bool thresholded = !std::isnan(buf.saturation[t]) && d[kDescNumel] > 0;
      cnt[kSaturatedUnits] = thresholded ? count_zero_flags(buf.unit_unsaturated + off, units) : 0;
    }
  }
}

}  // namespace torchvitals
