// Cross-entropy CUDA kernels and their registration. The arithmetic is
// cross_entropy_math.h's, shared with the CPU kernels; argument checks, output
// allocation and the linear cross-entropy's chunk loop are cross_entropy.h's,
// shared with the CPU registration.
//
// One block per row (grid-striding when rows outnumber blocks): every thread
// keeps an online log-sum-exp state (running max, sum of exp(z - max)) over
// its share of the row, rescaled once per 16-byte group; the states merge
// through warp shuffles, then shared memory. Rows are read with 16-byte loads
// over their aligned body (row_split.h), scalar heads and tails. The forward
// writes per-row losses, log-sum-exps and target weights, and one more
// single-block kernel reduces them (deterministically). The backward and the
// in-place loss-and-gradient kernel walk each row the same way, so a thread
// reads and writes only its own elements.
//
// A target outside [0, classes) that is not ignore_index trips a device-side
// assertion (after printing the row, value and class count), as PyTorch's
// own CUDA kernel does: checking on the host first would cost a
// synchronization per call, which WSL2 makes expensive. The assertion leaves
// the CUDA context unusable, as PyTorch's does.
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <type_traits>

#include "cross_entropy.h"
#include "cross_entropy_math.h"
#include "cuda/block_reduce.cuh"
#include "cuda/vec_io.cuh"
#include "dtypes.h"
#include "row_split.h"

namespace torch_wsl {
namespace {

namespace cm = torch_wsl::ce_math;

// Threads per row block, at most; short rows get fewer (whole warps).
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
// Row-kernel grids stop growing here; the kernels stride over further rows.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;
constexpr int kFinishThreads = 512;

enum Smooth : int { kNoSmooth = 0, kUniformSmooth = 1, kWeightedSmooth = 2 };

// Everything a row kernel needs, by value.
template <typename scalar_t>
struct RowParams {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* logits;
  int64_t row_stride;
  const void* target;
  bool target_int32;
  int64_t ignore_index;
  const acc_t* weight;      // or null
  const acc_t* weight_sum;  // or null: classes
  int64_t rows;
  int64_t classes;
  acc_t smoothing;
  acc_t cap;
  acc_t inv_cap;
};

template <typename scalar_t>
__device__ __forceinline__ int64_t load_target(const RowParams<scalar_t>& p, int64_t row) {
  return p.target_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(p.target)[row])
                        : static_cast<const int64_t*>(p.target)[row];
}

// The row's target, -1 when ignored; asserts that any other is a class index.
template <typename scalar_t>
__device__ __forceinline__ int64_t checked_target(const RowParams<scalar_t>& p, int64_t row) {
  const int64_t t = load_target(p, row);
  if (t == p.ignore_index) return -1;
  if (C10_UNLIKELY(t < 0 || t >= p.classes)) {
    if (threadIdx.x == 0) {
      printf("torch_wsl.cross_entropy: expected target values to be class indices in [0, %lld) or ignore_index "
             "(%lld), got %lld at position %lld\n",
             static_cast<long long>(p.classes), static_cast<long long>(p.ignore_index), static_cast<long long>(t),
             static_cast<long long>(row));
    }
    CUDA_KERNEL_ASSERT(false && "torch_wsl.cross_entropy: target out of range");
  }
  return t;
}

template <bool kCap, typename acc_t>
__device__ __forceinline__ acc_t capped(acc_t v, acc_t cap, acc_t inv_cap) {
  return kCap ? cm::softcap(v, cap, inv_cap) : v;
}

template <typename acc_t>
__device__ __forceinline__ cm::MaxSum<acc_t> shfl_xor_state(cm::MaxSum<acc_t> st, int offset) {
  return {__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset)};
}

// Merges the block's log-sum-exp states (and sums `lin`); every thread gets
// the totals. Every thread of the block must call it; blockDim.x whole warps.
template <typename acc_t>
__device__ __forceinline__ void block_merge(cm::MaxSum<acc_t>& st, acc_t& lin, acc_t* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) st = cm::merge(st, shfl_xor_state(st, offset));
  lin = gpu::warp_sum(lin);
  __syncthreads();  // `shared` may still be read by an earlier call
  if (lane == 0) {
    shared[warp] = st.m;
    shared[kMaxWarps + warp] = st.s;
    shared[2 * kMaxWarps + warp] = lin;
  }
  __syncthreads();
  st = lane < warps ? cm::MaxSum<acc_t>{shared[lane], shared[kMaxWarps + lane]}
                    : cm::MaxSum<acc_t>{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  lin = lane < warps ? shared[2 * kMaxWarps + lane] : acc_t(0);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) st = cm::merge(st, shfl_xor_state(st, offset));
  lin = gpu::warp_sum(lin);
}

template <typename T>
__device__ __forceinline__ uintptr_t address_of(const T* p) {
  return p != nullptr ? reinterpret_cast<uintptr_t>(p) : uintptr_t{0};
}

template <typename acc_t>
struct RowStats {
  acc_t lse;
  acc_t z_target;
  acc_t ref;
  acc_t lin;
};

// One pass over the row (all threads of the block): its log-sum-exp, the
// target's logit and the smoothing sum.
template <typename scalar_t, bool kCap, int kSmooth>
__device__ __forceinline__ RowStats<acc_type_t<scalar_t>> row_stats(const RowParams<scalar_t>& p,
                                                                     const scalar_t* x, const RowSplit& split,
                                                                     int64_t target, acc_type_t<scalar_t>* shared) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  RowStats<acc_t> r;
  r.ref = kSmooth != kNoSmooth ? cm::smoothing_reference(capped<kCap>(static_cast<acc_t>(x[0]), p.cap, p.inv_cap))
                               : acc_t(0);
  // Read before any thread could overwrite the row (the in-place kernel).
  r.z_target = capped<kCap>(static_cast<acc_t>(x[target]), p.cap, p.inv_cap);
  cm::MaxSum<acc_t> st{kNegInf, acc_t(0)};
  acc_t lin = 0;
  for_row<VEC>(split, p.classes, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
               [&](auto width, int64_t i) {
                 constexpr int W = decltype(width)::value;
                 acc_t z[W];
                 gpu::load<W>(x + i, z);
                 acc_t mx = kNegInf;
#pragma unroll
                 for (int k = 0; k < W; ++k) {
                   z[k] = capped<kCap>(z[k], p.cap, p.inv_cap);
                   mx = (z[k] != z[k] || z[k] > mx) ? z[k] : mx;
                   if constexpr (kSmooth == kUniformSmooth) lin += z[k] - r.ref;
                   if constexpr (kSmooth == kWeightedSmooth) lin += p.weight[i + k] * (z[k] - r.ref);
                 }
                 const acc_t m_new = (st.m != st.m || st.m > mx) ? st.m : mx;
                 if (m_new == kNegInf) return;  // only -inf so far
                 acc_t s = st.s == acc_t(0) ? acc_t(0) : st.s * cm::exp(st.m - m_new);
#pragma unroll
                 for (int k = 0; k < W; ++k) s += cm::exp(z[k] - m_new);
                 st = {m_new, s};
               });
  block_merge(st, lin, shared);
  r.lse = cm::lse_of(st);
  r.lin = lin;
  return r;
}

// Writes the row's gradient (ignored rows: target < 0, zeros). x and g may
// be the same row: each thread reads and writes only its own elements.
template <typename scalar_t, bool kCap, int kSmooth>
__device__ __forceinline__ void row_grad(const RowParams<scalar_t>& p, const scalar_t* x, scalar_t* g,
                                         const RowSplit& split, int64_t target, acc_type_t<scalar_t> lse,
                                         acc_type_t<scalar_t> z_target, acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const acc_t weight_sum = p.weight_sum != nullptr ? *p.weight_sum : static_cast<acc_t>(p.classes);
  const acc_t w_t = target >= 0 && p.weight != nullptr ? p.weight[target] : acc_t(1);
  const cm::RowTerms<acc_t> terms = cm::row_terms(w_t, p.smoothing, p.classes, weight_sum);
  const acc_t prob_s = target >= 0 ? scale * terms.prob_coef : acc_t(0);
  const acc_t smooth_s = target >= 0 ? scale * terms.smooth_coef : acc_t(0);
  const acc_t target_fix =
      target >= 0 ? -scale * terms.target_coef * (kCap ? cm::softcap_slope(z_target, p.inv_cap) : acc_t(1))
                  : acc_t(0);
  for_row<VEC>(split, p.classes, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
               [&](auto width, int64_t i) {
                 constexpr int W = decltype(width)::value;
                 acc_t v[W];
                 if (target < 0) {
#pragma unroll
                   for (int k = 0; k < W; ++k) v[k] = acc_t(0);
                 } else {
                   gpu::load<W>(x + i, v);
#pragma unroll
                   for (int k = 0; k < W; ++k) {
                     const acc_t z = capped<kCap>(v[k], p.cap, p.inv_cap);
                     const acc_t sm = kSmooth == kWeightedSmooth ? smooth_s * p.weight[i + k] : smooth_s;
                     acc_t gk = cm::logit_grad(cm::exp(z - lse), prob_s, sm);
                     if constexpr (kCap) gk *= cm::softcap_slope(z, p.inv_cap);
                     if (i + k == target) gk += target_fix;
                     v[k] = gk;
                   }
                 }
                 gpu::store<W>(g + i, v);
               });
}

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_of(const scalar_t* a, const scalar_t* b, int64_t classes) {
  const uintptr_t addrs[2] = {address_of(a), address_of(b)};
  return split_row_at<16 / sizeof(scalar_t), sizeof(scalar_t)>(addrs, classes);
}

// Forward: per-row loss, lse and target weight (acc), for the finishing kernel.
template <typename scalar_t, bool kCap, int kSmooth>
__global__ void __launch_bounds__(kMaxThreads)
    ce_forward_kernel(RowParams<scalar_t> p, acc_type_t<scalar_t>* __restrict__ loss,
                      acc_type_t<scalar_t>* __restrict__ lse, acc_type_t<scalar_t>* __restrict__ row_weight) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[3 * kMaxWarps];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t t = checked_target(p, row);
    if (t < 0) {
      if (threadIdx.x == 0) {
        loss[row] = 0;
        lse[row] = 0;
        if (row_weight != nullptr) row_weight[row] = 0;
      }
      continue;
    }
    const scalar_t* x = p.logits + row * p.row_stride;
    const RowSplit split = split_of<scalar_t>(x, nullptr, p.classes);
    const RowStats<acc_t> st = row_stats<scalar_t, kCap, kSmooth>(p, x, split, t, shared);
    if (threadIdx.x == 0) {
      const acc_t weight_sum = p.weight_sum != nullptr ? *p.weight_sum : static_cast<acc_t>(p.classes);
      const acc_t w_t = p.weight != nullptr ? p.weight[t] : acc_t(1);
      const cm::RowTerms<acc_t> terms = cm::row_terms(w_t, p.smoothing, p.classes, weight_sum);
      loss[row] = cm::row_loss(terms, st.lse, st.z_target, st.ref, weight_sum, st.lin);
      lse[row] = st.lse;
      if (row_weight != nullptr) row_weight[row] = w_t;
    }
  }
}

template <typename scale_t, typename acc_t>
__device__ __forceinline__ acc_t row_scale(const scale_t* scale, bool per_row, const acc_t* divisor, int64_t row) {
  const acc_t s = static_cast<acc_t>(scale[per_row ? row : 0]);
  return divisor != nullptr ? s / *divisor : s;
}

template <typename scalar_t, typename scale_t, bool kCap, int kSmooth>
__global__ void __launch_bounds__(kMaxThreads)
    ce_backward_kernel(RowParams<scalar_t> p, const acc_type_t<scalar_t>* __restrict__ lse,
                       const scale_t* __restrict__ scale, bool per_row, const acc_type_t<scalar_t>* divisor,
                       scalar_t* __restrict__ grad, int64_t grad_row_stride) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t t = checked_target(p, row);
    const scalar_t* x = p.logits + row * p.row_stride;
    scalar_t* g = grad + row * grad_row_stride;
    const RowSplit split = split_of<scalar_t>(x, g, p.classes);
    acc_t s = 0, z_t = 0, l = 0;
    if (t >= 0) {
      s = row_scale(scale, per_row, divisor, row);
      z_t = capped<kCap>(static_cast<acc_t>(x[t]), p.cap, p.inv_cap);
      l = lse[row];
    }
    row_grad<scalar_t, kCap, kSmooth>(p, x, g, split, t, l, z_t, s);
  }
}

template <typename scalar_t, typename scale_t, bool kCap, int kSmooth>
__global__ void __launch_bounds__(kMaxThreads)
    ce_loss_grad_kernel(RowParams<scalar_t> p, scalar_t* logits, const scale_t* __restrict__ scale, bool per_row,
                        const acc_type_t<scalar_t>* divisor, acc_type_t<scalar_t>* __restrict__ loss) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[3 * kMaxWarps];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t t = checked_target(p, row);
    scalar_t* x = logits + row * p.row_stride;
    const RowSplit split = split_of<scalar_t>(x, nullptr, p.classes);
    if (t < 0) {
      if (threadIdx.x == 0) loss[row] = 0;
      row_grad<scalar_t, kCap, kSmooth>(p, x, x, split, t, 0, 0, 0);
      continue;
    }
    const RowStats<acc_t> st = row_stats<scalar_t, kCap, kSmooth>(p, x, split, t, shared);
    if (threadIdx.x == 0) {
      const acc_t weight_sum = p.weight_sum != nullptr ? *p.weight_sum : static_cast<acc_t>(p.classes);
      const acc_t w_t = p.weight != nullptr ? p.weight[t] : acc_t(1);
      const cm::RowTerms<acc_t> terms = cm::row_terms(w_t, p.smoothing, p.classes, weight_sum);
      loss[row] = cm::row_loss(terms, st.lse, st.z_target, st.ref, weight_sum, st.lin);
    }
    row_grad<scalar_t, kCap, kSmooth>(p, x, x, split, t, st.lse, st.z_target, row_scale(scale, per_row, divisor, row));
  }
}

// One block: the reduced loss (or per-row losses in the output dtype) and the total weight.
template <typename scalar_t>
__global__ void __launch_bounds__(kFinishThreads)
    ce_finish_kernel(const acc_type_t<scalar_t>* __restrict__ loss_rows, const acc_type_t<scalar_t>* __restrict__ row_weight,
                     int64_t rows, int reduction, scalar_t* __restrict__ loss_out,
                     acc_type_t<scalar_t>* __restrict__ total_weight) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[2 * (kFinishThreads / 32)];
  acc_t sum = 0, weight = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    if (reduction == static_cast<int>(Reduction::kNone)) loss_out[i] = static_cast<scalar_t>(loss_rows[i]);
    sum += loss_rows[i];
    weight += row_weight[i];
  }
  gpu::block_sum2<kFinishThreads>(sum, weight, shared);
  if (threadIdx.x == 0) {
    *total_weight = weight;
    if (reduction == static_cast<int>(Reduction::kMean)) loss_out[0] = static_cast<scalar_t>(sum / weight);
    if (reduction == static_cast<int>(Reduction::kSum)) loss_out[0] = static_cast<scalar_t>(sum);
  }
}

// hi/lo: the upper and lower 16 bits of float32 sums (see cpu::SplitAccumulateArgs).
template <typename add_t>
__global__ void split_accumulate_kernel(uint16_t* __restrict__ hi, uint16_t* __restrict__ lo,
                                        const add_t* __restrict__ add, int64_t n, bool zero_first) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    float sum = static_cast<float>(add[j]);
    if (!zero_first) sum += __uint_as_float((static_cast<uint32_t>(hi[j]) << 16) | lo[j]);
    const uint32_t u = __float_as_uint(sum);
    hi[j] = static_cast<uint16_t>(u >> 16);
    lo[j] = static_cast<uint16_t>(u & 0xffffu);
  }
}

template <typename out_t>
__global__ void split_finish_kernel(uint16_t* hi, const uint16_t* __restrict__ lo, int64_t n) {
  out_t* out = reinterpret_cast<out_t*>(hi);  // element j overwrites hi[j] after reading it
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float v = __uint_as_float((static_cast<uint32_t>(hi[j]) << 16) | lo[j]);
    out[j] = static_cast<out_t>(v);
  }
}

// ---------------------------------------------------------------- launch

int threads_for(int64_t classes, int vec) {
  const int64_t groups = (classes + vec - 1) / vec;
  const int64_t warps = std::clamp<int64_t>((groups + 63) / 64, 1, kMaxWarps);  // ~2 groups per thread
  return static_cast<int>(warps * 32);
}

int64_t blocks_for(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxBlocks)); }

template <typename scalar_t>
RowParams<scalar_t> row_params(const CeRows& r) {
  using acc_t = acc_type_t<scalar_t>;
  RowParams<scalar_t> p{};
  p.logits = r.logits.const_data_ptr<scalar_t>();
  p.row_stride = r.rows > 0 ? r.logits.stride(0) : r.classes;
  p.target = r.target.const_data_ptr();
  p.target_int32 = r.target.scalar_type() == at::kInt;
  p.ignore_index = r.ignore_index;
  p.weight = r.weight.defined() ? r.weight.const_data_ptr<acc_t>() : nullptr;
  p.weight_sum = r.weight_sum.defined() ? r.weight_sum.const_data_ptr<acc_t>() : nullptr;
  p.rows = r.rows;
  p.classes = r.classes;
  p.smoothing = static_cast<acc_t>(r.label_smoothing);
  p.cap = static_cast<acc_t>(r.softcap);
  p.inv_cap = r.softcap > 0 ? acc_t(1) / static_cast<acc_t>(r.softcap) : acc_t(0);
  return p;
}

// Calls fn(scalar_t{}, cap_tag, smooth_tag) for the rows' dtype and options.
template <typename Fn>
void dispatch_rows(const CeRows& r, const char* name, Fn&& fn) {
  const int smooth = r.label_smoothing == 0.0 ? kNoSmooth : (r.weight.defined() ? kWeightedSmooth : kUniformSmooth);
  visit_float_dtype(r.logits.scalar_type(), name, [&](auto s_tag) {
    using scalar_t = decltype(s_tag);
    auto with_cap = [&](auto cap_tag) {
      switch (smooth) {
        case kNoSmooth: fn(scalar_t{}, cap_tag, std::integral_constant<int, kNoSmooth>{}); break;
        case kUniformSmooth: fn(scalar_t{}, cap_tag, std::integral_constant<int, kUniformSmooth>{}); break;
        default: fn(scalar_t{}, cap_tag, std::integral_constant<int, kWeightedSmooth>{}); break;
      }
    };
    if (r.softcap > 0) {
      with_cap(std::true_type{});
    } else {
      with_cap(std::false_type{});
    }
  });
}

// Calls fn(scale_t{}) with the scale's dtype: the logits' own or the
// accumulation type; any other is converted to the accumulation type first.
template <typename scalar_t, typename Fn>
void dispatch_scale(Tensor& scale, Fn&& fn) {
  using acc_t = acc_type_t<scalar_t>;
  if (scale.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    fn(scalar_t{});
    return;
  }
  if (scale.scalar_type() != c10::CppTypeToScalarType<acc_t>::value) {
    scale = scale.to(c10::CppTypeToScalarType<acc_t>::value);
  }
  fn(acc_t{});
}

struct CudaCrossEntropyBackend {
  // The kernels assert on device (see the top of this file).
  static void check_targets(const char*, const Tensor&, int64_t, int64_t) {}

  static Tensor valid_count(const Tensor& target, int64_t ignore_index, at::ScalarType dtype) {
    return at::sum(at::ne(target, ignore_index), dtype);
  }

  static void forward(const CeRows& r, CeForwardOut& o) {
    const c10::cuda::OptionalCUDAGuard guard(r.logits.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    Tensor loss_rows = at::empty({r.rows}, o.lse.options());
    Tensor row_weight = at::empty({r.rows}, o.lse.options());
    dispatch_rows(r, "torch_wsl.cross_entropy_cuda", [&](auto s_tag, auto cap_tag, auto smooth_tag) {
      using scalar_t = decltype(s_tag);
      using acc_t = acc_type_t<scalar_t>;
      if (r.rows > 0) {
        const RowParams<scalar_t> p = row_params<scalar_t>(r);
        ce_forward_kernel<scalar_t, decltype(cap_tag)::value, decltype(smooth_tag)::value>
            <<<static_cast<unsigned>(blocks_for(r.rows)), threads_for(r.classes, 16 / sizeof(scalar_t)), 0, stream>>>(
                p, loss_rows.mutable_data_ptr<acc_t>(), o.lse.mutable_data_ptr<acc_t>(),
                row_weight.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // Also for no rows: the total weight (0) and the reduced loss (nan for a mean, 0 for a sum).
      ce_finish_kernel<scalar_t><<<1, kFinishThreads, 0, stream>>>(
          loss_rows.const_data_ptr<acc_t>(), row_weight.const_data_ptr<acc_t>(), r.rows,
          static_cast<int>(o.reduction), o.loss.mutable_data_ptr<scalar_t>(), o.total_weight.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void row_losses(const CeRows& r, Tensor& losses) {
    if (r.rows == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(r.logits.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    Tensor lse = at::empty({r.rows}, losses.options());
    dispatch_rows(r, "torch_wsl.cross_entropy_rows_cuda", [&](auto s_tag, auto cap_tag, auto smooth_tag) {
      using scalar_t = decltype(s_tag);
      using acc_t = acc_type_t<scalar_t>;
      const RowParams<scalar_t> p = row_params<scalar_t>(r);
      ce_forward_kernel<scalar_t, decltype(cap_tag)::value, decltype(smooth_tag)::value>
          <<<static_cast<unsigned>(blocks_for(r.rows)), threads_for(r.classes, 16 / sizeof(scalar_t)), 0, stream>>>(
              p, losses.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward(const CeRows& r, const CeScale& s, const Tensor& lse, Tensor& grad) {
    if (r.rows == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(r.logits.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    Tensor scale = s.scale;
    dispatch_rows(r, "torch_wsl.cross_entropy_backward_cuda", [&](auto s_tag, auto cap_tag, auto smooth_tag) {
      using scalar_t = decltype(s_tag);
      using acc_t = acc_type_t<scalar_t>;
      const RowParams<scalar_t> p = row_params<scalar_t>(r);
      const acc_t* divisor = s.divisor.defined() ? s.divisor.const_data_ptr<acc_t>() : nullptr;
      dispatch_scale<scalar_t>(scale, [&](auto scale_tag) {
        using scale_t = decltype(scale_tag);
        ce_backward_kernel<scalar_t, scale_t, decltype(cap_tag)::value, decltype(smooth_tag)::value>
            <<<static_cast<unsigned>(blocks_for(r.rows)), threads_for(r.classes, 16 / sizeof(scalar_t)), 0, stream>>>(
                p, lse.const_data_ptr<acc_t>(), scale.const_data_ptr<scale_t>(), s.per_row, divisor,
                grad.mutable_data_ptr<scalar_t>(), grad.stride(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void loss_grad(const CeRows& r, const CeScale& s, Tensor& losses) {
    if (r.rows == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(r.logits.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    Tensor scale = s.scale;
    Tensor logits = r.logits;
    dispatch_rows(r, "torch_wsl.cross_entropy_loss_grad_cuda", [&](auto s_tag, auto cap_tag, auto smooth_tag) {
      using scalar_t = decltype(s_tag);
      using acc_t = acc_type_t<scalar_t>;
      const RowParams<scalar_t> p = row_params<scalar_t>(r);
      const acc_t* divisor = s.divisor.defined() ? s.divisor.const_data_ptr<acc_t>() : nullptr;
      dispatch_scale<scalar_t>(scale, [&](auto scale_tag) {
        using scale_t = decltype(scale_tag);
        ce_loss_grad_kernel<scalar_t, scale_t, decltype(cap_tag)::value, decltype(smooth_tag)::value>
            <<<static_cast<unsigned>(blocks_for(r.rows)), threads_for(r.classes, 16 / sizeof(scalar_t)), 0, stream>>>(
                p, logits.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<scale_t>(), s.per_row, divisor,
                losses.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void split_accumulate(Tensor& hi, Tensor& lo, const Tensor& add, bool zero_first) {
    const int64_t n = hi.numel();
    if (n == 0) return;
    TORCH_CHECK(hi.is_contiguous() && lo.is_contiguous() && add.is_contiguous(),
                "torch_wsl: internal error: split float32 sums need contiguous slabs");
    const c10::cuda::OptionalCUDAGuard guard(hi.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int threads = 256;
    const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 16));
    auto* h = static_cast<uint16_t*>(hi.mutable_data_ptr());
    auto* l = static_cast<uint16_t*>(lo.mutable_data_ptr());
    if (add.scalar_type() == at::kBFloat16) {
      split_accumulate_kernel<c10::BFloat16>
          <<<blocks, threads, 0, stream>>>(h, l, add.const_data_ptr<c10::BFloat16>(), n, zero_first);
    } else {
      split_accumulate_kernel<c10::Half>
          <<<blocks, threads, 0, stream>>>(h, l, add.const_data_ptr<c10::Half>(), n, zero_first);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void split_finish(Tensor& hi, const Tensor& lo, at::ScalarType out_dtype) {
    const int64_t n = hi.numel();
    if (n == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(hi.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int threads = 256;
    const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 16));
    auto* h = static_cast<uint16_t*>(hi.mutable_data_ptr());
    const auto* l = static_cast<const uint16_t*>(lo.const_data_ptr());
    if (out_dtype == at::kBFloat16) {
      split_finish_kernel<c10::BFloat16><<<blocks, threads, 0, stream>>>(h, l, n);
    } else {
      split_finish_kernel<c10::Half><<<blocks, threads, 0, stream>>>(h, l, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_wsl, CUDA, m) { register_cross_entropy_kernels<CudaCrossEntropyBackend>(m); }

}  // namespace torch_wsl
