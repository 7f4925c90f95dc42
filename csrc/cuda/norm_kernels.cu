// LayerNorm / RMSNorm CUDA kernels and their registration. The arithmetic is
// norm_math.h's, shared with the CPU kernels; argument checks and output
// allocation are norm.h's, shared with the CPU registration.
//
// Forward and input-gradient kernels give one block to one row and accumulate
// in fp32 (fp64 for double). Rows are read with 16-byte vector loads over their
// aligned body, with scalar heads and tails (row_split.h), whenever the base
// pointers are 16-byte aligned; otherwise element by element. Weight/bias
// gradients use a two-stage reduction: per-tile partial sums over row groups,
// then a sum over groups.
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "build_info.h"
#include "cuda/block_reduce.cuh"
#include "cuda/types.cuh"
#include "dispatch.h"
#include "norm.h"
#include "norm_math.h"
#include "row_split.h"

namespace torch_wsl {

int cuda_runtime_version_built() { return CUDART_VERSION; }

namespace {

namespace nm = torch_wsl::norm_math;
using gpu::block_sum2;

using gpu::AccType;
using gpu::Pack;

template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[VEC]) {
  const auto packed = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = packed.v[k];
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[VEC]) {
  Pack<T, VEC> packed;
#pragma unroll
  for (int k = 0; k < VEC; ++k) packed.v[k] = in[k];
  *reinterpret_cast<Pack<T, VEC>*>(p) = packed;
}

template <typename param_t, typename acc_t>
__device__ __forceinline__ acc_t param_or(const param_t* p, int64_t i, acc_t fallback) {
  return p != nullptr ? static_cast<acc_t>(p[i]) : fallback;
}

// Reads elements [j, j + VEC) of the row that is normalized: the input, or
// the rounded sum input + residual. The sum is recomputed from the two inputs
// rather than re-read from residual_out: the inputs are read-only for the whole
// kernel (so the read-only cache path is legal) and the expression is the one
// that produced residual_out, so the values are bit-identical.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res, int64_t j,
                                         scalar_t (&v)[VEC]) {
  using acc_t = typename AccType<scalar_t>::type;
  load_vec<VEC>(x + j, v);
  if (res != nullptr) {
    scalar_t r[VEC];
    load_vec<VEC>(res + j, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<scalar_t>(static_cast<acc_t>(v[k]) + static_cast<acc_t>(r[k]));
  }
}

constexpr int kMaxRowThreads = 256;

template <int N>
using Width = std::integral_constant<int, N>;

// Calls body(Width<W>{}, i) for every element group of a row that starts at
// flat index `off`: VEC-wide groups over the aligned body, single elements
// over the head and tail. Every pass of a kernel walks the row the same way,
// so each thread touches the same elements in every pass.
template <int VEC, typename Body>
__device__ __forceinline__ void for_row(int64_t off, int64_t cols, Body&& body) {
  const RowSplit split = split_row<VEC>(off, cols);
  for (int64_t i = threadIdx.x; i < split.head_end; i += blockDim.x) body(Width<1>{}, i);
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t i = split.head_end + static_cast<int64_t>(threadIdx.x) * VEC; i < split.body_end; i += step) {
    body(Width<VEC>{}, i);
  }
  for (int64_t i = split.body_end + threadIdx.x; i < cols; i += blockDim.x) body(Width<1>{}, i);
}

// One block per row (grid-striding when there are more rows than blocks).
// Pass 1 forms the row, stores residual_out when fused, and sums the row
// (LayerNorm) or its squares (RMSNorm); LayerNorm's pass 2 sums squared
// deviations; the last pass writes the output. Later passes re-read the row,
// mostly from L2. VEC is the vector width when every base pointer is 16-byte
// aligned, else 1.
template <typename scalar_t, typename param_t, int VEC, bool kCenter>
__global__ void __launch_bounds__(kMaxRowThreads)
    norm_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                        const param_t* __restrict__ w, const param_t* __restrict__ b, scalar_t* __restrict__ y,
                        scalar_t* __restrict__ res_out, typename AccType<scalar_t>::type* __restrict__ mean_out,
                        typename AccType<scalar_t>::type* __restrict__ rstd_out, int64_t rows, int64_t cols,
                        typename AccType<scalar_t>::type eps) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t shared[64];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * cols;
    acc_t stat = 0, unused = 0;
    for_row<VEC>(off, cols, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      scalar_t v[W];
      load_row<W>(x, res, off + i, v);
      if (res != nullptr) store_vec<W>(res_out + off + i, v);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const acc_t a = static_cast<acc_t>(v[k]);
        stat += kCenter ? a : a * a;
      }
    });
    block_sum2(stat, unused, shared);
    acc_t mean = 0;
    acc_t sum_sq = stat;
    if constexpr (kCenter) {
      mean = cols > 0 ? stat / static_cast<acc_t>(cols) : acc_t(0);
      sum_sq = 0;
      unused = 0;
      for_row<VEC>(off, cols, [&](auto width, int64_t i) {
        constexpr int W = decltype(width)::value;
        scalar_t v[W];
        load_row<W>(x, res, off + i, v);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const acc_t d = static_cast<acc_t>(v[k]) - mean;
          sum_sq += d * d;
        }
      });
      block_sum2(sum_sq, unused, shared);
    }
    const acc_t rstd = nm::row_rstd(sum_sq, cols, eps);
    if (threadIdx.x == 0) {
      if (mean_out != nullptr) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

    for_row<VEC>(off, cols, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      scalar_t v[W];
      load_row<W>(x, res, off + i, v);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const acc_t xhat = nm::normalize(static_cast<acc_t>(v[k]), mean, rstd);
        v[k] = static_cast<scalar_t>(nm::affine(xhat, param_or(w, i + k, acc_t(1)), param_or(b, i + k, acc_t(0))));
      }
      store_vec<W>(y + off + i, v);
    });
  }
}

// Input gradient, one block per row (grid-striding).
template <typename scalar_t, typename param_t, int VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
    norm_backward_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ dres,
                               const scalar_t* __restrict__ x,
                               const typename AccType<scalar_t>::type* __restrict__ mean_in,
                               const typename AccType<scalar_t>::type* __restrict__ rstd_in,
                               const param_t* __restrict__ w, scalar_t* __restrict__ dx, int64_t rows, int64_t cols) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t shared[64];
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(cols);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * cols;
    const acc_t mean = mean_in != nullptr ? mean_in[row] : acc_t(0);
    const acc_t rstd = rstd_in[row];

    acc_t sum_gw = 0, sum_gw_xhat = 0;
    for_row<VEC>(off, cols, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      scalar_t xv[W], gv[W];
      load_vec<W>(x + off + i, xv);
      load_vec<W>(dy + off + i, gv);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const acc_t gw = static_cast<acc_t>(gv[k]) * param_or(w, i + k, acc_t(1));
        sum_gw += gw;
        sum_gw_xhat += gw * nm::normalize(static_cast<acc_t>(xv[k]), mean, rstd);
      }
    });
    block_sum2(sum_gw, sum_gw_xhat, shared);
    const acc_t mean_gw = mean_in != nullptr ? sum_gw * inv_n : acc_t(0);
    const acc_t mean_gw_xhat = sum_gw_xhat * inv_n;

    for_row<VEC>(off, cols, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      scalar_t xv[W], gv[W], pass[W];
      load_vec<W>(x + off + i, xv);
      load_vec<W>(dy + off + i, gv);
      if (dres != nullptr) load_vec<W>(dres + off + i, pass);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const acc_t gw = static_cast<acc_t>(gv[k]) * param_or(w, i + k, acc_t(1));
        const acc_t xhat = nm::normalize(static_cast<acc_t>(xv[k]), mean, rstd);
        acc_t g = nm::grad_input(gw, xhat, rstd, mean_gw, mean_gw_xhat);
        if (dres != nullptr) g += static_cast<acc_t>(pass[k]);
        gv[k] = static_cast<scalar_t>(g);
      }
      store_vec<W>(dx + off + i, gv);
    });
  }
}

constexpr int kTileCols = 32;
constexpr int kTileRows = 8;

// Stage 1 of the weight/bias gradients: block (tile of 32 columns, group of
// rows) writes partial sums of dy * xhat and dy to partial_{w,b}[group, col].
template <typename scalar_t>
__global__ void norm_param_grad_partial_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                               const typename AccType<scalar_t>::type* __restrict__ mean_in,
                                               const typename AccType<scalar_t>::type* __restrict__ rstd_in,
                                               typename AccType<scalar_t>::type* __restrict__ partial_w,
                                               typename AccType<scalar_t>::type* __restrict__ partial_b,
                                               int64_t rows, int64_t cols, int64_t rows_per_group) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t sw[kTileRows][kTileCols + 1];
  __shared__ acc_t sb[kTileRows][kTileCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r1 = r0 + rows_per_group < rows ? r0 + rows_per_group : rows;
  acc_t aw = 0, ab = 0;
  if (col < cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileRows) {
      const acc_t g = static_cast<acc_t>(dy[r * cols + col]);
      const acc_t mean = mean_in != nullptr ? mean_in[r] : acc_t(0);
      aw += g * nm::normalize(static_cast<acc_t>(x[r * cols + col]), mean, rstd_in[r]);
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int k = 1; k < kTileRows; ++k) {
      aw += sw[k][threadIdx.x];
      ab += sb[k][threadIdx.x];
    }
    if (partial_w != nullptr) partial_w[static_cast<int64_t>(blockIdx.y) * cols + col] = aw;
    if (partial_b != nullptr) partial_b[static_cast<int64_t>(blockIdx.y) * cols + col] = ab;
  }
}

// Stage 2: out[col] = sum over groups of partial[group, col].
template <typename acc_t>
__global__ void sum_groups_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t groups,
                                  int64_t cols) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  acc_t s = 0;
  for (int64_t g = 0; g < groups; ++g) s += partial[g * cols + col];
  out[col] = s;
}

// 16-byte vectors when every base pointer is 16-byte aligned (rows then
// split into a scalar head, vector body and scalar tail); else scalar.
template <typename scalar_t>
int vector_width(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return 16 / sizeof(scalar_t);
}

// Threads per row-block: enough to cover the row once with vectors, in whole
// warps, at least one warp and at most kMaxRowThreads (longer rows loop).
int row_threads(int64_t cols, int vec) {
  const int64_t vectors = (cols + vec - 1) / vec;
  const int64_t warps = (vectors + 31) / 32;
  const int64_t capped = std::max<int64_t>(1, std::min<int64_t>(warps, kMaxRowThreads / 32));
  return static_cast<int>(capped * 32);
}

// Blocks for the row kernels: one per row, up to a cap; the kernels stride
// over the rest.
unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, int64_t{1} << 20)); }

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Weight and bias must share one dtype: input's or the accumulation type.
void unify_params(Tensor& weight, Tensor& bias, at::ScalarType acc) {
  if (weight.defined() && bias.defined() && weight.scalar_type() != bias.scalar_type()) {
    weight = weight.to(acc);
    bias = bias.to(acc);
  }
}

struct CudaNormBackend {
  static void forward(NormForward& p) {
    if (p.rows == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(p.input.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const at::ScalarType acc = norm_acc_type(p.input.scalar_type());
    unify_params(p.weight, p.bias, acc);
    const Tensor& some_param = p.weight.defined() ? p.weight : p.bias;
    const bool params_in_acc = some_param.defined() && some_param.scalar_type() != p.input.scalar_type();
    TWSL_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "torch_wsl.norm_forward_cuda", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      auto launch = [&](auto param_tag) {
        using param_t = decltype(param_tag);
        const scalar_t* x = p.input.const_data_ptr<scalar_t>();
        const scalar_t* res = ptr_or_null<scalar_t>(p.residual);
        scalar_t* y = p.output.mutable_data_ptr<scalar_t>();
        scalar_t* res_out = p.residual_out.defined() ? p.residual_out.mutable_data_ptr<scalar_t>() : nullptr;
        acc_t* mean = p.mean.defined() ? p.mean.mutable_data_ptr<acc_t>() : nullptr;
        acc_t* rstd = p.rstd.mutable_data_ptr<acc_t>();
        const int vec = vector_width<scalar_t>({x, res, y, res_out});
        const int threads = row_threads(p.cols, vec);
        const unsigned grid = row_blocks(p.rows);
        const param_t* w = ptr_or_null<param_t>(p.weight);
        const param_t* b = ptr_or_null<param_t>(p.bias);
        const auto eps = static_cast<acc_t>(p.eps);
        constexpr int kVec = 16 / sizeof(scalar_t);
        auto go = [&](auto vec_tag, auto center_tag) {
          constexpr int V = decltype(vec_tag)::value;
          constexpr bool C = decltype(center_tag)::value;
          norm_forward_kernel<scalar_t, param_t, V, C>
              <<<grid, threads, 0, stream>>>(x, res, w, b, y, res_out, mean, rstd, p.rows, p.cols, eps);
        };
        using Vec = std::integral_constant<int, kVec>;
        using One = std::integral_constant<int, 1>;
        using Center = std::true_type;
        using NoCenter = std::false_type;
        if (vec == kVec) {
          p.center ? go(Vec{}, Center{}) : go(Vec{}, NoCenter{});
        } else {
          p.center ? go(One{}, Center{}) : go(One{}, NoCenter{});
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (params_in_acc) {
        launch(acc_t{});
      } else {
        launch(scalar_t{});
      }
    });
  }

  static void backward(NormBackward& p) {
    const c10::cuda::OptionalCUDAGuard guard(p.input.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool want_params = p.grad_weight.defined() || p.grad_bias.defined();
    if (p.rows == 0 || p.cols == 0) {
      if (p.grad_weight.defined()) p.grad_weight.zero_();
      if (p.grad_bias.defined()) p.grad_bias.zero_();
      return;
    }
    const bool params_in_acc = p.weight.defined() && p.weight.scalar_type() != p.input.scalar_type();
    TWSL_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "torch_wsl.norm_backward_cuda", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      const scalar_t* dy = p.grad_output.const_data_ptr<scalar_t>();
      const scalar_t* dres = ptr_or_null<scalar_t>(p.grad_residual_out);
      const scalar_t* x = p.input.const_data_ptr<scalar_t>();
      const acc_t* mean = ptr_or_null<acc_t>(p.mean);
      const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
      scalar_t* dx = p.grad_input.mutable_data_ptr<scalar_t>();

      auto launch_input = [&](auto param_tag) {
        using param_t = decltype(param_tag);
        const param_t* w = ptr_or_null<param_t>(p.weight);
        const int vec = vector_width<scalar_t>({dy, dres, x, dx});
        const int threads = row_threads(p.cols, vec);
        const unsigned grid = row_blocks(p.rows);
        constexpr int kVec = 16 / sizeof(scalar_t);
        if (vec == kVec) {
          norm_backward_input_kernel<scalar_t, param_t, kVec>
              <<<grid, threads, 0, stream>>>(dy, dres, x, mean, rstd, w, dx, p.rows, p.cols);
        } else {
          norm_backward_input_kernel<scalar_t, param_t, 1>
              <<<grid, threads, 0, stream>>>(dy, dres, x, mean, rstd, w, dx, p.rows, p.cols);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (params_in_acc) {
        launch_input(acc_t{});
      } else {
        launch_input(scalar_t{});
      }

      if (!want_params) return;
      const int64_t col_tiles = (p.cols + kTileCols - 1) / kTileCols;
      const int64_t groups = std::min<int64_t>((p.rows + 63) / 64, 64);
      const int64_t rows_per_group = (p.rows + groups - 1) / groups;
      acc_t* gw = p.grad_weight.defined() ? p.grad_weight.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* gb = p.grad_bias.defined() ? p.grad_bias.mutable_data_ptr<acc_t>() : nullptr;
      Tensor partial;
      acc_t* pw = gw;
      acc_t* pb = gb;
      if (groups > 1) {
        partial = at::empty({2, groups, p.cols}, p.rstd.options());
        pw = gw != nullptr ? partial[0].mutable_data_ptr<acc_t>() : nullptr;
        pb = gb != nullptr ? partial[1].mutable_data_ptr<acc_t>() : nullptr;
      }
      const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(groups));
      const dim3 block(kTileCols, kTileRows);
      norm_param_grad_partial_kernel<scalar_t>
          <<<grid, block, 0, stream>>>(dy, x, mean, rstd, pw, pb, p.rows, p.cols, rows_per_group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (groups > 1) {
        const auto blocks = static_cast<unsigned>((p.cols + 255) / 256);
        if (gw != nullptr) {
          sum_groups_kernel<acc_t><<<blocks, 256, 0, stream>>>(pw, gw, groups, p.cols);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (gb != nullptr) {
          sum_groups_kernel<acc_t><<<blocks, 256, 0, stream>>>(pb, gb, groups, p.cols);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_wsl, CUDA, m) { register_norm_kernels<CudaNormBackend>(m); }

}  // namespace torch_wsl
