// Gated MLP activation CUDA kernels and their registration. The arithmetic is
// activation_math.h's, shared with the CPU kernels; argument checks, the
// [rows, cols] views and output allocation are activation.h's, shared with
// the CPU registration.
//
// Elementwise over [rows, cols] with a row stride per tensor: a team of
// threads walks each row (team = the whole grid for a single dense row,
// else 32 to 256 lanes, enough for the row's vectors), with 16-byte vector
// accesses over the body where every tensor of the row shares its
// misalignment (row_split.h's split_row_at: a scalar head up to the first
// column aligned for all, then whole vectors, then a scalar tail), element by
// element otherwise. Grid-stride over rows; one launch per call.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "activation.h"
#include "activation_math.h"
#include "cuda/vec_io.cuh"
#include "dtypes.h"
#include "row_split.h"

namespace torch_wsl {
namespace {

namespace am = torch_wsl::act_math;
using am::Activation;

constexpr int kThreads = 256;
// Enough resident blocks for any GPU WSL2 users run (8 per SM on up to 128
// SMs); the loops stride over whatever is left.
constexpr int64_t kMaxBlocks = 1024;

template <typename T>
__device__ __forceinline__ uintptr_t address_of(const T* p) {
  return reinterpret_cast<uintptr_t>(p);
}

// The threads that walk one row, and the rows they take: lane `rank` of team
// gid / team, rows first, first + teams, ... A team is whole warps of one
// block (team divides blockDim.x) or the whole grid (team == all threads).
struct RowTeam {
  int rank;
  int size;
  int64_t first;
  int64_t step;

  __device__ __forceinline__ explicit RowTeam(int64_t team) {
    const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
    rank = static_cast<int>(gid % team);
    size = static_cast<int>(team);
    first = gid / team;
    step = threads / team;
  }
};

template <Activation A, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gated_forward_kernel(const scalar_t* __restrict__ gate, const scalar_t* __restrict__ up, scalar_t* __restrict__ out,
                         int64_t gate_stride, int64_t up_stride, int64_t out_stride, int64_t rows, int64_t cols,
                         int64_t team) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = gpu::vec_width<scalar_t>();
  const RowTeam t(team);
  for (int64_t r = t.first; r < rows; r += t.step) {
    const scalar_t* g = gate + r * gate_stride;
    const scalar_t* u = up + r * up_stride;
    scalar_t* o = out + r * out_stride;
    const uintptr_t addrs[3] = {address_of(g), address_of(u), address_of(o)};
    const RowSplit split = split_row_at<VEC, sizeof(scalar_t)>(addrs, cols);
    for_row<VEC>(split, cols, t.rank, t.size, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      acc_t gv[W], uv[W], ov[W];
      gpu::load<W>(g + i, gv);
      gpu::load<W>(u + i, uv);
#pragma unroll
      for (int k = 0; k < W; ++k) ov[k] = am::gated_forward<A>(gv[k], uv[k]);
      gpu::store<W>(o + i, ov);
    });
  }
}

template <Activation A, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gated_backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ gate,
                          const scalar_t* __restrict__ up, scalar_t* __restrict__ grad_gate,
                          scalar_t* __restrict__ grad_up, int64_t dy_stride, int64_t gate_stride, int64_t up_stride,
                          int64_t grad_gate_stride, int64_t grad_up_stride, int64_t rows, int64_t cols, int64_t team) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = gpu::vec_width<scalar_t>();
  const RowTeam t(team);
  for (int64_t r = t.first; r < rows; r += t.step) {
    const scalar_t* d = grad_output + r * dy_stride;
    const scalar_t* g = gate + r * gate_stride;
    const scalar_t* u = up + r * up_stride;
    scalar_t* gg = grad_gate + r * grad_gate_stride;
    scalar_t* gu = grad_up + r * grad_up_stride;
    const uintptr_t addrs[5] = {address_of(d), address_of(g), address_of(u), address_of(gg), address_of(gu)};
    const RowSplit split = split_row_at<VEC, sizeof(scalar_t)>(addrs, cols);
    for_row<VEC>(split, cols, t.rank, t.size, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      acc_t dv[W], gv[W], uv[W], ggv[W], guv[W];
      gpu::load<W>(d + i, dv);
      gpu::load<W>(g + i, gv);
      gpu::load<W>(u + i, uv);
#pragma unroll
      for (int k = 0; k < W; ++k) am::gated_backward<A>(dv[k], gv[k], uv[k], ggv[k], guv[k]);
      gpu::store<W>(gg + i, ggv);
      gpu::store<W>(gu + i, guv);
    });
  }
}

// Blocks and row-team size: a single (dense) row is walked by the whole grid;
// other rows by the smallest power-of-two team of 32 to kThreads lanes that
// has a vector per lane, several rows per block when rows are short.
struct Launch {
  unsigned blocks;
  int64_t team;
};

Launch plan(int64_t rows, int64_t cols, int vec) {
  if (rows == 1) {
    const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
    const int64_t blocks = std::clamp<int64_t>((cols + per_block - 1) / per_block, 1, kMaxBlocks);
    return {static_cast<unsigned>(blocks), blocks * kThreads};
  }
  int64_t team = 32;
  while (team < kThreads && team * vec < cols) team *= 2;
  const int64_t rows_per_block = kThreads / team;
  const int64_t blocks = std::clamp<int64_t>((rows + rows_per_block - 1) / rows_per_block, 1, kMaxBlocks);
  return {static_cast<unsigned>(blocks), team};
}

template <typename Fn>
void dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
  }
}

struct CudaActivationBackend {
  static void forward(GatedForward& p) {
    if (p.rows == 0 || p.cols == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(p.gate.tensor.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TORCH_WSL_DISPATCH_FLOATING_TYPES(p.gate.tensor.scalar_type(), "torch_wsl.gated_forward_cuda", [&] {
      const Launch l = plan(p.rows, p.cols, gpu::vec_width<scalar_t>());
      dispatch_activation(p.act, [&](auto act_tag) {
        gated_forward_kernel<decltype(act_tag)::value, scalar_t><<<l.blocks, kThreads, 0, stream>>>(
            p.gate.tensor.const_data_ptr<scalar_t>(), p.up.tensor.const_data_ptr<scalar_t>(),
            p.out.tensor.mutable_data_ptr<scalar_t>(), p.gate.row_stride, p.up.row_stride, p.out.row_stride, p.rows,
            p.cols, l.team);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void backward(GatedBackward& p) {
    if (p.rows == 0 || p.cols == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(p.gate.tensor.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TORCH_WSL_DISPATCH_FLOATING_TYPES(p.gate.tensor.scalar_type(), "torch_wsl.gated_backward_cuda", [&] {
      const Launch l = plan(p.rows, p.cols, gpu::vec_width<scalar_t>());
      dispatch_activation(p.act, [&](auto act_tag) {
        gated_backward_kernel<decltype(act_tag)::value, scalar_t><<<l.blocks, kThreads, 0, stream>>>(
            p.grad_output.tensor.const_data_ptr<scalar_t>(), p.gate.tensor.const_data_ptr<scalar_t>(),
            p.up.tensor.const_data_ptr<scalar_t>(), p.grad_gate.tensor.mutable_data_ptr<scalar_t>(),
            p.grad_up.tensor.mutable_data_ptr<scalar_t>(), p.grad_output.row_stride, p.gate.row_stride,
            p.up.row_stride, p.grad_gate.row_stride, p.grad_up.row_stride, p.rows, p.cols, l.team);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_wsl, CUDA, m) { register_activation_kernels<CudaActivationBackend>(m); }

}  // namespace torch_wsl
