// The one contract between Python (python/torchvitals/engine/), the CPU kernel and the CUDA
// kernel.
//
// The extension never links libtorch: Python hands over raw pointers plus a small int64
// descriptor table, and torch owns every buffer. Everything the two sides must agree on is
// written here once: dtype codes, descriptor and output columns (with the names the bindings
// export to Python), the histogram layout, the per-element binning rule and the rule that
// turns a tensor's totals into its counts.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TV_HD __host__ __device__ __forceinline__
#else
#define TV_HD inline
#endif

namespace torchvitals {

// Input dtypes.
enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kDTypes = 4 };

// Columns of the int64 descriptor table [T, kDescCols]. Tensors are dense in any layout
// (contiguous, channels-last, transposed): the kernels read their numel elements in memory
// order, and units are found from the feature dim's stride, not from the shape.
enum DescCol : int {
  kDescData = 0,   // address of the element at the lowest address
  kDescNumel = 1,  // element count
  kDescDType = 2,  // DType
  kDescInner = 3,  // stride of the feature dim: the element at memory offset i belongs to unit
                   // (i / inner) % units (1 for a contiguous [..., F] tensor)
  kDescUnits = 4,  // size of the feature dim, 0 when there is none
  kDescFlagOffset = 5,  // first slot of this tensor's units in the unit-flag buffers
  kDescChunkBegin = 6,  // first work chunk of this tensor (prefix sum of chunk counts)
  kDescRectifiedOf = 7,  // -1, or the row of a tensor x that this one equals max(x, 0) of
                         // (same shape, strides and dtype; x without units, this one without
                         // a saturation threshold): the CPU backend then takes this row from
                         // the pass over x instead of reading it; the CUDA backend reads it
  kDescCols = 8,
};

// Columns of the float64 moments output [T, kMomentCols].
enum MomentCol : int { kSum = 0, kSumSq = 1, kMaxAbs = 2, kMomentCols = 3 };

// Columns of the int64 counts output [T, kCountCols].
enum CountCol : int {
  kNumel = 0,
  kNan = 1,
  kInf = 2,
  kZeros = 3,
  kSaturated = 4,
  kUnits = 5,
  kDeadUnits = 6,
  kSaturatedUnits = 7,
  kCountCols = 8,
};

// Names of the dtypes and columns above, in their order; the bindings export them and Python
// reads them (engine/contract.py), so neither side retypes the other's layout.
inline constexpr const char* kDTypeNames[kDTypes] = {"float32", "float16", "bfloat16", "float64"};
inline constexpr const char* kDescNames[kDescCols] = {
    "data", "numel", "dtype", "inner", "units", "flag_offset", "chunk_begin", "rectified_of"};
inline constexpr const char* kMomentNames[kMomentCols] = {"sum", "sumsq", "max_abs"};
inline constexpr const char* kCountNames[kCountCols] = {
    "numel", "nan", "inf", "zeros", "saturated", "units", "dead_units", "saturated_units"};

// Histogram of log2|x|: bin 0 exact zeros, bin 1 below the window, one bin per
// power of two 2^k <= |x| < 2^(k+1) for k in [kHistMinExp, kHistMaxExp], then
// above the window (finite) and non-finite (NaN and +-Inf).
constexpr int kHistMinExp = -64;
constexpr int kHistMaxExp = 15;
constexpr int kHistZero = 0;
constexpr int kHistBelow = 1;
constexpr int kHistFirstExp = 2;
constexpr int kHistAbove = kHistFirstExp + (kHistMaxExp - kHistMinExp + 1);
constexpr int kHistNonFinite = kHistAbove + 1;
constexpr int kHistBins = kHistNonFinite + 1;

// The histogram output holds two rows of kHistBins per tensor: every element by the bin of
// |x|, then the negative elements alone (x < 0: never a zero or a NaN, -Inf in the
// non-finite bin) by the same bins. Positive counts are the difference, so the signed
// histogram costs one row and the unsigned one stays a row of its own.
constexpr int kHistAll = 0;
constexpr int kHistNegative = 1;
constexpr int kHistRows = 2;

// Elements one CPU task or one CUDA block reduces before results are combined
// in chunk order, which keeps float sums independent of thread scheduling.
constexpr int64_t kChunkElems = int64_t{1} << 16;

TV_HD int hist_bin_for_exponent(int k) {
  if (k < kHistMinExp) return kHistBelow;
  if (k > kHistMaxExp) return kHistAbove;
  return kHistFirstExp + (k - kHistMinExp);
}

static_assert(kHistMinExp > -127 && kHistMaxExp < 128,
              "hist_bin_f32 assumes the window lies inside fp32's normal exponents");

// Bin of an fp32 value from its bits (fp16 and bf16 widen to fp32 exactly), without branches:
// clamp the exponent into the window, then patch zeros and non-finite values. Exponent field 0
// (zero, subnormal) lands below the window like normals under 2^kHistMinExp. The CUDA kernel
// bins with it; the CPU kernel counts exponent fields and maps them with
// hist_bin_for_exponent. tests/engine/test_binning.py checks both against the float64
// reference on every exponent.
TV_HD int hist_bin_f32(uint32_t bits) {
  const int e = static_cast<int>((bits >> 23) & 0xffu);
  const int k = e - 127 - kHistMinExp + kHistFirstExp;
  int bin = k < kHistBelow ? kHistBelow : (k > kHistAbove ? kHistAbove : k);
  if ((bits << 1) == 0) bin = kHistZero;
  if (e == 0xff) bin = kHistNonFinite;
  return bin;
}

TV_HD int hist_bin_f64(uint64_t bits) {
  const int e = static_cast<int>((bits >> 52) & 0x7ffu);
  if (e == 0x7ff) return kHistNonFinite;
  if (e == 0) return (bits & 0xfffffffffffffull) ? kHistBelow : kHistZero;
  return hist_bin_for_exponent(e - 1023);
}

// Whether a value counts in the negative row, from its bits: the sign bit set on anything
// but a zero or a NaN.
TV_HD bool hist_negative_f32(uint32_t bits) {
  return (bits >> 31) && (bits << 1) != 0 && (bits << 1) <= 0xff000000u;
}

TV_HD bool hist_negative_f64(uint64_t bits) {
  return (bits >> 63) && (bits << 1) != 0 && (bits << 1) <= 0xffe0000000000000ull;
}

// Slot of a value in the two-row histogram: its bin, in the negative row when it is negative.
TV_HD int hist_slot_f32(uint32_t bits) {
  return hist_bin_f32(bits) + (hist_negative_f32(bits) ? kHistBins : 0);
}

TV_HD int hist_slot_f64(uint64_t bits) {
  return hist_bin_f64(bits) + (hist_negative_f64(bits) ? kHistBins : 0);
}

// A tensor's counts once its chunks are combined, the same on every backend. The inputs are
// totals over the tensor: its histogram, NaN and saturated element counts, and the units whose
// flags stayed unset (never positive; never unsaturated).
TV_HD void finalize_counts(int64_t numel, int64_t units, double saturation, const int64_t* hist,
                           int64_t nan, int64_t saturated, int64_t never_positive,
                           int64_t never_unsaturated, int64_t* counts) {
  counts[kNumel] = numel;
  counts[kNan] = nan;
  counts[kInf] = hist[kHistNonFinite] - nan;
  counts[kZeros] = hist[kHistZero];
  counts[kSaturated] = saturated;
  counts[kUnits] = units;
  counts[kDeadUnits] = units > 0 ? never_positive : 0;
  // An empty tensor has no saturated units; a NaN threshold switches the test off.
  const bool thresholded = numel > 0 && saturation == saturation;
  counts[kSaturatedUnits] = units > 0 && thresholded ? never_unsaturated : 0;
}

TV_HD float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// IEEE half to float, exact for every input including subnormals, Inf and NaN.
TV_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise into an fp32 normal
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

TV_HD uint64_t f64_bits(double d) {
  uint64_t b;
  memcpy(&b, &d, sizeof(b));
  return b;
}

}  // namespace torchvitals
