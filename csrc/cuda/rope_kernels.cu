// Rotary position embedding CUDA kernels and their registration. The
// arithmetic is rope_math.h's, shared with the CPU kernels; argument checks,
// output allocation and the row layout are rope.h's, shared with the CPU
// registration.
//
// One launch rotates every row of q and of k (forward, or the transposed
// rotation for the gradient). A team of T threads (a power of two up to a
// warp, sized to the row) takes one row: for rotate-half each thread holds
// VEC elements of the first half and their partners in the second; for the
// interleaved layout VEC neighbouring elements (VEC / 2 pairs); then the
// pass-through tail of a partial rotary is copied. 16-byte accesses
// (VEC = 16 / sizeof(T)) when every row start and half of every operand is
// 16-byte aligned, else element by element.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/vec_io.cuh"
#include "dtypes.h"
#include "rope.h"
#include "rope_math.h"

namespace torch_wsl {
namespace {

namespace rm = torch_wsl::rope_math;

constexpr int kBlockThreads = 256;

template <typename scalar_t>
struct GpuRows {
  rm::RowLayout layout;
  const scalar_t* x;
  scalar_t* y;
};

template <bool kBackward, typename T>
__device__ __forceinline__ void rotate_pair(T xa, T xb, T ca, T cb, T sa, T sb, T& ya, T& yb) {
  if constexpr (kBackward) {
    rm::backward_pair(xa, xb, ca, cb, sa, sb, ya, yb);
  } else {
    rm::forward_pair(xa, xb, ca, cb, sa, sb, ya, yb);
  }
}

// One row, by the team's thread `lane` of `team`.
template <typename scalar_t, int VEC, bool kBackward, bool kInterleaved>
__device__ __forceinline__ void rotate_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                           const scalar_t* __restrict__ c, const scalar_t* __restrict__ s,
                                           int64_t rotary, int64_t head_dim, int lane, int team) {
  using acc_t = acc_type_t<scalar_t>;
  if constexpr (!kInterleaved) {
    const int64_t half = rotary / 2;
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < half; j += static_cast<int64_t>(team) * VEC) {
      acc_t xa[VEC], xb[VEC], ca[VEC], cb[VEC], sa[VEC], sb[VEC], ya[VEC], yb[VEC];
      gpu::load<VEC>(x + j, xa);
      gpu::load<VEC>(x + half + j, xb);
      gpu::load<VEC>(c + j, ca);
      gpu::load<VEC>(c + half + j, cb);
      gpu::load<VEC>(s + j, sa);
      gpu::load<VEC>(s + half + j, sb);
#pragma unroll
      for (int v = 0; v < VEC; ++v) rotate_pair<kBackward>(xa[v], xb[v], ca[v], cb[v], sa[v], sb[v], ya[v], yb[v]);
      gpu::store<VEC>(y + j, ya);
      gpu::store<VEC>(y + half + j, yb);
    }
  } else if constexpr (VEC >= 2) {
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < rotary; j += static_cast<int64_t>(team) * VEC) {
      acc_t xv[VEC], cv[VEC], sv[VEC], yv[VEC];
      gpu::load<VEC>(x + j, xv);
      gpu::load<VEC>(c + j, cv);
      gpu::load<VEC>(s + j, sv);
#pragma unroll
      for (int v = 0; v < VEC; v += 2) {
        rotate_pair<kBackward>(xv[v], xv[v + 1], cv[v], cv[v + 1], sv[v], sv[v + 1], yv[v], yv[v + 1]);
      }
      gpu::store<VEC>(y + j, yv);
    }
  } else {  // element by element: one pair per step
    for (int64_t j = 2 * static_cast<int64_t>(lane); j < rotary; j += 2 * static_cast<int64_t>(team)) {
      acc_t ya, yb;
      rotate_pair<kBackward>(static_cast<acc_t>(x[j]), static_cast<acc_t>(x[j + 1]), static_cast<acc_t>(c[j]),
                             static_cast<acc_t>(c[j + 1]), static_cast<acc_t>(s[j]), static_cast<acc_t>(s[j + 1]),
                             ya, yb);
      y[j] = static_cast<scalar_t>(ya);
      y[j + 1] = static_cast<scalar_t>(yb);
    }
  }
  // Partial rotary: the rest of the row as it is (bits unchanged).
  for (int64_t j = rotary + static_cast<int64_t>(lane) * VEC; j < head_dim; j += static_cast<int64_t>(team) * VEC) {
    scalar_t raw[VEC];
    gpu::load_vec<VEC>(x + j, raw);
    gpu::store_vec<VEC>(y + j, raw);
  }
}

// Rows [0, q.rows) are q's, [q.rows, q.rows + k.rows) k's; a team of
// 2^team_log2 threads per row, blockDim.x / team rows per block, grid-stride.
template <typename scalar_t, int VEC, bool kBackward, bool kInterleaved>
__global__ void __launch_bounds__(kBlockThreads)
    rope_kernel(const GpuRows<scalar_t> q, const GpuRows<scalar_t> k, const scalar_t* __restrict__ cos,
                const scalar_t* __restrict__ sin, int64_t rotary, int team_log2) {
  const int team = 1 << team_log2;
  const int lane = static_cast<int>(threadIdx.x) & (team - 1);
  const int64_t rows_per_block = static_cast<int64_t>(blockDim.x) >> team_log2;
  const int64_t total = q.layout.rows + k.layout.rows;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> team_log2); r < total;
       r += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const bool is_q = r < q.layout.rows;
    const rm::RowOffsets o = is_q ? rm::row_offsets(q.layout, r) : rm::row_offsets(k.layout, r - q.layout.rows);
    const scalar_t* x = (is_q ? q.x : k.x) + o.x;
    scalar_t* y = (is_q ? q.y : k.y) + o.y;
    const int64_t head_dim = is_q ? q.layout.head_dim : k.layout.head_dim;
    rotate_row<scalar_t, VEC, kBackward, kInterleaved>(x, y, cos + o.cos, sin + o.sin, rotary, head_dim, lane, team);
  }
}

// Whether every row start, half and pass-through start of every operand
// falls on a 16-byte boundary.
bool can_vectorize(const RopeProblem& p, int vec) {
  if (!gpu::aligned16(p.cos.const_data_ptr()) || !gpu::aligned16(p.sin.const_data_ptr())) return false;
  if (p.rotary_dim % (p.interleaved ? vec : 2 * vec) != 0) return false;
  for (const RopeOperand* o : {&p.q, &p.k}) {
    const rm::RowLayout& l = o->layout;
    if (l.rows == 0) continue;
    if (!gpu::aligned16(o->input.const_data_ptr()) || !gpu::aligned16(o->output.const_data_ptr())) return false;
    if (l.head_dim % vec != 0) return false;
    for (int i = 0; i < l.ndim; ++i) {
      if (l.x_stride[i] % vec != 0 || l.y_stride[i] % vec != 0 || l.cos_stride[i] % vec != 0 ||
          l.sin_stride[i] % vec != 0) {
        return false;
      }
    }
  }
  return true;
}

// log2 of the team: enough threads for the longest of a row's loops.
int team_log2_for(const RopeProblem& p, int vec) {
  int64_t steps = 1;
  for (const RopeOperand* o : {&p.q, &p.k}) {
    if (o->layout.rows == 0) continue;
    const int64_t rotate_steps =
        p.interleaved ? (vec >= 2 ? p.rotary_dim / vec : p.rotary_dim / 2) : (p.rotary_dim / 2 + vec - 1) / vec;
    const int64_t pass_steps = (o->layout.head_dim - p.rotary_dim + vec - 1) / vec;
    steps = std::max({steps, rotate_steps, pass_steps});
  }
  int lg = 0;
  while (lg < 5 && (int64_t{1} << lg) < steps) ++lg;
  return lg;
}

template <typename scalar_t>
GpuRows<scalar_t> gpu_rows(const RopeOperand& o) {
  GpuRows<scalar_t> r{o.layout, nullptr, nullptr};
  if (o.layout.rows > 0) {
    r.x = o.input.const_data_ptr<scalar_t>();
    r.y = o.output.mutable_data_ptr<scalar_t>();
  }
  return r;
}

struct CudaRopeBackend {
  static void apply(RopeProblem& p) {
    const int64_t total = p.rows();
    if (total == 0) return;
    const c10::cuda::OptionalCUDAGuard guard(p.cos.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TORCH_WSL_DISPATCH_FLOATING_TYPES(p.cos.scalar_type(), "torch_wsl.apply_rotary_pos_emb_cuda", [&] {
      constexpr int kVec = gpu::vec_width<scalar_t>();
      const GpuRows<scalar_t> q = gpu_rows<scalar_t>(p.q);
      const GpuRows<scalar_t> k = gpu_rows<scalar_t>(p.k);
      const scalar_t* cos = p.cos.const_data_ptr<scalar_t>();
      const scalar_t* sin = p.sin.const_data_ptr<scalar_t>();
      auto launch = [&](auto vec_tag, auto backward_tag, auto interleaved_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        const int team_log2 = team_log2_for(p, VEC);
        const int64_t rows_per_block = kBlockThreads >> team_log2;
        const int64_t blocks = std::min<int64_t>((total + rows_per_block - 1) / rows_per_block, int64_t{1} << 30);
        rope_kernel<scalar_t, VEC, decltype(backward_tag)::value, decltype(interleaved_tag)::value>
            <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(q, k, cos, sin, p.rotary_dim, team_log2);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      using Yes = std::true_type;
      using No = std::false_type;
      auto with_layout = [&](auto vec_tag, auto backward_tag) {
        p.interleaved ? launch(vec_tag, backward_tag, Yes{}) : launch(vec_tag, backward_tag, No{});
      };
      auto with_direction = [&](auto vec_tag) {
        p.backward ? with_layout(vec_tag, Yes{}) : with_layout(vec_tag, No{});
      };
      if (can_vectorize(p, kVec)) {
        with_direction(std::integral_constant<int, kVec>{});
      } else {
        with_direction(std::integral_constant<int, 1>{});
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_wsl, CUDA, m) { register_rope_kernels<CudaRopeBackend>(m); }

}  // namespace torch_wsl
