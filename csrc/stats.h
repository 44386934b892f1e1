// Shared contract between the Python ops layer, the CPU kernel and the CUDA kernel.
//
// The extension never links libtorch: Python hands over raw pointers plus a small
// int64 descriptor table, and torch owns every buffer. Everything the kernels
// must agree on (descriptor columns, output columns, histogram layout, the
// per-element binning rule) lives here so the two backends cannot drift apart.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TV_HD __host__ __device__ __forceinline__
#else
#define TV_HD inline
#endif

namespace torchvitals {

// Input dtypes, as encoded by python/torchvitals/ops.py.
enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Columns of the int64 descriptor table [T, kDescCols].
enum DescCol : int {
  kDescData = 0,        // data pointer (contiguous)
  kDescNumel = 1,       // element count
  kDescDType = 2,       // DType
  kDescInner = 3,       // product of dims after the feature dim (1 for last-dim features)
  kDescUnits = 4,       // size of the feature dim, 0 when there is none
  kDescFlagOffset = 5,  // first slot of this tensor's units in the unit-flag buffers
  kDescChunkBegin = 6,  // first work chunk of this tensor (prefix sum of chunk counts)
  kDescCols = 7,
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

// Elements one CPU task or one CUDA block reduces before results are combined
// in chunk order, which keeps float sums independent of thread scheduling.
constexpr int64_t kChunkElems = int64_t{1} << 16;

TV_HD int hist_bin_for_exponent(int k) {
  if (k < kHistMinExp) return kHistBelow;
  if (k > kHistMaxExp) return kHistAbove;
  return kHistFirstExp + (k - kHistMinExp);
}

// Bin of an fp32 value from its bits: fp16 and bf16 widen to fp32 exactly.
TV_HD int hist_bin_f32(uint32_t bits) {
  const int e = static_cast<int>((bits >> 23) & 0xffu);
  if (e == 0xff) return kHistNonFinite;
  if (e == 0) return (bits & 0x7fffffu) ? kHistBelow : kHistZero;  // subnormals are < 2^-126
  return hist_bin_for_exponent(e - 127);
}

TV_HD int hist_bin_f64(uint64_t bits) {
  const int e = static_cast<int>((bits >> 52) & 0x7ffu);
  if (e == 0x7ff) return kHistNonFinite;
  if (e == 0) return (bits & 0xfffffffffffffull) ? kHistBelow : kHistZero;
  return hist_bin_for_exponent(e - 1023);
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
