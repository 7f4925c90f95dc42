// Fused multi-tensor optimizer and gradient-clipping CUDA kernels and their
// registration. The arithmetic is optim_math.h's, shared with the CPU
// kernels; argument checks and staging are optim.h's, shared with the CPU
// registration.
//
// A step never synchronizes with the host: lr (as a tensor), grad_scale,
// found_inf, the step counts and the total norm are read by the kernels from
// device memory. Launches per call: Adam(W) one per batch of ~70 tensors (see
// multi_tensor_apply.cuh) plus one that advances the step counts; SGD one per
// batch of ~100 tensors; total_norm one per batch of ~190 tensors plus one
// final reduction; clip_grads_with_norm_ one per batch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda/vec_io.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "optim.h"
#include "optim_math.h"

namespace torch_wsl {
namespace {

namespace om = torch_wsl::optim_math;
using gpu::for_each_batch;
using gpu::kChunk;
using gpu::kThreads;
using gpu::TensorBatch;

using gpu::aligned16;
using gpu::load;
using gpu::Pack;
using gpu::store;
using gpu::widen;

// The chunk of the tensor this block works on.
struct BlockChunk {
  int t;
  int64_t begin;
  int64_t end;
};

template <int kLists>
__device__ __forceinline__ BlockChunk block_chunk(const TensorBatch<kLists>& batch) {
  const auto b = static_cast<int32_t>(blockIdx.x);
  const int t = gpu::tensor_of_block(batch, b);
  const int64_t begin = static_cast<int64_t>(b - batch.first_block[t]) * kChunk;
  const int64_t end = begin + kChunk < batch.numel[t] ? begin + kChunk : batch.numel[t];
  return {t, begin, end};
}

__device__ __forceinline__ bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// ---------------------------------------------------------------------- Adam

struct AdamHyper {
  double lr;
  const float* lr_ptr;  // when set, lr is read here
  double beta1, beta2, weight_decay, eps;
  const float* grad_scale;  // when set, grads are unscaled and written back
  const float* found_inf;   // when set and nonzero, the step is skipped
  bool maximize, decoupled;
};

// The tensors of one Adam(W) chunk.
template <typename scalar_t>
struct AdamPtrs {
  scalar_t* p;
  scalar_t* g;
  scalar_t* m;
  scalar_t* v;
  scalar_t* vmax;  // null unless amsgrad
};

// N elements of each tensor as stored: loads can be issued early and held in
// as few registers as the storage needs (half the acc_t registers for
// half/bfloat16), widened only when they are used.
template <typename scalar_t, int N>
struct AdamRaw {
  Pack<scalar_t, N> p, g, m, v, vmax;
};

template <int N, bool kAmsgrad, typename scalar_t>
__device__ __forceinline__ void adam_load(AdamRaw<scalar_t, N>& r, const AdamPtrs<scalar_t>& t, int64_t i) {
  r.p = *reinterpret_cast<const Pack<scalar_t, N>*>(t.p + i);
  r.g = *reinterpret_cast<const Pack<scalar_t, N>*>(t.g + i);
  r.m = *reinterpret_cast<const Pack<scalar_t, N>*>(t.m + i);
  r.v = *reinterpret_cast<const Pack<scalar_t, N>*>(t.v + i);
  if constexpr (kAmsgrad) r.vmax = *reinterpret_cast<const Pack<scalar_t, N>*>(t.vmax + i);
}

// Unscales (and writes back) the gradients when asked, updates, stores.
template <int N, bool kAmsgrad, typename scalar_t, typename acc_t>
__device__ __forceinline__ void adam_apply(const AdamRaw<scalar_t, N>& r, const AdamPtrs<scalar_t>& t, int64_t i,
                                           const om::AdamCoeffs<acc_t>& c, bool unscale, acc_t grad_scale) {
  acc_t pv[N], gv[N], mv[N], vv[N], xv[N] = {};
  widen(r.p, pv);
  widen(r.g, gv);
  widen(r.m, mv);
  widen(r.v, vv);
  if constexpr (kAmsgrad) widen(r.vmax, xv);
  if (unscale) {
#pragma unroll
    for (int k = 0; k < N; ++k) gv[k] = gv[k] / grad_scale;
    store<N>(t.g + i, gv);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) om::adam_update(pv[k], gv[k], mv[k], vv[k], xv[k], c);
  store<N>(t.p + i, pv);
  store<N>(t.m + i, mv);
  store<N>(t.v + i, vv);
  if constexpr (kAmsgrad) store<N>(t.vmax + i, xv);
}

// Lists: params, grads, exp_avgs, exp_avg_sqs, [max_exp_avg_sqs,] state_steps.
//
// The bias corrections are double-precision pow/div/sqrt, slow on the GPUs
// with little FP64 that WSL2 users mostly have, and they need the step count,
// which lives in device memory (reading it on the host would synchronize, and
// a pre-pass kernel would cost a launch). So each block computes them once,
// without serializing: every thread first issues the loads of its first
// vector group; then warp 0 computes the two powers at once, lane 0 with
// beta1 (step_size) and lane 1 with beta2 (sqrt of the second correction),
// through optim_math's own adam_step_scalars, so the values are bit-identical
// to it; lane 0 publishes the coefficients in shared memory. The other warps
// wait at the barrier with their loads in flight, so the power's latency
// overlaps memory latency instead of adding to it. (Per warp instead of per
// block would remove the barrier but multiply the FP64 work by the warps per
// block, which costs more on those GPUs than the barrier.)
//
// The early return below is taken by the whole block or none of it, so the
// barrier is safe. The step count is incremented after this kernel
// (advance_steps_kernel).
template <typename scalar_t, int kLists>
__global__ void __launch_bounds__(kThreads) adam_kernel(const __grid_constant__ TensorBatch<kLists> batch,
                                                        const AdamHyper h) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kAmsgrad = kLists == 6;
  constexpr int VEC = gpu::vec_width<scalar_t>();
  static_assert(kThreads % 32 == 0, "warp 0 computes the coefficients; the block must be whole warps");
  if (skip_step(h.found_inf)) return;
  const BlockChunk ch = block_chunk(batch);
  AdamPtrs<scalar_t> t;
  t.p = static_cast<scalar_t*>(batch.ptr[0][ch.t]);
  t.g = static_cast<scalar_t*>(batch.ptr[1][ch.t]);
  t.m = static_cast<scalar_t*>(batch.ptr[2][ch.t]);
  t.v = static_cast<scalar_t*>(batch.ptr[3][ch.t]);
  t.vmax = kAmsgrad ? static_cast<scalar_t*>(batch.ptr[4][ch.t]) : nullptr;
  const auto* step = static_cast<const float*>(batch.ptr[kLists - 1][ch.t]);

  // Groups of VEC elements with 16-byte accesses over [begin, full) when the
  // pointers are 16-byte aligned (chunk starts are multiples of VEC), then
  // single elements over [full, end).
  const bool vector =
      aligned16(t.p) && aligned16(t.g) && aligned16(t.m) && aligned16(t.v) && (!kAmsgrad || aligned16(t.vmax));
  const int64_t full = vector ? ch.begin + (ch.end - ch.begin) / VEC * VEC : ch.begin;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t first = ch.begin + static_cast<int64_t>(threadIdx.x) * VEC;
  const bool have_first = first < full;
  AdamRaw<scalar_t, VEC> first_raw;
  if (have_first) adam_load<VEC, kAmsgrad>(first_raw, t, first);
  const bool unscale = h.grad_scale != nullptr;
  const acc_t grad_scale = unscale ? static_cast<acc_t>(*h.grad_scale) : acc_t(1);

  __shared__ om::AdamCoeffs<acc_t> shared_coeffs;
  if (threadIdx.x < 32) {
    const int lane = static_cast<int>(threadIdx.x);
    const double lr = h.lr_ptr != nullptr ? static_cast<double>(*h.lr_ptr) : h.lr;
    const double beta = lane == 1 ? h.beta2 : h.beta1;
    // One pow per lane: adam_step_scalars's two powers have equal arguments here and fold into one.
    const om::AdamStepScalars mine = om::adam_step_scalars(lr, beta, beta, static_cast<double>(*step) + 1.0);
    const double bias_correction2_sqrt = __shfl_sync(0xffffffffu, mine.bias_correction2_sqrt, 1);
    if (lane == 0) {
      const om::AdamStepScalars s{mine.step_size, bias_correction2_sqrt};
      shared_coeffs =
          om::adam_coeffs<acc_t>(lr, h.beta1, h.beta2, h.weight_decay, h.eps, kAmsgrad, h.maximize, h.decoupled, s);
    }
  }
  __syncthreads();
  const om::AdamCoeffs<acc_t> c = shared_coeffs;

  if (have_first) adam_apply<VEC, kAmsgrad>(first_raw, t, first, c, unscale, grad_scale);
  for (int64_t i = first + stride; i < full; i += stride) {
    AdamRaw<scalar_t, VEC> r;
    adam_load<VEC, kAmsgrad>(r, t, i);
    adam_apply<VEC, kAmsgrad>(r, t, i, c, unscale, grad_scale);
  }
  for (int64_t i = full + threadIdx.x; i < ch.end; i += blockDim.x) {
    AdamRaw<scalar_t, 1> r;
    adam_load<1, kAmsgrad>(r, t, i);
    adam_apply<1, kAmsgrad>(r, t, i, c, unscale, grad_scale);
  }
}

// Step counts advance after the update kernels have read them.
constexpr int kMaxSteps = (gpu::kArgBudgetBytes - 64) / 8;
struct StepBatch {
  float* steps[kMaxSteps];
  int32_t count;
};

__global__ void advance_steps_kernel(const __grid_constant__ StepBatch batch, const float* found_inf) {
  if (skip_step(found_inf)) return;
  for (int i = static_cast<int>(threadIdx.x); i < batch.count; i += static_cast<int>(blockDim.x)) {
    *batch.steps[i] += 1.0f;
  }
}

// ----------------------------------------------------------------------- SGD

struct SgdHyper {
  double lr;
  const float* lr_ptr;
  double momentum, dampening, weight_decay;
  const float* grad_scale;
  const float* found_inf;
  bool nesterov, maximize, first_step;
};

// Lists: params, grads[, momentum_buffers].
template <typename scalar_t, int kLists>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const __grid_constant__ TensorBatch<kLists> batch,
                                                       const SgdHyper h) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kMomentum = kLists == 3;
  if (skip_step(h.found_inf)) return;
  const BlockChunk ch = block_chunk(batch);
  auto* p = static_cast<scalar_t*>(batch.ptr[0][ch.t]);
  auto* g = static_cast<scalar_t*>(batch.ptr[1][ch.t]);
  auto* buf = kMomentum ? static_cast<scalar_t*>(batch.ptr[kLists - 1][ch.t]) : nullptr;
  const double lr = h.lr_ptr != nullptr ? static_cast<double>(*h.lr_ptr) : h.lr;
  const om::SgdCoeffs<acc_t> c = om::sgd_coeffs<acc_t>(lr, kMomentum ? h.momentum : 0.0, h.dampening,
                                                       h.weight_decay, h.nesterov, h.maximize, h.first_step);
  const bool unscale = h.grad_scale != nullptr;
  const acc_t grad_scale = unscale ? static_cast<acc_t>(*h.grad_scale) : acc_t(1);

  constexpr int VEC = gpu::vec_width<scalar_t>();
  const bool vector = aligned16(p) && aligned16(g) && (!kMomentum || aligned16(buf));
  gpu::for_each_vec<VEC>(ch.begin, ch.end, threadIdx.x, blockDim.x, vector, [&](int64_t i, auto width) {
    constexpr int N = decltype(width)::value;
    acc_t pv[N], gv[N], bv[N] = {};
    load<N>(p + i, pv);
    load<N>(g + i, gv);
    if constexpr (kMomentum) {
      if (!c.first_step) load<N>(buf + i, bv);
    }
    if (unscale) {
#pragma unroll
      for (int k = 0; k < N; ++k) gv[k] = gv[k] / grad_scale;
      store<N>(g + i, gv);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) om::sgd_update(pv[k], gv[k], bv[k], c);
    store<N>(p + i, pv);
    if constexpr (kMomentum) store<N>(buf + i, bv);
  });
}

// --------------------------------------------------------------------- norms

// Reduces v over the block with optim_math's norm_combine; every thread gets
// the result. Every thread of the block must call it. The block must be whole
// warps (the full-mask shuffles are undefined on a partial warp) and at most
// kBlockThreads, checked here at compile time; the kernels below are launched
// with exactly kThreads threads, a compile-time constant, so no host check is
// needed. `shared` holds kBlockThreads / 32 values.
template <int kBlockThreads, typename T>
__device__ __forceinline__ T block_combine(T v, om::NormOrder ord, T* shared) {
  static_assert(kBlockThreads % 32 == 0 && kBlockThreads >= 32 && kBlockThreads <= 1024,
                "block_combine: the block must be whole warps, at most 1024 threads");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = static_cast<int>(blockDim.x >> 5);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = om::norm_combine(v, __shfl_xor_sync(0xffffffffu, v, offset), ord);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : T(0);  // 0 is the identity of both sums and maxima of |x|
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = om::norm_combine(v, __shfl_xor_sync(0xffffffffu, v, offset), ord);
  return v;
}

// One partial result per block: partials[first_block + blockIdx.x].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) norm_partial_kernel(const __grid_constant__ TensorBatch<1> batch,
                                                                double* __restrict__ partials, int64_t first_block,
                                                                int norm_order) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[kThreads / 32];
  const auto ord = static_cast<om::NormOrder>(norm_order);
  const BlockChunk ch = block_chunk(batch);
  const auto* x = static_cast<const scalar_t*>(batch.ptr[0][ch.t]);
  acc_t acc = 0;
  constexpr int VEC = gpu::vec_width<scalar_t>();
  gpu::for_each_vec<VEC>(ch.begin, ch.end, threadIdx.x, blockDim.x, aligned16(x), [&](int64_t i, auto width) {
    constexpr int N = decltype(width)::value;
    acc_t xv[N];
    load<N>(x + i, xv);
#pragma unroll
    for (int k = 0; k < N; ++k) acc = om::norm_combine(acc, om::norm_term(xv[k], ord), ord);
  });
  acc = block_combine<kThreads>(acc, ord, shared);
  if (threadIdx.x == 0) partials[first_block + blockIdx.x] = static_cast<double>(acc);
}

// One block: the norm from all partials, written in the output dtype.
template <typename out_t>
__global__ void __launch_bounds__(kThreads) norm_finish_kernel(const double* __restrict__ partials, int64_t count,
                                                               out_t* __restrict__ out, int norm_order) {
  __shared__ double shared[kThreads / 32];
  const auto ord = static_cast<om::NormOrder>(norm_order);
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc = om::norm_combine(acc, partials[i], ord);
  acc = block_combine<kThreads>(acc, ord, shared);
  if (threadIdx.x == 0) *out = static_cast<out_t>(om::norm_finish(acc, ord));
}

// grads *= clip_coef(total_norm, max_norm), the coefficient computed per block
// from the total norm in device memory.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) clip_kernel(const __grid_constant__ TensorBatch<1> batch,
                                                        const void* total_norm, int total_kind, double max_norm) {
  using acc_t = acc_type_t<scalar_t>;
  double coef = 0.0;
  switch (total_kind) {  // the total norm's dtype sets the coefficient's precision, as in torch
    case 0: coef = om::clip_coef<float>(*static_cast<const float*>(total_norm), static_cast<float>(max_norm)); break;
    case 1: coef = om::clip_coef<double>(*static_cast<const double*>(total_norm), max_norm); break;
    case 2:
      coef = om::clip_coef<float>(static_cast<float>(*static_cast<const c10::Half*>(total_norm)),
                                  static_cast<float>(max_norm));
      break;
    default:
      coef = om::clip_coef<float>(static_cast<float>(*static_cast<const c10::BFloat16*>(total_norm)),
                                  static_cast<float>(max_norm));
      break;
  }
  const auto cf = static_cast<acc_t>(coef);
  const BlockChunk ch = block_chunk(batch);
  auto* x = static_cast<scalar_t*>(batch.ptr[0][ch.t]);
  constexpr int VEC = gpu::vec_width<scalar_t>();
  gpu::for_each_vec<VEC>(ch.begin, ch.end, threadIdx.x, blockDim.x, aligned16(x), [&](int64_t i, auto width) {
    constexpr int N = decltype(width)::value;
    acc_t xv[N];
    load<N>(x + i, xv);
#pragma unroll
    for (int k = 0; k < N; ++k) xv[k] = xv[k] * cf;
    store<N>(x + i, xv);
  });
}

// ------------------------------------------------------------------ host side

const float* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// The indices of `tensors` grouped by dtype (a kernel is built per dtype).
std::vector<std::pair<at::ScalarType, std::vector<size_t>>> by_dtype(const std::vector<Tensor>& tensors) {
  std::vector<std::pair<at::ScalarType, std::vector<size_t>>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::ScalarType d = tensors[i].scalar_type();
    auto it = groups.begin();
    while (it != groups.end() && it->first != d) ++it;
    if (it == groups.end()) {
      groups.push_back({d, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  return groups;
}

// Calls fn(scalar_t{}) for a storage dtype.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, "torch_wsl: optimizer CUDA kernel got unsupported dtype ", dtype);
  }
}

// lr for the kernels: a host value, or a float32 pointer into device memory.
void lr_args(double lr, const Tensor& lr_tensor, const at::Device& device, double& lr_out, const float*& lr_ptr,
             Tensor& keep_alive) {
  lr_out = lr;
  lr_ptr = nullptr;
  if (!lr_tensor.defined()) return;
  if (lr_tensor.device() != device) {  // a CPU tensor: read on the host, no synchronization
    lr_out = lr_tensor.item<double>();
    return;
  }
  keep_alive = lr_tensor.scalar_type() == at::kFloat ? lr_tensor : lr_tensor.to(at::kFloat);
  lr_ptr = keep_alive.const_data_ptr<float>();
}

struct CudaOptimBackend {
  static void adam(AdamCall& c) {
    if (c.steps.empty()) return;
    const at::Device device = c.steps[0].device();
    const c10::cuda::OptionalCUDAGuard guard(device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AdamHyper h{};
    Tensor lr_keep;
    lr_args(c.lr, c.lr_tensor, device, h.lr, h.lr_ptr, lr_keep);
    h.beta1 = c.beta1;
    h.beta2 = c.beta2;
    h.weight_decay = c.weight_decay;
    h.eps = c.eps;
    h.grad_scale = ptr_or_null(c.grad_scale);
    h.found_inf = ptr_or_null(c.found_inf);
    h.maximize = c.maximize;
    h.decoupled = c.decoupled_weight_decay;

    for (const auto& group : by_dtype(c.params)) {
      const at::ScalarType dtype = group.first;
      const std::vector<size_t>& idx = group.second;
      std::vector<int64_t> numels;
      numels.reserve(idx.size());
      for (const size_t i : idx) numels.push_back(c.params[i].numel());
      auto run = [&](auto lists_tag, auto scalar_tag) {
        constexpr int kLists = decltype(lists_tag)::value;
        using scalar_t = decltype(scalar_tag);
        std::vector<std::array<void*, kLists>> ptrs;
        ptrs.reserve(idx.size());
        for (const size_t i : idx) {
          std::array<void*, kLists> a{};
          a[0] = c.params[i].mutable_data_ptr();
          a[1] = c.grads[i].mutable_data_ptr();
          a[2] = c.exp_avgs[i].mutable_data_ptr();
          a[3] = c.exp_avg_sqs[i].mutable_data_ptr();
          if constexpr (kLists == 6) a[4] = c.max_exp_avg_sqs[i].mutable_data_ptr();
          a[kLists - 1] = c.work_steps[i].mutable_data_ptr();
          ptrs.push_back(a);
        }
        for_each_batch<kLists>(ptrs, numels, [&](const TensorBatch<kLists>& batch, int64_t blocks, int64_t) {
          adam_kernel<scalar_t, kLists><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, h);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      };
      dispatch_storage(dtype, [&](auto scalar_tag) {
        if (c.amsgrad) {
          run(std::integral_constant<int, 6>{}, scalar_tag);
        } else {
          run(std::integral_constant<int, 5>{}, scalar_tag);
        }
      });
    }
    // Every step advances (an empty parameter's too), after the updates read them.
    StepBatch steps{};
    auto flush = [&] {
      if (steps.count == 0) return;
      advance_steps_kernel<<<1, kThreads, 0, stream>>>(steps, h.found_inf);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      steps.count = 0;
    };
    for (Tensor& s : c.steps) {
      if (steps.count == kMaxSteps) flush();
      steps.steps[steps.count++] = s.mutable_data_ptr<float>();
    }
    flush();
  }

  static void sgd(SgdCall& c) {
    if (c.params.empty()) return;
    const at::Device device = c.params[0].device();
    const c10::cuda::OptionalCUDAGuard guard(device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    SgdHyper h{};
    Tensor lr_keep;
    lr_args(c.lr, c.lr_tensor, device, h.lr, h.lr_ptr, lr_keep);
    h.momentum = c.momentum;
    h.dampening = c.dampening;
    h.weight_decay = c.weight_decay;
    h.grad_scale = ptr_or_null(c.grad_scale);
    h.found_inf = ptr_or_null(c.found_inf);
    h.nesterov = c.nesterov;
    h.maximize = c.maximize;
    h.first_step = c.first_step;
    const bool momentum = !c.momentum_buffers.empty() && c.momentum != 0.0;
    for (const auto& group : by_dtype(c.params)) {
      const at::ScalarType dtype = group.first;
      const std::vector<size_t>& idx = group.second;
      std::vector<int64_t> numels;
      for (const size_t i : idx) numels.push_back(c.params[i].numel());
      auto run = [&](auto lists_tag, auto scalar_tag) {
        constexpr int kLists = decltype(lists_tag)::value;
        using scalar_t = decltype(scalar_tag);
        std::vector<std::array<void*, kLists>> ptrs;
        for (const size_t i : idx) {
          std::array<void*, kLists> a{};
          a[0] = c.params[i].mutable_data_ptr();
          a[1] = c.grads[i].mutable_data_ptr();
          if constexpr (kLists == 3) a[2] = c.momentum_buffers[i].mutable_data_ptr();
          ptrs.push_back(a);
        }
        for_each_batch<kLists>(ptrs, numels, [&](const TensorBatch<kLists>& batch, int64_t blocks, int64_t) {
          sgd_kernel<scalar_t, kLists><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, h);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      };
      dispatch_storage(dtype, [&](auto scalar_tag) {
        if (momentum) {
          run(std::integral_constant<int, 3>{}, scalar_tag);
        } else {
          run(std::integral_constant<int, 2>{}, scalar_tag);
        }
      });
    }
  }

  static Tensor total_norm(NormCall& c) {
    const c10::cuda::OptionalCUDAGuard guard(c.device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const auto opts = at::TensorOptions().device(c.device);
    Tensor out = at::empty({}, opts.dtype(c.out_dtype));
    int64_t total_blocks = 0;
    for (const Tensor& t : c.tensors) total_blocks += gpu::blocks_for(t.numel());
    Tensor partials = at::empty({total_blocks > 0 ? total_blocks : 1}, opts.dtype(at::kDouble));
    double* part = partials.mutable_data_ptr<double>();
    int64_t base = 0;
    for (const auto& group : by_dtype(c.tensors)) {
      const at::ScalarType dtype = group.first;
      const std::vector<size_t>& idx = group.second;
      std::vector<std::array<void*, 1>> ptrs;
      std::vector<int64_t> numels;
      for (const size_t i : idx) {
        ptrs.push_back({const_cast<void*>(c.tensors[i].const_data_ptr())});
        numels.push_back(c.tensors[i].numel());
      }
      dispatch_storage(dtype, [&](auto scalar_tag) {
        using scalar_t = decltype(scalar_tag);
        for_each_batch<1>(ptrs, numels, [&](const TensorBatch<1>& batch, int64_t blocks, int64_t first) {
          norm_partial_kernel<scalar_t>
              <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, part, base + first, c.norm_order);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
      for (const int64_t n : numels) base += gpu::blocks_for(n);
    }
    if (total_blocks == 0) {  // every tensor empty: the norm is 0
      out.zero_();
      return out;
    }
    dispatch_storage(c.out_dtype, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      norm_finish_kernel<out_t>
          <<<1, kThreads, 0, stream>>>(part, total_blocks, out.mutable_data_ptr<out_t>(), c.norm_order);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  static void clip(ClipCall& c) {
    if (c.grads.empty()) return;
    const c10::cuda::OptionalCUDAGuard guard(c.grads[0].device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const at::ScalarType td = c.total_norm.scalar_type();
    const int total_kind = td == at::kFloat ? 0 : td == at::kDouble ? 1 : td == at::kHalf ? 2 : 3;
    const void* total = c.total_norm.const_data_ptr();
    for (const auto& group : by_dtype(c.grads)) {
      const at::ScalarType dtype = group.first;
      const std::vector<size_t>& idx = group.second;
      std::vector<std::array<void*, 1>> ptrs;
      std::vector<int64_t> numels;
      for (const size_t i : idx) {
        ptrs.push_back({c.grads[i].mutable_data_ptr()});
        numels.push_back(c.grads[i].numel());
      }
      dispatch_storage(dtype, [&](auto scalar_tag) {
        using scalar_t = decltype(scalar_tag);
        for_each_batch<1>(ptrs, numels, [&](const TensorBatch<1>& batch, int64_t blocks, int64_t) {
          clip_kernel<scalar_t>
              <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, total, total_kind, c.max_norm);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_wsl, CUDA, m) { register_optim_kernels<CudaOptimBackend>(m); }

}  // namespace torch_wsl
