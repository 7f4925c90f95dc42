// Warp- and block-wide sums for the row kernels (a warp or a block per row).
#pragma once

#include <cuda_runtime.h>

namespace torch_wsl::gpu {

// Sum over the 32 lanes of a warp; every lane gets it. All 32 lanes must call.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over the block; every thread gets the totals. Every thread of
// the block must call it (it holds two barriers).
//
// Assumes blockDim.x is a multiple of 32 and at most kMaxThreads (a multiple
// of 32, at most 1024): the full-mask shuffles are undefined on a partial warp
// and `shared` holds one slot per warp. kMaxThreads is checked here; the
// launch's actual block size is checked on the host with TORCH_CHECK (see
// the row kernels' launch code). `shared` holds 2 * (kMaxThreads / 32) values.
template <int kMaxThreads, typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b, T* shared) {
  static_assert(kMaxThreads % 32 == 0 && kMaxThreads >= 32 && kMaxThreads <= 1024,
                "block_sum2: the block size must be whole warps, at most 1024 threads");
  constexpr int kSlots = kMaxThreads / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // `shared` may still be read by an earlier call
  if (lane == 0) {
    shared[warp] = a;
    shared[kSlots + warp] = b;
  }
  __syncthreads();
  a = lane < warps ? shared[lane] : T(0);
  b = lane < warps ? shared[kSlots + lane] : T(0);
  a = warp_sum(a);
  b = warp_sum(b);
}

}  // namespace torch_wsl::gpu
