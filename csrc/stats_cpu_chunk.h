// The CPU kernel for one chunk (kChunkElems elements of one tensor), included once per
// instruction set by a .cpp that names its namespace in TV_CPU_ISA; stats_cpu.cpp picks one
// at load time. The chunk is read twice while it sits in L2: a vector pass for the moments,
// maximum, saturation and unit flags, then a vector histogram pass that counts zeros and
// the chunk's top 16 octaves (below its largest finite |x|) in 4-bit counters, one per lane
// and octave (and again for the negative elements, when the chunk has any), with no
// scatter; only the rare elements outside that window (tiny, subnormal, non-finite) take a
// scalar path. Each pass is compiled for what the tensor asks (a saturation threshold or
// none, unit flags or none): the kernel is bound by its vector operations, not by memory.
#pragma once

#ifndef TV_CPU_ISA
#error "define TV_CPU_ISA, the namespace of this compilation, before including this file"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "stats_cpu.h"

// Vector helpers are always inlined, so they never pass a 32-byte vector across a call
// (which GCC warns about with -Wpsabi) and compile for this file's instruction set.
#define TV_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

namespace torchvitals {
namespace TV_CPU_ISA {
namespace {  // internal linkage: each compilation keeps its own copies

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

// How far ahead of its reads the first pass prefetches.
constexpr int64_t kPrefetchBytes = 4096;

// shift_left_or_zero: v << count in each lane, and 0 where count >= the lane width: what
// AVX2's vpsllv does in one instruction, and what C++ leaves undefined. any_set: whether any
// bit of v is set.
#if defined(__AVX2__)
TV_INLINE Lanes<float>::U shift_left_or_zero(Lanes<float>::U v, Lanes<float>::U count) {
  return (Lanes<float>::U)_mm256_sllv_epi32((__m256i)v, (__m256i)count);
}
TV_INLINE Lanes<double>::U shift_left_or_zero(Lanes<double>::U v, Lanes<double>::U count) {
  return (Lanes<double>::U)_mm256_sllv_epi64((__m256i)v, (__m256i)count);
}
template <typename U>
TV_INLINE bool any_set(U v) {
  return !_mm256_testz_si256((__m256i)v, (__m256i)v);
}
#else
template <typename U>
TV_INLINE U shift_left_or_zero(U v, U count) {
  constexpr unsigned kBits = 8 * sizeof(v[0]);
  return (U)(count < kBits) & (v << (count & (kBits - 1)));
}
template <typename U>
TV_INLINE bool any_set(U v) {
  typedef uint64_t Q __attribute__((vector_size(32)));
  const Q q = (Q)v;
  return ((q[0] | q[1]) | (q[2] | q[3])) != 0;
}
#endif

// Float64 running sums: fp32 lanes are widened, four at a time.
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
  TV_INLINE void add(const Moments& o) {
    for (int k = 0; k < 2; ++k) {
      sum[k] += o.sum[k];
      sumsq[k] += o.sumsq[k];
    }
  }
};

// Running state of pass 1 over one chunk, in lanes combined once at the chunk's end.
template <typename T>
struct ChunkScan {
  using I = typename Lanes<T>::I;
  Moments moments;
  I max_abs_bits = {};  // of every element, NaN and Inf included, unless the scan masks them
  I saturated = {};
  I signs = {};  // the OR of every element's bits: its sign bit is clear if none is negative
  Moments rectified;  // of max(x, 0), when the chunk names a rectified row
  I rectified_max_bits = {};
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
TV_INLINE Vec load(const void* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first `available` lanes from p, the rest zero.
template <typename Vec>
TV_INLINE Vec load_tail(const void* p, int64_t available) {
  Vec v = {};
  std::memcpy(&v, p, sizeof(v[0]) * static_cast<size_t>(available));
  return v;
}

// Whether a run of elements holds one > 0, and whether one is not saturated.
struct RunFlags {
  bool positive;
  bool unsaturated;
};

// Pass 1 over x[0, n): moments, saturated count and the largest |x| into `s`. Without
// kMaskNonFinite, NaN and Inf flow into the sums and the maximum, which is cheaper, and
// show there: the caller redoes the rare chunk that has one with kMaskNonFinite. Without
// kSaturation (a NaN threshold) nothing is saturated; without kUnits no run is flagged.
// With kRectified the sums and maximum of max(x, 0) are taken too, from the values the
// scan sums (masked or not), so that they equal a pass over max(x, 0) bit for bit.
template <bool kMaskNonFinite, bool kSaturation, bool kUnits, bool kRectified, typename T>
TV_INLINE RunFlags scan_run(const T* x, int64_t n, T threshold, ChunkScan<T>& s) {
  using L = Lanes<T>;
  using V = typename L::V;
  using I = typename L::I;
  constexpr int64_t W = L::kWidth;
  // Run-local accumulators: GCC keeps these in registers, struct members it may not.
  V positive_max = V{} - std::numeric_limits<T>::infinity();
  I max_abs_bits = {}, saturated = {}, signs = {}, rectified_max_bits = {};
  // Two sets of sums, for even and odd vectors: one chain of float64 adds would wait on
  // the add latency at every vector.
  Moments odd, rectified_odd;
  auto scan = [&](V v, Moments& moments, Moments& rectified) {
    const I bits = (I)v;
    const I abs_bits = bits & static_cast<typename L::Bits>(L::kAbsMask);
    I kept = bits;  // the bits summed: NaN and Inf only left out by the masked scan
    if constexpr (kMaskNonFinite) {
      const I finite = abs_bits < static_cast<typename L::Bits>(L::kInfBits);
      kept = bits & finite;
      moments.add((V)kept);
      const I finite_abs_bits = abs_bits & finite;
      max_abs_bits = finite_abs_bits > max_abs_bits ? finite_abs_bits : max_abs_bits;
    } else {
      moments.add(v);
      max_abs_bits = abs_bits > max_abs_bits ? abs_bits : max_abs_bits;
    }
    if constexpr (kRectified) {
      const I positive_bits = kept & (I)(v > V{});  // max(x, 0): NaN and x <= 0 give +0
      rectified.add((V)positive_bits);
      rectified_max_bits =
          positive_bits > rectified_max_bits ? positive_bits : rectified_max_bits;
    }
    signs |= bits;
    if constexpr (kSaturation) saturated -= (V)abs_bits >= threshold;  // false for NaNs
    if constexpr (kUnits) positive_max = v > positive_max ? v : positive_max;  // NaN never wins
  };
  const int64_t full = n - n % W;
  int64_t i = 0;
  for (; i + 2 * W <= full; i += 2 * W) {
    // The first pass reads from memory (activations are written long before the pass and
    // rarely still cached); asking 4 KB ahead hides the latency the hardware prefetcher
    // leaves: 12-15% faster on the small CNN's activations. Prefetches never fault.
    __builtin_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetchBytes);
    scan(load<V>(x + i), s.moments, s.rectified);
    scan(load<V>(x + i + W), odd, rectified_odd);
  }
  if (i < full) scan(load<V>(x + i), s.moments, s.rectified);
  if (full < n) {  // the tail, zero-padded: take the padding's zeros back
    scan(load_tail<V>(x + full, n - full), odd, rectified_odd);
    if (kSaturation && T{0} >= threshold) saturated[0] -= full + W - n;
  }
  s.moments.add(odd);
  if constexpr (kRectified) {
    s.rectified.add(rectified_odd);
    s.rectified_max_bits =
        rectified_max_bits > s.rectified_max_bits ? rectified_max_bits : s.rectified_max_bits;
  }
  s.max_abs_bits = max_abs_bits > s.max_abs_bits ? max_abs_bits : s.max_abs_bits;
  s.saturated += saturated;
  s.signs |= signs;
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
template <bool kMaskNonFinite, bool kSaturation, bool kUnits, bool kRectified, typename T>
void scan_runs(const T* x, int64_t n, T threshold, const UnitRuns& runs, ChunkScan<T>& state) {
  ChunkScan<T> s = state;  // in registers for the loop, not behind the reference
  for_each_run(n, runs, [&](int64_t i, int64_t m, int64_t unit) {
    const RunFlags f =
        scan_run<kMaskNonFinite, kSaturation, kUnits, kRectified>(x + i, m, threshold, s);
    if constexpr (kUnits) {
      if (f.positive) set_flag(runs.positive + unit);
      if (kSaturation && f.unsaturated) set_flag(runs.unsaturated + unit);
    }
  });
  state = s;
}

// scan_runs compiled for what the tensor asks: each test left out of the loop is a few
// vector operations per 8 elements less.
template <bool kMaskNonFinite, bool kRectified, typename T>
void scan_chunk(const T* x, int64_t n, T threshold, const UnitRuns& runs, ChunkScan<T>& state) {
  const bool saturation = threshold == threshold;  // a NaN threshold saturates nothing
  if (runs.units == 0) {
    if (saturation)
      return scan_runs<kMaskNonFinite, true, false, kRectified>(x, n, threshold, runs, state);
    return scan_runs<kMaskNonFinite, false, false, kRectified>(x, n, threshold, runs, state);
  }
  if (saturation)
    return scan_runs<kMaskNonFinite, true, true, kRectified>(x, n, threshold, runs, state);
  scan_runs<kMaskNonFinite, false, true, kRectified>(x, n, threshold, runs, state);
}

template <bool kMaskNonFinite, typename T>
void scan_chunk(const T* x, int64_t n, T threshold, const UnitRuns& runs, bool rectified,
                ChunkScan<T>& state) {
  if (rectified) return scan_chunk<kMaskNonFinite, true>(x, n, threshold, runs, state);
  scan_chunk<kMaskNonFinite, false>(x, n, threshold, runs, state);
}

// Pass 2 over x[0, n): counts elements by key (exponent field) into key_counts, row
// kHistAll every element and row kHistNegative the negative ones (rows of kKeyMask + 1
// keys). Keys in the kWindow octaves at and below `top` are counted in 4-bit lanes (one
// shift and one add per vector and 8 octaves, and a masked add for the negative row), the
// only scatter-free way to histogram with vectors; zeros are added to `zeros`, and the rare
// others (tiny, subnormal, non-finite) are counted one by one, NaNs also into `nan`.
// Without kNegatives (no element has its sign bit set) the negative row is left alone.
template <bool kNegatives, typename T>
void count_keys(const T* x, int64_t n, typename Lanes<T>::Bits top, uint32_t* key_counts,
                int64_t& zeros, int64_t& nan) {
  using L = Lanes<T>;
  using U = typename L::U;
  using Bits = typename L::Bits;
  constexpr int64_t W = L::kWidth;
  constexpr int64_t kKeys = L::kKeyMask + 1;
  constexpr int kLaneBits = 8 * sizeof(Bits);
  constexpr int kNibbles = kLaneBits / 4;    // 4-bit counters per lane
  constexpr int kAccs = kWindow / kNibbles;  // lanes of counters covering the window
  // A group of 15 vectors is checked once for keys outside the window, and then its 4-bit
  // counters (which one more vector could overflow) are flushed into byte counters.
  constexpr int kGroupVectors = 15;
  constexpr int64_t kGroup = kGroupVectors * W;
  // Groups flushed into the byte counters before one of them could pass 255.
  constexpr int kByteFlushEvery = 255 / kGroupVectors;
  // Bytes are flushed into 16-bit fields: one count per vector, at most this many.
  static_assert(kChunkElems / W < (1 << 16), "16-bit fields would overflow");
  const Bits nibbles = static_cast<Bits>(0x0f0f0f0f0f0f0f0full);
  const Bits low_bytes = static_cast<Bits>(0x00ff00ff00ff00ffull);
  const U one = U{} + 1;
  // [row]: every element, the negative ones.
  constexpr int kRows = kNegatives ? kHistRows : 1;
  U acc[kHistRows][kAccs] = {};
  U zero_lanes = {};
  U bytes[kHistRows][kAccs][2] = {};      // [nibble parity]: byte b counts nibble 2b + parity
  U fields[kHistRows][kAccs][2][2] = {};  // [nibble parity][byte parity]: field f counts byte
                                          // 2f + parity
  int nibble_flushes = 0;
  auto flush_bytes = [&] {
    for (int row = 0; row < kRows; ++row)
      for (int j = 0; j < kAccs; ++j)
        for (int p = 0; p < 2; ++p) {
          fields[row][j][p][0] += bytes[row][j][p] & low_bytes;
          fields[row][j][p][1] += (bytes[row][j][p] >> 8) & low_bytes;
          bytes[row][j][p] = U{};
        }
    nibble_flushes = 0;
  };
  auto flush_nibbles = [&] {
    for (int row = 0; row < kRows; ++row)
      for (int j = 0; j < kAccs; ++j) {
        bytes[row][j][0] += acc[row][j] & nibbles;
        bytes[row][j][1] += (acc[row][j] >> 4) & nibbles;
        acc[row][j] = U{};
      }
    if (++nibble_flushes == kByteFlushEvery) flush_bytes();
  };
  auto count_outside = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Bits bits;
      std::memcpy(&bits, x + i, sizeof(bits));
      const Bits key = (bits >> L::kMantissaBits) & L::kKeyMask;
      if (static_cast<Bits>(top - key) < kWindow || (bits & L::kAbsMask) == 0) continue;
      ++key_counts[kHistAll * kKeys + key];
      const bool is_nan = x[i] != x[i];
      nan += is_nan;
      key_counts[kHistNegative * kKeys + key] += x[i] < T{0};
    }
  };
  auto count = [&](U bits, U& outside) {
    const U abs_bits = bits << 1;                                // the sign shifted out
    const U below = top - (abs_bits >> (L::kMantissaBits + 1));  // wraps around above top
    const U zero = (U)(abs_bits == 0);
    zero_lanes -= zero;
    outside |= (U)(below >= kWindow) & ~zero;
    // Counter `below` of the window is nibble below % kNibbles of acc[row][below / kNibbles];
    // zeros and keys outside the window shift their bit out of every counter.
    const U shift = below << 2;
    for (int j = 0; j < kAccs; ++j) {
      const U bit = shift_left_or_zero(one, shift - j * kLaneBits);
      acc[kHistAll][j] += bit;
      if constexpr (kNegatives) acc[kHistNegative][j] += bit & (U)((typename L::I)bits < 0);
    }
  };
  const int64_t full = n - n % W;
  for (int64_t group = 0; group < full; group += kGroup) {
    const int64_t group_end = std::min(full, group + kGroup);
    U outside = {};
    for (int64_t i = group; i < group_end; i += W) count(load<U>(x + i), outside);
    flush_nibbles();
    if (any_set(outside)) count_outside(group, group_end);
  }
  if (full < n) {  // the tail, zero-padded: take the padding's zeros back
    U outside = {};
    count(load_tail<U>(x + full, n - full), outside);
    zeros -= full + W - n;
    if (any_set(outside)) count_outside(full, n);
  }
  zeros += horizontal_sum(zero_lanes);
  flush_nibbles();
  flush_bytes();
  for (int row = 0; row < kRows; ++row)
    for (int below = 0; below < kWindow; ++below) {
      const int nibble = below % kNibbles, byte = nibble / 2, field = byte / 2;
      const U& counts = fields[row][below / kNibbles][nibble % 2][byte % 2];
      int64_t count = 0;
      for (int64_t lane = 0; lane < W; ++lane) count += (counts[lane] >> (16 * field)) & 0xffff;
      key_counts[row * kKeys + top - below] += static_cast<uint32_t>(count);
    }
}

// Marks which units saw an element > 0 and which an unsaturated one, for unit runs too
// short for scan_chunk's vectors (the last dim, or a small spatial extent).
template <typename T>
void mark_short_runs(const T* x, int64_t n, T threshold, const UnitRuns& runs) {
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

// Smallest T >= threshold, so that comparing in T decides exactly as in float64.
template <typename T>
T threshold_as(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) < threshold) t = std::nextafter(t, std::numeric_limits<T>::infinity());
  return t;
}

// One chunk of a float or double tensor whose elements are x[begin, end); `d` is the
// descriptor its units come from (the rectified row's, when there is one), and
// *rectified receives the sums and maximum of max(x, 0).
template <typename T>
void reduce_typed_chunk(const T* x, const int64_t* d, double saturation, const Chunk& c,
                        uint8_t* positive, uint8_t* unsaturated, ChunkResult& r,
                        ChunkResult* rectified) {
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
  const UnitRuns& scanned_runs = short_runs ? whole_chunk : runs;
  ChunkScan<T> s;
  const bool rectify = rectified != nullptr;
  scan_chunk<false>(x, n, threshold, scanned_runs, rectify, s);
  Bits top_bits = static_cast<Bits>(horizontal_max(s.max_abs_bits));
  if (top_bits >= L::kInfBits) {
    s = ChunkScan<T>{};  // a NaN or Inf: the sums and maximum must leave it out
    scan_chunk<true>(x, n, threshold, scanned_runs, rectify, s);
    top_bits = static_cast<Bits>(horizontal_max(s.max_abs_bits));
  }
  if (short_runs) mark_short_runs<T>(x, n, threshold, runs);

  T max_abs;
  std::memcpy(&max_abs, &top_bits, sizeof(max_abs));
  // At least kWindow, so that the window never reaches key 0 (zeros and subnormals).
  const Bits top = std::max<Bits>(top_bits >> L::kMantissaBits, kWindow);
  constexpr int64_t kKeys = L::kKeyMask + 1;
  uint32_t keys[kHistRows][kKeys] = {};  // every element, the negative ones
  const bool negatives = any_set((typename L::U)s.signs >> (8 * sizeof(Bits) - 1));
  if (negatives)
    count_keys<true>(x, n, top, &keys[0][0], r.hist[kHistAll][kHistZero], r.nan);
  else
    count_keys<false>(x, n, top, &keys[0][0], r.hist[kHistAll][kHistZero], r.nan);

  for (int k = 0; k < 2; ++k) {
    r.sum += horizontal_sum_f64(s.moments.sum[k]);
    r.sumsq += horizontal_sum_f64(s.moments.sumsq[k]);
  }
  r.max_abs = static_cast<double>(max_abs);
  if (rectify) {
    for (int k = 0; k < 2; ++k) {
      rectified->sum += horizontal_sum_f64(s.rectified.sum[k]);
      rectified->sumsq += horizontal_sum_f64(s.rectified.sumsq[k]);
    }
    const Bits rectified_top = static_cast<Bits>(horizontal_max(s.rectified_max_bits));
    T rectified_max;
    std::memcpy(&rectified_max, &rectified_top, sizeof(rectified_max));
    rectified->max_abs = static_cast<double>(rectified_max);
  }
  r.saturated = horizontal_sum(s.saturated);
  constexpr int kBias = L::kKeyMask / 2;
  for (int row = 0; row < kHistRows; ++row) {
    int64_t* hist = r.hist[row];
    hist[kHistBelow] += keys[row][0];  // subnormals
    for (Bits e = 1; e < L::kKeyMask; ++e)
      hist[hist_bin_for_exponent(static_cast<int>(e) - kBias)] += keys[row][e];
    hist[kHistNonFinite] += keys[row][L::kKeyMask];
  }
}

// fp16 and bf16 chunks are widened (exactly) into a float buffer first.
template <typename Loader>
const float* widen(const uint16_t* x, int64_t n, Loader to_f32) {
  thread_local std::vector<float> buffer(kChunkElems);
  float* out = buffer.data();
  for (int64_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
  return out;
}

}  // namespace

void reduce_chunk(const StatsBuffers& buf, const Chunk& c, ChunkResult& r, ChunkResult* rectified) {
  const int64_t* d = buf.desc + c.tensor * kDescCols;
  const double saturation = buf.saturation[c.tensor];
  const auto* data = reinterpret_cast<const char*>(d[kDescData]);
  const int64_t n = c.end - c.begin;
  // x has no units of its own when a rectified row is derived from it: that row's are set.
  const int64_t* units = rectified != nullptr ? buf.desc + c.rectified * kDescCols : d;
  uint8_t* positive = buf.unit_positive;
  uint8_t* unsaturated = buf.unit_unsaturated;
  switch (d[kDescDType]) {
    case kFloat32:
      return reduce_typed_chunk(reinterpret_cast<const float*>(data) + c.begin, units, saturation,
                                c, positive, unsaturated, r, rectified);
    case kFloat64:
      return reduce_typed_chunk(reinterpret_cast<const double*>(data) + c.begin, units, saturation,
                                c, positive, unsaturated, r, rectified);
    case kFloat16:
      return reduce_typed_chunk(
          widen(reinterpret_cast<const uint16_t*>(data) + c.begin, n, f16_to_f32), units,
          saturation, c, positive, unsaturated, r, rectified);
    case kBFloat16:
      return reduce_typed_chunk(
          widen(reinterpret_cast<const uint16_t*>(data) + c.begin, n, bf16_to_f32), units,
          saturation, c, positive, unsaturated, r, rectified);
  }
}

}  // namespace TV_CPU_ISA
}  // namespace torchvitals
