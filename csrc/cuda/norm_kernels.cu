// LayerNorm / RMSNorm CUDA kernels and their registration. The arithmetic is
// norm_math.h's, shared with the CPU kernels; argument checks and output
// allocation are norm.h's, shared with the CPU registration.
//
// Forward and input-gradient kernels accumulate in fp32 (fp64 for double) and
// give each row a team of threads: a warp for rows of at most
// kWarpRowMaxCols elements (kWarpRowsPerBlock rows per block, shuffle
// reductions only), else a block (shuffles, then shared memory across warps);
// the launch geometry is norm_launch.h's, tested on CPU.
// Rows are read with 16-byte vector loads over their aligned body, with scalar
// heads and tails (row_split.h's split_row_at), whenever every tensor walked
// together is misaligned by the same byte offset; otherwise element by element.
// Weight/bias gradients use a two-stage reduction: per-tile partial sums over
// row groups (about 4 blocks per SM), then a sum over groups.
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "build_info.h"
#include "cuda/block_reduce.cuh"
#include "cuda/norm_launch.h"
#include "cuda/vec_io.cuh"
#include "dtypes.h"
#include "norm.h"
#include "norm_math.h"
#include "row_split.h"

namespace torch_wsl {

int cuda_runtime_version_built() { return CUDART_VERSION; }

namespace {

namespace nm = torch_wsl::norm_math;
using gpu::block_sum2;

using gpu::load_vec;
using gpu::store_vec;

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
  using acc_t = acc_type_t<scalar_t>;
  load_vec<VEC>(x + j, v);
  if (res != nullptr) {
    scalar_t r[VEC];
    load_vec<VEC>(res + j, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<scalar_t>(static_cast<acc_t>(v[k]) + static_cast<acc_t>(r[k]));
  }
}

using norm_launch::kMaxRowThreads;
using norm_launch::kTileCols;
using norm_launch::kTileRows;

// The threads that share a row and the rows they visit. kWarpPerRow: lane
// `rank` of warp w of block b takes rows b * warps + w, then strides by
// gridDim.x * warps (warps = blockDim.x / 32); the loop over rows is
// warp-uniform, so the full-mask shuffles see the whole warp and no barrier
// is needed. Else: thread `rank` of block b takes rows b, b + gridDim.x, ...;
// the loop is block-uniform, as block_sum2's barriers require. Either way
// blockDim.x must be whole warps (checked at launch).
template <bool kWarpPerRow>
struct RowTeam {
  int rank;
  int size;
  int64_t first;
  int64_t step;

  __device__ __forceinline__ RowTeam() {
    if constexpr (kWarpPerRow) {
      const int warps = static_cast<int>(blockDim.x >> 5);
      rank = static_cast<int>(threadIdx.x & 31);
      size = 32;
      first = static_cast<int64_t>(blockIdx.x) * warps + static_cast<int64_t>(threadIdx.x >> 5);
      step = static_cast<int64_t>(gridDim.x) * warps;
    } else {
      rank = static_cast<int>(threadIdx.x);
      size = static_cast<int>(blockDim.x);
      first = blockIdx.x;
      step = gridDim.x;
    }
  }

  // Sums over the team; every member gets the totals. `shared` is the block
  // reduction's scratch (unused per warp).
  template <typename T>
  __device__ __forceinline__ void sum2(T& a, T& b, T* shared) const {
    if constexpr (kWarpPerRow) {
      a = gpu::warp_sum(a);
      b = gpu::warp_sum(b);
    } else {
      block_sum2<kMaxRowThreads>(a, b, shared);
    }
  }
  template <typename T>
  __device__ __forceinline__ void sum(T& a, T* shared) const {
    if constexpr (kWarpPerRow) {
      a = gpu::warp_sum(a);
    } else {
      T unused = 0;
      block_sum2<kMaxRowThreads>(a, unused, shared);
    }
  }
};

// Scratch of block_sum2<kMaxRowThreads>.
constexpr int kRowShared = 2 * (kMaxRowThreads / 32);

// Byte address of element `off` of a tensor, 0 for an absent one.
template <typename T>
__device__ __forceinline__ uintptr_t address_of(const T* base, int64_t off) {
  return base != nullptr ? reinterpret_cast<uintptr_t>(base + off) : uintptr_t{0};
}

// The split of one row (row_split.h) for the tensors a kernel walks together
// at flat offset `off`: a vector body when they share their misalignment,
// else all scalar.
template <typename scalar_t, int N>
__device__ __forceinline__ RowSplit row_split_of(const scalar_t* const (&ptrs)[N], int64_t off, int64_t cols) {
  uintptr_t addrs[N];
#pragma unroll
  for (int k = 0; k < N; ++k) addrs[k] = address_of(ptrs[k], off);
  return split_row_at<16 / sizeof(scalar_t), sizeof(scalar_t)>(addrs, cols);
}

// One team per row (grid-striding when there are more rows than teams).
// Pass 1 forms the row, stores residual_out when fused, and sums the row
// (LayerNorm) or its squares (RMSNorm); LayerNorm's pass 2 sums squared
// deviations; the last pass writes the output. Later passes re-read the row,
// mostly from L1/L2.
template <typename scalar_t, typename param_t, bool kCenter, bool kWarpPerRow>
__global__ void __launch_bounds__(kMaxRowThreads)
    norm_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                        const param_t* __restrict__ w, const param_t* __restrict__ b, scalar_t* __restrict__ y,
                        scalar_t* __restrict__ res_out, acc_type_t<scalar_t>* __restrict__ mean_out,
                        acc_type_t<scalar_t>* __restrict__ rstd_out, int64_t rows, int64_t cols,
                        acc_type_t<scalar_t> eps, bool round_xhat) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  __shared__ acc_t shared[kRowShared];
  const RowTeam<kWarpPerRow> team;
  for (int64_t row = team.first; row < rows; row += team.step) {
    const int64_t off = row * cols;
    const scalar_t* const walked[4] = {x, res, y, res_out};
    const RowSplit split = row_split_of(walked, off, cols);
    acc_t stat = 0;
    for_row<VEC>(split, cols, team.rank, team.size, [&](auto width, int64_t i) {
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
    team.sum(stat, shared);
    acc_t mean = 0;
    acc_t sum_sq = stat;
    if constexpr (kCenter) {
      mean = cols > 0 ? stat / static_cast<acc_t>(cols) : acc_t(0);
      sum_sq = 0;
      for_row<VEC>(split, cols, team.rank, team.size, [&](auto width, int64_t i) {
        constexpr int W = decltype(width)::value;
        scalar_t v[W];
        load_row<W>(x, res, off + i, v);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const acc_t d = static_cast<acc_t>(v[k]) - mean;
          sum_sq += d * d;
        }
      });
      team.sum(sum_sq, shared);
    }
    const acc_t rstd = nm::row_rstd(sum_sq, cols, eps);
    if (team.rank == 0) {
      if (mean_out != nullptr) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

    for_row<VEC>(split, cols, team.rank, team.size, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      scalar_t v[W];
      load_row<W>(x, res, off + i, v);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        acc_t xhat = nm::normalize(static_cast<acc_t>(v[k]), mean, rstd);
        if (round_xhat) xhat = static_cast<acc_t>(static_cast<scalar_t>(xhat));  // casting_mode "llama"
        v[k] = static_cast<scalar_t>(nm::affine(xhat, param_or(w, i + k, acc_t(1)), param_or(b, i + k, acc_t(0))));
      }
      store_vec<W>(y + off + i, v);
    });
  }
}

// Input gradient, one team per row (grid-striding). cols > 0.
template <typename scalar_t, typename param_t, bool kWarpPerRow>
__global__ void __launch_bounds__(kMaxRowThreads)
    norm_backward_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ dres,
                               const scalar_t* __restrict__ x,
                               const acc_type_t<scalar_t>* __restrict__ mean_in,
                               const acc_type_t<scalar_t>* __restrict__ rstd_in,
                               const param_t* __restrict__ w, scalar_t* __restrict__ dx, int64_t rows, int64_t cols) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  __shared__ acc_t shared[kRowShared];
  const RowTeam<kWarpPerRow> team;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(cols);
  for (int64_t row = team.first; row < rows; row += team.step) {
    const int64_t off = row * cols;
    const scalar_t* const walked[4] = {dy, dres, x, dx};
    const RowSplit split = row_split_of(walked, off, cols);
    const acc_t mean = mean_in != nullptr ? mean_in[row] : acc_t(0);
    const acc_t rstd = rstd_in[row];

    acc_t sum_gw = 0, sum_gw_xhat = 0;
    for_row<VEC>(split, cols, team.rank, team.size, [&](auto width, int64_t i) {
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
    team.sum2(sum_gw, sum_gw_xhat, shared);
    const acc_t mean_gw = mean_in != nullptr ? sum_gw * inv_n : acc_t(0);
    const acc_t mean_gw_xhat = sum_gw_xhat * inv_n;

    for_row<VEC>(split, cols, team.rank, team.size, [&](auto width, int64_t i) {
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

// The weight/bias tiles' last step: thread row 0 adds up what every thread
// row of its column accumulated (aw, ab updated in place); true on row 0.
// Every thread of the block must call it (it has a barrier).
template <typename acc_t>
__device__ __forceinline__ bool combine_tile_rows(acc_t (&sw)[kTileRows][kTileCols + 1],
                                                  acc_t (&sb)[kTileRows][kTileCols + 1], acc_t& aw, acc_t& ab) {
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y != 0) return false;
  for (int k = 1; k < kTileRows; ++k) {
    aw += sw[k][threadIdx.x];
    ab += sb[k][threadIdx.x];
  }
  return true;
}

// Stage 1 of the weight/bias gradients: block (tile of 32 columns, group of
// rows) writes partial sums of dy * xhat and dy to partial_{w,b}[group, col].
// Launched with blockDim (kTileCols, kTileRows).
template <typename scalar_t>
__global__ void __launch_bounds__(kTileCols * kTileRows)
    norm_param_grad_partial_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   const acc_type_t<scalar_t>* __restrict__ mean_in,
                                   const acc_type_t<scalar_t>* __restrict__ rstd_in,
                                   acc_type_t<scalar_t>* __restrict__ partial_w,
                                   acc_type_t<scalar_t>* __restrict__ partial_b, int64_t rows,
                                   int64_t cols, int64_t rows_per_group, bool round_xhat) {
  using acc_t = acc_type_t<scalar_t>;
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
      acc_t xhat = nm::normalize(static_cast<acc_t>(x[r * cols + col]), mean, rstd_in[r]);
      if (round_xhat) xhat = static_cast<acc_t>(static_cast<scalar_t>(xhat));  // as the forward rounded it
      aw += g * xhat;
      ab += g;
    }
  }
  if (combine_tile_rows(sw, sb, aw, ab) && col < cols) {
    if (partial_w != nullptr) partial_w[static_cast<int64_t>(blockIdx.y) * cols + col] = aw;
    if (partial_b != nullptr) partial_b[static_cast<int64_t>(blockIdx.y) * cols + col] = ab;
  }
}

// Stage 2, weight and bias in one launch: out_{w,b}[col] = sum over groups of
// partial_{w,b}[group, col] (a null partial has a null out). Block = tile of
// kTileCols columns; its kTileRows thread rows take every kTileRows-th group,
// then combine through shared memory. Launched with blockDim (kTileCols, kTileRows).
template <typename acc_t>
__global__ void __launch_bounds__(kTileCols * kTileRows)
    sum_groups_kernel(const acc_t* __restrict__ partial_w, const acc_t* __restrict__ partial_b,
                      acc_t* __restrict__ out_w, acc_t* __restrict__ out_b, int64_t groups, int64_t cols) {
  __shared__ acc_t sw[kTileRows][kTileCols + 1];
  __shared__ acc_t sb[kTileRows][kTileCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  acc_t aw = 0, ab = 0;
  if (col < cols) {
    for (int64_t g = threadIdx.y; g < groups; g += kTileRows) {
      if (partial_w != nullptr) aw += partial_w[g * cols + col];
      if (partial_b != nullptr) ab += partial_b[g * cols + col];
    }
  }
  if (combine_tile_rows(sw, sb, aw, ab) && col < cols) {
    if (out_w != nullptr) out_w[col] = aw;
    if (out_b != nullptr) out_b[col] = ab;
  }
}

// Whether the row kernels can vectorize: every base pointer walked together
// shares its misalignment modulo 16 bytes (then so does every row's start, as
// all tensors advance by the same row stride). Decides only the block size of
// block-per-row launches; the kernels split each row themselves.
template <typename scalar_t, int N>
bool can_vectorize(const scalar_t* const (&ptrs)[N]) {
  uintptr_t addrs[N];
  for (int k = 0; k < N; ++k) addrs[k] = reinterpret_cast<uintptr_t>(ptrs[k]);
  return common_misalignment<16 / sizeof(scalar_t), sizeof(scalar_t)>(addrs) >= 0;
}

// The current device's SM count, queried once per device. (ATen's cached
// getDeviceProperties lives in ATen/cuda/CUDAContext.h, which needs the
// cuSPARSE/cuBLAS headers that a CUDA toolkit without them lacks.)
int64_t sm_count() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};  // 0: not queried yet
  const c10::DeviceIndex device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "torch_wsl: CUDA device index ", int{device},
              " out of range");
  std::atomic<int>& slot = cache[static_cast<size_t>(device)];
  int sms = slot.load(std::memory_order_relaxed);
  if (sms == 0) {  // two threads may both query; they store the same value
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    sms = std::max(sms, 1);
    slot.store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Geometry of a row-kernel launch (norm_launch.h), checked against what the
// kernels' reductions assume: warp shuffles with a full mask and
// block_sum2<kMaxRowThreads>'s one slot per warp need whole warps, at most
// kMaxRowThreads.
template <typename scalar_t, int N>
norm_launch::RowGeometry row_launch(int64_t rows, int64_t cols, const scalar_t* const (&walked)[N]) {
  const int vec = can_vectorize(walked) ? static_cast<int>(16 / sizeof(scalar_t)) : 1;
  const norm_launch::RowGeometry g = norm_launch::row_geometry(rows, cols, vec);
  TORCH_CHECK(g.threads % 32 == 0 && g.threads >= 32 && g.threads <= kMaxRowThreads,
              "torch_wsl: internal error: norm row kernel block of ", g.threads,
              " threads is not a whole number of warps up to ", kMaxRowThreads);
  TORCH_CHECK(g.blocks > 0 && g.blocks <= norm_launch::kMaxRowBlocks,
              "torch_wsl: internal error: norm row kernel grid of ", g.blocks, " blocks for ", rows, " rows");
  return g;
}

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
    const at::ScalarType acc = acc_scalar_type(p.input.scalar_type());
    unify_params(p.weight, p.bias, acc);
    const Tensor& some_param = p.weight.defined() ? p.weight : p.bias;
    const bool params_in_acc = some_param.defined() && some_param.scalar_type() != p.input.scalar_type();
    TORCH_WSL_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "torch_wsl.norm_forward_cuda", [&] {
      using acc_t = acc_type_t<scalar_t>;
      auto launch = [&](auto param_tag) {
        using param_t = decltype(param_tag);
        const scalar_t* x = p.input.const_data_ptr<scalar_t>();
        const scalar_t* res = ptr_or_null<scalar_t>(p.residual);
        scalar_t* y = p.output.mutable_data_ptr<scalar_t>();
        scalar_t* res_out = p.residual_out.defined() ? p.residual_out.mutable_data_ptr<scalar_t>() : nullptr;
        acc_t* mean = p.mean.defined() ? p.mean.mutable_data_ptr<acc_t>() : nullptr;
        acc_t* rstd = p.rstd.mutable_data_ptr<acc_t>();
        const scalar_t* const walked[4] = {x, res, y, res_out};
        const norm_launch::RowGeometry l = row_launch(p.rows, p.cols, walked);
        const param_t* w = ptr_or_null<param_t>(p.weight);
        const param_t* b = ptr_or_null<param_t>(p.bias);
        const auto eps = static_cast<acc_t>(p.eps);
        auto go = [&](auto center_tag, auto warp_tag) {
          constexpr bool C = decltype(center_tag)::value;
          constexpr bool kWarp = decltype(warp_tag)::value;
          norm_forward_kernel<scalar_t, param_t, C, kWarp>
              <<<static_cast<unsigned>(l.blocks), l.threads, 0, stream>>>(x, res, w, b, y, res_out, mean, rstd, p.rows, p.cols, eps,
                                                                           p.round_xhat);
        };
        using Yes = std::true_type;
        using No = std::false_type;
        if (l.warp_per_row) {
          p.center ? go(Yes{}, Yes{}) : go(No{}, Yes{});
        } else {
          p.center ? go(Yes{}, No{}) : go(No{}, No{});
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
    TORCH_WSL_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "torch_wsl.norm_backward_cuda", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const scalar_t* dy = p.grad_output.const_data_ptr<scalar_t>();
      const scalar_t* dres = ptr_or_null<scalar_t>(p.grad_residual_out);
      const scalar_t* x = p.input.const_data_ptr<scalar_t>();
      const acc_t* mean = ptr_or_null<acc_t>(p.mean);
      const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
      scalar_t* dx = p.grad_input.mutable_data_ptr<scalar_t>();

      auto launch_input = [&](auto param_tag) {
        using param_t = decltype(param_tag);
        const param_t* w = ptr_or_null<param_t>(p.weight);
        const scalar_t* const walked[4] = {dy, dres, x, dx};
        const norm_launch::RowGeometry l = row_launch(p.rows, p.cols, walked);
        if (l.warp_per_row) {
          norm_backward_input_kernel<scalar_t, param_t, true>
              <<<static_cast<unsigned>(l.blocks), l.threads, 0, stream>>>(dy, dres, x, mean, rstd, w, dx, p.rows, p.cols);
        } else {
          norm_backward_input_kernel<scalar_t, param_t, false>
              <<<static_cast<unsigned>(l.blocks), l.threads, 0, stream>>>(dy, dres, x, mean, rstd, w, dx, p.rows, p.cols);
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
      TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "torch_wsl.norm_backward_cuda: ", p.cols,
                  " columns are too many for the weight-gradient grid");
      const norm_launch::RowGroups rg = norm_launch::param_grad_groups(p.rows, col_tiles, sm_count());
      acc_t* gw = p.grad_weight.defined() ? p.grad_weight.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* gb = p.grad_bias.defined() ? p.grad_bias.mutable_data_ptr<acc_t>() : nullptr;
      Tensor partial;
      acc_t* pw = gw;
      acc_t* pb = gb;
      if (rg.groups > 1) {
        partial = at::empty({2, rg.groups, p.cols}, p.rstd.options());
        pw = gw != nullptr ? partial[0].mutable_data_ptr<acc_t>() : nullptr;
        pb = gb != nullptr ? partial[1].mutable_data_ptr<acc_t>() : nullptr;
      }
      const dim3 block(kTileCols, kTileRows);
      norm_param_grad_partial_kernel<scalar_t>
          <<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(rg.groups)), block, 0, stream>>>(
              dy, x, mean, rstd, pw, pb, p.rows, p.cols, rg.rows_per_group, p.round_xhat);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (rg.groups > 1) {
        sum_groups_kernel<acc_t>
            <<<static_cast<unsigned>(col_tiles), block, 0, stream>>>(pw, pb, gw, gb, rg.groups, p.cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_wsl, CUDA, m) { register_norm_kernels<CudaNormBackend>(m); }

}  // namespace torch_wsl
