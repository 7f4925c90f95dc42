// Vector memory access for the CUDA kernels, in one place: an aligned pack of
// N elements moved as one 16-byte access, loads that widen to the
// accumulation type and stores that narrow back, and the elementwise
// skeleton that walks a range in vector steps with a scalar tail.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dtypes.h"

namespace torch_wsl::gpu {

using torch_wsl::acc_type_t;

// N elements moved as one aligned access (16 bytes for the widths used).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Elements [i, i + N) as stored, in one access.
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

template <typename T, int N>
__device__ __forceinline__ void widen(const Pack<T, N>& in, acc_type_t<T> (&out)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<acc_type_t<T>>(in.v[k]);
}

// N elements at p, widened to the accumulation type (N == 1: a scalar access,
// any alignment; else p is aligned to the pack).
template <int N, typename T>
__device__ __forceinline__ void load(const T* p, acc_type_t<T> (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = static_cast<acc_type_t<T>>(*p);
  } else {
    widen(*reinterpret_cast<const Pack<T, N>*>(p), out);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const acc_type_t<T> (&in)[N]) {
  if constexpr (N == 1) {
    *p = static_cast<T>(in[0]);
  } else {
    Pack<T, N> v;
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T, N>*>(p) = v;
  }
}

// The elementwise skeleton: runs body(i, std::integral_constant<int, W>) over
// [begin, end) for the threads rank = first, first + stride, ...: groups of
// VEC elements (W == VEC) when `vector` (every pointer the body touches is
// 16-byte aligned at `begin`, and begin is a multiple of VEC), then single
// elements (W == 1). A block walking a chunk passes (threadIdx.x, blockDim.x);
// a grid-stride loop passes the global thread index and the grid's size.
template <int VEC, typename Body>
__device__ __forceinline__ void for_each_vec(int64_t begin, int64_t end, int64_t first, int64_t stride, bool vector,
                                             Body&& body) {
  int64_t tail = begin;
  if (vector) {
    const int64_t full = begin + (end - begin) / VEC * VEC;
    for (int64_t i = begin + first * VEC; i < full; i += stride * VEC) body(i, std::integral_constant<int, VEC>{});
    tail = full;
  }
  for (int64_t i = tail + first; i < end; i += stride) body(i, std::integral_constant<int, 1>{});
}

// Blocks of `threads` for a grid-stride elementwise launch over n elements
// (VEC per thread per step): enough to fill the GPU, never more than the work.
inline int64_t elementwise_blocks(int64_t n, int vec, int threads, int sm_count) {
  const int64_t per_block = static_cast<int64_t>(threads) * vec;
  const int64_t needed = (n + per_block - 1) / per_block;
  const int64_t fill = static_cast<int64_t>(sm_count) * 8;
  return needed < 1 ? 1 : (needed < fill ? needed : fill);
}

}  // namespace torch_wsl::gpu
