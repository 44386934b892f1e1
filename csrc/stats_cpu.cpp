// CPU backend. A chunk (kChunkElems elements of one tensor) is read twice while it sits in
// L2: a vector pass for the moments, counts and unit flags, then a vector histogram pass.
// The histogram pass counts the chunk's top 16 octaves (below its largest finite |x|) in
// byte counters, one per lane and octave, with no scatter; only the rare elements outside
// that window (tiny, subnormal, non-finite) take a scalar path. Chunks are spread over
// torch's OpenMP threads and combined in chunk order, so results do not depend on the
// thread count.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "stats.h"

namespace torchvitals {
namespace {

// The hot loops are compiled twice, for AVX2 and for baseline x86-64, and picked at load
// time, so one wheel runs everywhere and uses the wide vectors where they exist.
#if defined(__x86_64__)
#define TV_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TV_VECTOR_CLONES
#endif
// Vector helpers are inlined into the clones, so each is compiled for its caller's target
// (and never passes a 32-byte vector across a call, which GCC warns about with -Wpsabi).
#define TV_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

// One 32-byte vector of T, its bit patterns, and T's exponent field (the histogram key).
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  using Bits = uint32_t;
  static constexpr int kWidth = 8;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kKeyMask = 0xff;  // exponent field; kKeyMask itself: Inf/NaN
  static constexpr Bits kAbsMask = 0x7fffffffu;
  static constexpr Bits kInfBits = 0x7f800000u;
};

template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  typedef uint64_t U __attribute__((vector_size(32)));
  using Bits = uint64_t;
  static constexpr int kWidth = 4;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kKeyMask = 0x7ff;
  static constexpr Bits kAbsMask = 0x7fffffffffffffffull;
  static constexpr Bits kInfBits = 0x7ff0000000000000ull;
};

typedef double F64x4 __attribute__((vector_size(32)));

// Octaves counted by the vector histogram pass, below the chunk's top exponent.
constexpr int kWindow = 16;

// Float64 running sums of finite elements: fp32 lanes are widened, four at a time.
struct Moments {
  F64x4 sum[2] = {};
  F64x4 sumsq[2] = {};
  TV_INLINE void add(Lanes<float>::V x) {
    // Element-wise: GCC 12 turns this into one vcvtps2pd each, __builtin_convertvector into four.
    const F64x4 lo = {x[0], x[1], x[2], x[3]};
    const F64x4 hi = {x[4], x[5], x[6], x[7]};
    sum[0] += lo;
    sum[1] += hi;
    sumsq[0] += lo * lo;
    sumsq[1] += hi * hi;
  }
  TV_INLINE void add(Lanes<double>::V x) {
    sum[0] += x;
    sumsq[0] += x * x;
  }
};

// Running state of pass 1 over one chunk, in lanes combined once at the chunk's end.
template <typename T>
struct ChunkScan {
  using V = typename Lanes<T>::V;
  using I = typename Lanes<T>::I;
  Moments moments;
  V max_abs = {};
  I zeros = {};
  I saturated = {};
};

template <typename Vec>
TV_INLINE auto horizontal_max(Vec v) {
  auto m = v[0];
  for (size_t i = 1; i < sizeof(Vec) / sizeof(m); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <typename Vec>
TV_INLINE int64_t horizontal_sum(Vec v) {
  int64_t s = 0;
  for (size_t i = 0; i < sizeof(Vec) / sizeof(v[0]); ++i) s += v[i];
  return s;
}

TV_INLINE double horizontal_sum_f64(F64x4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

template <typename Vec>
TV_INLINE Vec load(const void* p, int64_t available) {
  Vec v = {};
  const int64_t lanes = sizeof(Vec) / sizeof(v[0]);
  if (__builtin_expect(available >= lanes, 1)) {
    std::memcpy(&v, p, sizeof(v));
  } else {  // a short tail is zero-padded
    std::memcpy(&v, p, sizeof(v[0]) * static_cast<size_t>(available));
  }
  return v;
}

// Whether a run of elements holds one > 0, and whether one is not saturated.
struct RunFlags {
  bool positive;
  bool unsaturated;
};

// Pass 1 over x[0, n): moments, zeros, saturated and the largest finite |x| into `s`.
template <typename T>
TV_INLINE RunFlags scan_run(const T* x, int64_t n, T threshold, ChunkScan<T>& s) {
  using L = Lanes<T>;
  using V = typename L::V;
  using I = typename L::I;
  constexpr int64_t W = L::kWidth;
  V positive_max = V{} - std::numeric_limits<T>::infinity();
  I saturated = {};
  for (int64_t i = 0; i < n; i += W) {
    const V v = load<V>(x + i, n - i);
    const I bits = (I)v;
    const I abs_bits = bits & static_cast<typename L::Bits>(L::kAbsMask);
    const I finite = abs_bits < static_cast<typename L::Bits>(L::kInfBits);
    const V finite_x = (V)(bits & finite);
    const V finite_abs = (V)(abs_bits & finite);
    s.moments.add(finite_x);
    s.max_abs = finite_abs > s.max_abs ? finite_abs : s.max_abs;
    s.zeros -= abs_bits == 0;
    saturated -= (V)abs_bits >= threshold;  // false for NaN elements and a NaN threshold
    positive_max = v > positive_max ? v : positive_max;  // NaN never wins
  }
  const int64_t pad = (W - n % W) % W;  // padding lanes are zeros: take them back
  s.zeros[0] -= pad;
  if (T{0} >= threshold) saturated[0] -= pad;
  s.saturated += saturated;
  return {horizontal_max(positive_max) > T{0}, horizontal_sum(saturated) < n};
}

// Shared unit flags are only ever set to 1, with relaxed atomic stores, so chunks of one
// tensor on different threads cannot undo each other.
inline void set_flag(uint8_t* flag) {
  if (!__atomic_load_n(flag, __ATOMIC_RELAXED))
    __atomic_store_n(flag, uint8_t{1}, __ATOMIC_RELAXED);
}

// How a chunk's elements fall into units: consecutive runs of `length` elements (the
// first one possibly cut by the chunk's start) belong to consecutive units.
struct UnitRuns {
  int64_t first_length;
  int64_t length;
  int64_t first_unit;
  int64_t units;  // 0: no units, one run over the whole chunk
  uint8_t* positive;
  uint8_t* unsaturated;
};

// Calls visit(begin, length, unit) for each run of a chunk of n elements, in order.
template <typename Visit>
TV_INLINE void for_each_run(int64_t n, const UnitRuns& runs, Visit visit) {
  int64_t unit = runs.first_unit;
  for (int64_t i = 0, m = runs.first_length; i < n; i += m, m = runs.length) {
    m = std::min(m, n - i);
    visit(i, m, unit);
    if (runs.units) unit = unit + 1 == runs.units ? 0 : unit + 1;
  }
}

// Pass 1 over a chunk, run by run, flagging each run's unit.
template <typename T>
TV_VECTOR_CLONES void scan_chunk(const T* x, int64_t n, T threshold, const UnitRuns& runs,
                                 ChunkScan<T>& state) {
  ChunkScan<T> s = state;  // in registers for the loop, not behind the reference
  for_each_run(n, runs, [&](int64_t i, int64_t m, int64_t unit) {
    const RunFlags f = scan_run(x + i, m, threshold, s);
    if (runs.units == 0) return;
    if (f.positive) set_flag(runs.positive + unit);
    if (f.unsaturated) set_flag(runs.unsaturated + unit);
  });
  state = s;
}

// Pass 2 over x[0, n): counts elements by key (exponent field) into key_counts. Keys in
// the kWindow octaves at and below `top` are counted in byte lanes, the only scatter-free
// way to histogram with vectors; zeros are skipped (pass 1 counts them) and the rare
// others (tiny, subnormal, non-finite) are counted one by one, NaNs also into `nan`.
template <typename T>
TV_VECTOR_CLONES void count_keys(const T* x, int64_t n, typename Lanes<T>::Bits top,
                                 uint32_t* key_counts, int64_t& nan) {
  using L = Lanes<T>;
  using U = typename L::U;
  using Bits = typename L::Bits;
  constexpr int64_t W = L::kWidth;
  constexpr int kSlots = sizeof(Bits);     // byte counters per lane
  constexpr int kAccs = kWindow / kSlots;  // lanes of byte counters covering the window
  constexpr int kSlotBits = kSlots == 4 ? 2 : 3;
  constexpr int kFlushEvery = 255;   // vectors before a byte counter can overflow
  constexpr int64_t kGroup = 8 * W;  // elements per check for keys outside the window
  // Flushed bytes go to 16-bit fields (even and odd bytes apart): one count per vector.
  static_assert(kChunkElems / W < (1 << 16), "16-bit fields would overflow");
  const Bits low_bytes = static_cast<Bits>(0x00ff00ff00ff00ffull);
  U acc[kAccs] = {}, even[kAccs] = {}, odd[kAccs] = {};
  auto flush = [&] {
    for (int j = 0; j < kAccs; ++j) {
      even[j] += acc[j] & low_bytes;
      odd[j] += (acc[j] >> 8) & low_bytes;
      acc[j] = U{};
    }
  };
  auto count_outside = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Bits bits;
      std::memcpy(&bits, x + i, sizeof(bits));
      const Bits key = (bits >> L::kMantissaBits) & L::kKeyMask;
      if (static_cast<Bits>(top - key) < kWindow || (bits & L::kAbsMask) == 0) continue;
      ++key_counts[key];
      nan += x[i] != x[i];
    }
  };
  int vectors = 0;
  for (int64_t group = 0; group < n; group += kGroup) {
    const int64_t group_end = std::min(n, group + kGroup);
    U outside = {};
    for (int64_t i = group; i < group_end; i += W) {
      const U bits = load<U>(x + i, group_end - i);
      const U key = (bits >> L::kMantissaBits) & L::kKeyMask;
      const U below = top - key;  // octaves below the top; wraps around above it
      outside |= (U)(below >= kWindow) & (U)((bits & L::kAbsMask) != 0);
      const U one = (U{} + 1) << ((below & (kSlots - 1)) * 8);
      const U acc_index = below >> kSlotBits;
      for (int j = 0; j < kAccs; ++j) acc[j] += one & (U)(acc_index == static_cast<Bits>(j));
      if (++vectors == kFlushEvery) {
        flush();
        vectors = 0;
      }
    }
    if (horizontal_max(outside) != 0) count_outside(group, group_end);
  }
  flush();
  for (int slot = 0; slot < kWindow; ++slot) {  // slot j * kSlots + b: byte b of acc[j]
    const int j = slot / kSlots, b = slot % kSlots;
    const U& fields = b % 2 == 0 ? even[j] : odd[j];
    int64_t count = 0;
    for (int64_t lane = 0; lane < W; ++lane) count += (fields[lane] >> (b / 2 * 16)) & 0xffff;
    key_counts[top - slot] += static_cast<uint32_t>(count);
  }
}

// Marks which units saw an element > 0 and which an unsaturated one, for unit runs too
// short for scan_chunk's vectors (the last dim, or a small spatial extent).
template <typename T>
TV_VECTOR_CLONES void mark_short_runs(const T* x, int64_t n, T threshold, const UnitRuns& runs) {
  auto is_positive = [](T v) -> uint8_t { return v > 0; };
  auto is_unsaturated = [threshold](T v) -> uint8_t { return !(std::fabs(v) >= threshold); };
  if (runs.length == 1) {  // [..., F]: consecutive elements are consecutive units
    thread_local std::vector<uint8_t> pos_slots, unsat_slots;
    const int64_t slots = std::min(n, runs.units);  // slot k: unit first_unit + k (mod units)
    pos_slots.assign(static_cast<size_t>(slots), 0);
    unsat_slots.assign(static_cast<size_t>(slots), 0);
    // Raw restrict pointers: byte stores through the vectors could alias anything.
    uint8_t* __restrict pos = pos_slots.data();
    uint8_t* __restrict unsat = unsat_slots.data();
    for (int64_t i = 0; i < n; i += slots) {
      const int64_t m = std::min(slots, n - i);
      for (int64_t k = 0; k < m; ++k) {
        pos[k] |= is_positive(x[i + k]);
        unsat[k] |= is_unsaturated(x[i + k]);
      }
    }
    for (int64_t k = 0; k < slots; ++k) {
      int64_t u = runs.first_unit + k;
      if (u >= runs.units) u -= runs.units;
      if (pos[k]) set_flag(runs.positive + u);
      if (unsat[k]) set_flag(runs.unsaturated + u);
    }
    return;
  }
  for_each_run(n, runs, [&](int64_t i, int64_t m, int64_t unit) {
    uint8_t pos = 0, unsat = 0;
    for (int64_t k = 0; k < m; ++k) {
      pos |= is_positive(x[i + k]);
      unsat |= is_unsaturated(x[i + k]);
    }
    if (pos) set_flag(runs.positive + unit);
    if (unsat) set_flag(runs.unsaturated + unit);
  });
}

// Unit runs at least this long are flagged by scan_chunk, shorter ones by mark_short_runs.
constexpr int64_t kMinFusedRun = 32;

// Result of one chunk, combined with the others in chunk order.
struct ChunkResult {
  double sum = 0.0;
  double sumsq = 0.0;
  double max_abs = 0.0;
  int64_t nan = 0;
  int64_t inf = 0;
  int64_t saturated = 0;
  int64_t hist[kHistBins] = {};
};

// Smallest T >= threshold, so that comparing in T decides exactly as in float64.
template <typename T>
T threshold_as(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) < threshold) t = std::nextafter(t, std::numeric_limits<T>::infinity());
  return t;
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// One chunk of a float or double tensor whose elements are x[begin, end).
template <typename T>
void reduce_chunk(const T* x, const int64_t* d, double saturation, const Chunk& c,
                  uint8_t* positive, uint8_t* unsaturated, ChunkResult& r) {
  using L = Lanes<T>;
  using Bits = typename L::Bits;
  const T threshold = threshold_as<T>(saturation);
  const int64_t n = c.end - c.begin;
  const int64_t units = d[kDescUnits], inner = d[kDescInner];
  const UnitRuns whole_chunk{n, n, 0, 0, nullptr, nullptr};
  const UnitRuns runs =
      units > 0 ? UnitRuns{inner - c.begin % inner,       inner,
                           (c.begin / inner) % units,     units,
                           positive + d[kDescFlagOffset], unsaturated + d[kDescFlagOffset]}
                : whole_chunk;
  const bool short_runs = units > 0 && inner < kMinFusedRun;
  ChunkScan<T> s;
  scan_chunk<T>(x, n, threshold, short_runs ? whole_chunk : runs, s);
  if (short_runs) mark_short_runs<T>(x, n, threshold, runs);

  Bits top_bits;
  const T max_abs = horizontal_max(s.max_abs);
  std::memcpy(&top_bits, &max_abs, sizeof(top_bits));
  // At least kWindow, so that the window never reaches key 0 (zeros and subnormals).
  const Bits top = std::max<Bits>((top_bits >> L::kMantissaBits) & L::kKeyMask, kWindow);
  uint32_t keys[L::kKeyMask + 1] = {};
  count_keys<T>(x, n, top, keys, r.nan);

  for (int k = 0; k < 2; ++k) {
    r.sum += horizontal_sum_f64(s.moments.sum[k]);
    r.sumsq += horizontal_sum_f64(s.moments.sumsq[k]);
  }
  r.max_abs = static_cast<double>(max_abs);
  r.saturated = horizontal_sum(s.saturated);
  constexpr int kBias = L::kKeyMask / 2;
  r.hist[kHistZero] = horizontal_sum(s.zeros);
  r.hist[kHistBelow] = keys[0];  // subnormals
  for (Bits e = 1; e < L::kKeyMask; ++e)
    r.hist[hist_bin_for_exponent(static_cast<int>(e) - kBias)] += keys[e];
  r.hist[kHistNonFinite] = keys[L::kKeyMask];
  r.inf = keys[L::kKeyMask] - r.nan;
}

// fp16 and bf16 chunks are widened (exactly) into a float buffer first.
template <typename Loader>
const float* widen(const uint16_t* x, int64_t n, Loader to_f32) {
  thread_local std::vector<float> buffer(kChunkElems);
  float* out = buffer.data();
  for (int64_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
  return out;
}

void dispatch_chunk(const StatsBuffers& buf, const Chunk& c, ChunkResult& r) {
  const int64_t* d = buf.desc + c.tensor * kDescCols;
  const double saturation = buf.saturation[c.tensor];
  const auto* data = reinterpret_cast<const char*>(d[kDescData]);
  const int64_t n = c.end - c.begin;
  switch (d[kDescDType]) {
    case kFloat32:
      return reduce_chunk(reinterpret_cast<const float*>(data) + c.begin, d, saturation, c,
                          buf.unit_positive, buf.unit_unsaturated, r);
    case kFloat64:
      return reduce_chunk(reinterpret_cast<const double*>(data) + c.begin, d, saturation, c,
                          buf.unit_positive, buf.unit_unsaturated, r);
    case kFloat16:
      return reduce_chunk(widen(reinterpret_cast<const uint16_t*>(data) + c.begin, n, f16_to_f32),
                          d, saturation, c, buf.unit_positive, buf.unit_unsaturated, r);
    case kBFloat16:
      return reduce_chunk(widen(reinterpret_cast<const uint16_t*>(data) + c.begin, n, bf16_to_f32),
                          d, saturation, c, buf.unit_positive, buf.unit_unsaturated, r);
  }
}

int64_t count_zero_flags(const uint8_t* flags, int64_t n) {
  int64_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) zeros += flags[i] == 0;
  return zeros;
}

// The process that loaded the engine. A fork()ed child inherits OpenMP's state but not
// its threads, and a parallel region there would wait forever: children run serially.
const pid_t g_loaded_by = getpid();

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
  auto work = [&] {
    for (size_t i = next.fetch_add(1); i < chunks.size(); i = next.fetch_add(1))
      dispatch_chunk(buf, chunks[i], results[i]);
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
