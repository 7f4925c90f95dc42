// Block-wide sums for kernels that give one thread block to one row.
#pragma once

#include <cuda_runtime.h>

namespace torch_wsl::gpu {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over the block (blockDim.x a multiple of 32, at most 1024);
// every thread gets the totals. `shared` holds 2 * 32 values.
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b, T* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // `shared` may still be read by an earlier call
  if (lane == 0) {
    shared[warp] = a;
    shared[32 + warp] = b;
  }
  __syncthreads();
  a = lane < warps ? shared[lane] : T(0);
  b = lane < warps ? shared[32 + lane] : T(0);
  a = warp_sum(a);
  b = warp_sum(b);
}

}  // namespace torch_wsl::gpu
