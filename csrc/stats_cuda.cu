// CUDA backend: one launch reduces every work chunk of every tensor (one block per chunk),
// a second combines each tensor's chunk partials in a fixed order, so sums are identical
// from run to run. Only kernel launches on the caller's stream: no sync, no allocation.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels.h"
#include "stats.h"

namespace torchvitals {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kVecBytes = 16;

static_assert(kChunkElems % 8 == 0, "a 16-byte aligned tensor must give 16-byte aligned chunks");
static_assert(kChunkElems <= std::numeric_limits<int>::max(), "chunk-relative indices are int");
__device__ __forceinline__ int slot_of(float x) { return hist_slot_f32(__float_as_uint(x)); }
__device__ __forceinline__ int slot_of(double x) { return hist_slot_f64(f64_bits(x)); }

// Input dtypes: storage type and the type elements are widened to (exactly, as on the CPU).
struct F32 {
  using Raw = float;
  using Value = float;
  static __device__ __forceinline__ float value(float r) { return r; }
};

struct F16 {
  using Raw = unsigned short;
  using Value = float;
  // cvt.f32.f16 is exact for every half, subnormals included, like f16_to_f32.
  static __device__ __forceinline__ float value(unsigned short r) {
    return __half2float(__ushort_as_half(r));
  }
};

struct BF16 {
  using Raw = unsigned short;
  using Value = float;
  static __device__ __forceinline__ float value(unsigned short r) {
    return __uint_as_float(static_cast<uint32_t>(r) << 16);
  }
};

struct F64 {
  using Raw = double;
  using Value = double;
  static __device__ __forceinline__ double value(double r) { return r; }
};

// For a float x, |x| >= t exactly when |x| >= t rounded up to float; NaN stays NaN.
template <typename V>
__device__ __forceinline__ V threshold_as(double t) {
  if constexpr (std::is_same_v<V, float>) {
    return __double2float_ru(t);
  } else {
    return t;
  }
}

// One chunk of one tensor, as seen by every thread of its block.
struct Job {
  const void* data;
  int64_t begin;  // first element of the chunk within its tensor
  int n;          // elements in the chunk
  double threshold;
  int64_t inner;
  int64_t units;      // 0: no feature units, skip the flag updates
  uint8_t* positive;  // this tensor's unit flags
  uint8_t* unsaturated;
};

// Per-thread accumulators. Sums are float64 per element, as on the CPU: the square of an fp32
// near its max overflows a float accumulator, and the CPU engine is matched to rtol 1e-5.
template <typename V>
struct Acc {
  double sum = 0.0;
  double sumsq = 0.0;
  V max_abs = 0;
  int nan = 0;
  int saturated = 0;
};

// What a block reduces: moments plus two integer tallies (NaN and saturated elements in the
// chunk kernel, dead and saturated units in the finalize kernel). A plain aggregate so that it
// can live in shared memory.
struct Totals {
  double sum;
  double sumsq;
  double max_abs;
  long long tally[2];
};

// Fixed-shape reduction (shuffle tree, then warps in order): the same bits on every run.
// The result is valid in thread 0; the barrier inside also orders every earlier shared-memory
// write of the block before what follows the call.
__device__ Totals block_reduce(Totals v, Totals* scratch) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v.sum += __shfl_down_sync(0xffffffffu, v.sum, offset);
    v.sumsq += __shfl_down_sync(0xffffffffu, v.sumsq, offset);
    v.max_abs = fmax(v.max_abs, __shfl_down_sync(0xffffffffu, v.max_abs, offset));
    v.tally[0] += __shfl_down_sync(0xffffffffu, v.tally[0], offset);
    v.tally[1] += __shfl_down_sync(0xffffffffu, v.tally[1], offset);
  }
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      v.sum += scratch[w].sum;
      v.sumsq += scratch[w].sumsq;
      v.max_abs = fmax(v.max_abs, scratch[w].max_abs);
      v.tally[0] += scratch[w].tally[0];
      v.tally[1] += scratch[w].tally[1];
    }
  }
  return v;
}

// Tracks (i % inner, (i / inner) % units) of a thread's current vector start i as i advances
// by a fixed stride, so the hot loop needs no 64-bit division.
struct UnitCursor {
  int64_t within = 0, unit = 0;
  int64_t step_within = 0, step_unit = 0;

  UnitCursor() = default;
  TV_HD UnitCursor(int64_t first, int64_t stride, int64_t inner, int64_t units)
      : within(first % inner),
        unit(first / inner % units),
        step_within(stride % inner),
        step_unit(stride / inner % units) {}

  // Both sums stay below twice their modulus, so one conditional subtraction each suffices.
  TV_HD void advance(int64_t inner, int64_t units) {
    within += step_within;
    unit += step_unit;
    if (within >= inner) {
      within -= inner;
      ++unit;
    }
    if (unit >= units) unit -= units;
  }
};

template <typename V>
__device__ __forceinline__ void mark_unit(V x, V threshold, int64_t unit, const Job& job) {
  // Read before writing: a flag already set then costs a cached load, not a store to a line
  // that every block of the tensor keeps writing.
  if (x > V(0) && !job.positive[unit]) job.positive[unit] = 1;
  if (!(fabs(x) >= threshold) && !job.unsaturated[unit]) job.unsaturated[unit] = 1;
}

template <typename Raw, int kVec>
__device__ __forceinline__ void load(const Raw* p, Raw (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = __ldg(p);
  } else {
    static_assert(sizeof(out) == sizeof(uint4), "vectors are one 16-byte load");
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(out, &w, sizeof(w));
  }
}

// Reduces one chunk with kVec elements per load (1: the unaligned fallback); kUnits adds the
// unit-flag updates, so tensors without feature units pay nothing for them.
template <typename Tr, int kVec, bool kUnits>
class ChunkScan {
 public:
  using Raw = typename Tr::Raw;
  using V = typename Tr::Value;
  // Loads in flight per thread: H100 needs several to saturate HBM. Unit tracking halves them
  // to keep the whole kernel within 64 registers (4 blocks per SM).
  static constexpr int kUnroll = kUnits ? 2 : 4;

  __device__ ChunkScan(const Job& job, unsigned* hist_lane)
      : job_(job), threshold_(threshold_as<V>(job.threshold)), hist_lane_(hist_lane) {
    if constexpr (kUnits) {
      cursor_ = UnitCursor(job.begin + int64_t{threadIdx.x} * kVec, int64_t{kThreads} * kVec,
                           job.inner, job.units);
    }
  }

  __device__ Totals run() {
    const Raw* p = static_cast<const Raw*>(job_.data) + job_.begin;
    const int num_vecs = job_.n / kVec;
    int v = threadIdx.x;
    for (; v + (kUnroll - 1) * kThreads < num_vecs; v += kUnroll * kThreads) {
      Raw r[kUnroll][kVec];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) load(p + (v + k * kThreads) * kVec, r[k]);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) consume(r[k]);
    }
    for (; v < num_vecs; v += kThreads) {
      Raw r[kVec];
      load(p + v * kVec, r);
      consume(r);
    }
    if constexpr (kVec > 1) {  // fewer than kVec elements past the last whole vector
      const int i = num_vecs * kVec + static_cast<int>(threadIdx.x);
      if (i < job_.n) {
        const V x = Tr::value(__ldg(p + i));
        take(x);
        if constexpr (kUnits) {
          mark_unit(x, threshold_, (job_.begin + i) / job_.inner % job_.units, job_);
        }
      }
    }
    return Totals{
        acc_.sum, acc_.sumsq, static_cast<double>(acc_.max_abs), {acc_.nan, acc_.saturated}};
  }

 private:
  __device__ __forceinline__ void take(V x) {
    const int slot = slot_of(x);
    atomicAdd(hist_lane_ + slot * kWarpSize, 1u);
    const bool finite = slot % kHistBins != kHistNonFinite;
    const V v = finite ? x : V(0);  // moments cover finite elements only
    const double d = v;
    acc_.sum += d;
    acc_.sumsq = fma(d, d, acc_.sumsq);
    acc_.max_abs = fmax(acc_.max_abs, fabs(v));
    acc_.nan += x != x;
    acc_.saturated += fabs(x) >= threshold_;  // false for NaN x and for a NaN threshold
  }

  __device__ __forceinline__ void consume(const Raw (&r)[kVec]) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) take(Tr::value(r[j]));
    if constexpr (kUnits) {
      int64_t within = cursor_.within, unit = cursor_.unit;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        mark_unit(Tr::value(r[j]), threshold_, unit, job_);
        if (++within == job_.inner) {
          within = 0;
          if (++unit == job_.units) unit = 0;
        }
      }
      cursor_.advance(job_.inner, job_.units);
    }
  }

  const Job& job_;
  const V threshold_;
  unsigned* const hist_lane_;
  Acc<V> acc_;
  UnitCursor cursor_;
};

template <typename Tr>
__device__ Totals scan_chunk(const Job& job, unsigned* hist_lane) {
  using Raw = typename Tr::Raw;
  constexpr int kVec = kVecBytes / sizeof(Raw);
  const bool aligned =
      reinterpret_cast<uintptr_t>(static_cast<const Raw*>(job.data) + job.begin) % kVecBytes == 0;
  if (job.units > 0) {
    return aligned ? ChunkScan<Tr, kVec, true>(job, hist_lane).run()
                   : ChunkScan<Tr, 1, true>(job, hist_lane).run();
  }
  return aligned ? ChunkScan<Tr, kVec, false>(job, hist_lane).run()
                 : ChunkScan<Tr, 1, false>(job, hist_lane).run();
}

// The tensor owning a chunk: the last one whose first chunk is <= chunk (an empty tensor shares
// its first chunk with the next one, so it is never picked).
__device__ int64_t owner_of(const StatsBuffers& buf, int64_t chunk) {
  int64_t lo = 0, hi = buf.num_tensors - 1;
  while (lo < hi) {
    const int64_t mid = hi - (hi - lo) / 2;
    if (__ldg(buf.desc + mid * kDescCols + kDescChunkBegin) <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads) chunk_kernel(const StatsBuffers buf) {
  // One histogram copy per lane: a warp's atomics never collide, however its values bin.
  // Slots: the bins of non-negative elements, then those of negative ones.
  constexpr int kSlots = kHistRows * kHistBins;
  __shared__ unsigned hist[kSlots * kWarpSize];
  __shared__ Totals scratch[kWarps];
  for (int i = threadIdx.x; i < kSlots * kWarpSize; i += kThreads) hist[i] = 0;

  const int64_t chunk = blockIdx.x;
  const int64_t t = owner_of(buf, chunk);
  const int64_t* d = buf.desc + t * kDescCols;
  Job job;
  job.data = reinterpret_cast<const void*>(__ldg(d + kDescData));
  job.begin = (chunk - __ldg(d + kDescChunkBegin)) * kChunkElems;
  const int64_t left = __ldg(d + kDescNumel) - job.begin;
  job.n = static_cast<int>(left < 0 ? 0 : (left < kChunkElems ? left : kChunkElems));
  job.threshold = __ldg(buf.saturation + t);
  job.inner = __ldg(d + kDescInner);
  job.units = __ldg(d + kDescUnits);
  const int64_t flag_offset = __ldg(d + kDescFlagOffset);
  job.positive = buf.unit_positive + flag_offset;
  job.unsaturated = buf.unit_unsaturated + flag_offset;
  __syncthreads();

  unsigned* hist_lane = hist + threadIdx.x % kWarpSize;
  Totals mine{};
  switch (__ldg(d + kDescDType)) {
    case kFloat32:
      mine = scan_chunk<F32>(job, hist_lane);
      break;
    case kFloat16:
      mine = scan_chunk<F16>(job, hist_lane);
      break;
    case kBFloat16:
      mine = scan_chunk<BF16>(job, hist_lane);
      break;
    case kFloat64:
      mine = scan_chunk<F64>(job, hist_lane);
      break;
  }
  const Totals total = block_reduce(mine, scratch);  // its barrier completes the histogram

  if (threadIdx.x == 0) {
    double* out = buf.partials + chunk * kMomentCols;
    out[kSum] = total.sum;
    out[kSumSq] = total.sumsq;
    out[kMaxAbs] = total.max_abs;
    auto* counts = reinterpret_cast<unsigned long long*>(buf.counts + t * kCountCols);
    if (total.tally[0]) atomicAdd(counts + kNan, static_cast<unsigned long long>(total.tally[0]));
    if (total.tally[1]) {
      atomicAdd(counts + kSaturated, static_cast<unsigned long long>(total.tally[1]));
    }
  }
  auto* out_hist = reinterpret_cast<unsigned long long*>(buf.hist + t * kHistRows * kHistBins);
  for (int b = threadIdx.x; b < kHistBins; b += kThreads) {
    unsigned count[kHistRows] = {};
    // Start each slot at a different lane so the threads of a warp hit distinct banks.
    for (int row = 0; row < kHistRows; ++row) {
      const int slot = row * kHistBins + b;
      for (int l = 0; l < kWarpSize; ++l)
        count[row] += hist[slot * kWarpSize + (l + slot) % kWarpSize];
    }
    // Output rows: every element (both slot rows), then the negative ones.
    const unsigned all = count[0] + count[1];
    if (all) atomicAdd(out_hist + kHistAll * kHistBins + b, static_cast<unsigned long long>(all));
    if (count[1]) {
      atomicAdd(out_hist + kHistNegative * kHistBins + b,
                static_cast<unsigned long long>(count[1]));
    }
  }
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(const StatsBuffers buf) {
  __shared__ Totals scratch[kWarps];
  const int64_t t = blockIdx.x;
  const int64_t* d = buf.desc + t * kDescCols;
  const int64_t first = d[kDescChunkBegin];
  const int64_t last = t + 1 < buf.num_tensors ? d[kDescCols + kDescChunkBegin] : buf.num_chunks;
  const int64_t units = d[kDescUnits];
  const uint8_t* positive = buf.unit_positive + d[kDescFlagOffset];
  const uint8_t* unsaturated = buf.unit_unsaturated + d[kDescFlagOffset];

  Totals mine{};
  for (int64_t c = first + threadIdx.x; c < last; c += kThreads) {
    const double* p = buf.partials + c * kMomentCols;
    mine.sum += p[kSum];
    mine.sumsq += p[kSumSq];
    mine.max_abs = fmax(mine.max_abs, p[kMaxAbs]);
  }
  for (int64_t u = threadIdx.x; u < units; u += kThreads) {
    mine.tally[0] += positive[u] == 0;
    mine.tally[1] += unsaturated[u] == 0;
  }
  const Totals total = block_reduce(mine, scratch);
  if (threadIdx.x != 0) return;

  double* moments = buf.moments + t * kMomentCols;
  moments[kSum] = total.sum;
  moments[kSumSq] = total.sumsq;
  moments[kMaxAbs] = total.max_abs;
  int64_t* counts = buf.counts + t * kCountCols;  // NaN and saturated elements added up here
  finalize_counts(d[kDescNumel], units, buf.saturation[t], buf.hist + t * kHistRows * kHistBins,
                  counts[kNan], counts[kSaturated], total.tally[0], total.tally[1], counts);
}

}  // namespace

void tensor_stats_cuda(const StatsBuffers& buf, intptr_t stream) {
  if (buf.num_tensors <= 0) return;
  constexpr int64_t kMaxBlocks = std::numeric_limits<int>::max();  // gridDim.x limit
  if (buf.num_chunks > kMaxBlocks || buf.num_tensors > kMaxBlocks) {
    throw std::runtime_error("torchvitals: too many tensors or chunks for one CUDA grid");
  }
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  if (buf.num_chunks > 0) {
    chunk_kernel<<<static_cast<unsigned>(buf.num_chunks), kThreads, 0, s>>>(buf);
  }
  finalize_kernel<<<static_cast<unsigned>(buf.num_tensors), kThreads, 0, s>>>(buf);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("torchvitals: CUDA kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace torchvitals
