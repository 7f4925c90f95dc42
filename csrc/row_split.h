// How a row of a contiguous [rows, cols] tensor is split for vector access:
// a scalar head up to the first element whose address is aligned for VEC-wide
// loads, a body of whole vectors, and a scalar tail. Used by the CUDA row
// kernels; kept here, free of CUDA, so the index arithmetic is tested on CPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"

// Keeps the loop that follows rolled under nvcc; nothing for host compilers.
#if defined(__CUDACC__)
#define TORCH_WSL_NO_UNROLL _Pragma("unroll 1")
#else
#define TORCH_WSL_NO_UNROLL
#endif

namespace torch_wsl {

struct RowSplit {
  int64_t head_end;  // [0, head_end): scalar head
  int64_t body_end;  // [head_end, body_end): whole vectors; [body_end, cols): scalar tail
};

// The split once the head's length is known: the head clamped to the row,
// then as many whole vectors as fit.
template <int VEC>
TWSL_HOST_DEVICE RowSplit split_after_head(int64_t head, int64_t cols) {
  head = head < cols ? head : cols;
  return {head, head + (cols - head) / VEC * VEC};
}

// `row_start` is the row's first element's index from a base pointer aligned
// to VEC elements (so element i is aligned iff (row_start + i) % VEC == 0).
template <int VEC>
TWSL_HOST_DEVICE RowSplit split_row(int64_t row_start, int64_t cols) {
  if (VEC == 1) return {0, cols};
  return split_after_head<VEC>((VEC - row_start % VEC) % VEC, cols);
}

// The byte offset, modulo the vector size VEC * ELEM_BYTES, that every
// address in `addrs` shares; 0 entries (absent tensors) are skipped, and with
// none present the offset is 0. -1 when two addresses differ modulo the vector
// size (no element index is aligned in both) or the offset is not a whole
// number of elements (no element is ever aligned).
template <int VEC, int ELEM_BYTES, int N>
TWSL_HOST_DEVICE int64_t common_misalignment(const uintptr_t (&addrs)[N]) {
  static_assert(VEC > 0 && ELEM_BYTES > 0 && ((VEC * ELEM_BYTES) & (VEC * ELEM_BYTES - 1)) == 0,
                "the vector size must be a power of two");
  constexpr uintptr_t kBytes = static_cast<uintptr_t>(VEC) * ELEM_BYTES;
  int64_t mis = -1;
  for (int k = 0; k < N; ++k) {
    if (addrs[k] == 0) continue;
    const auto m = static_cast<int64_t>(addrs[k] % kBytes);
    if (mis < 0) {
      mis = m;
    } else if (m != mis) {
      return -1;
    }
  }
  if (mis < 0) return 0;
  return mis % ELEM_BYTES == 0 ? mis : -1;
}

// The split of one row that several tensors hold at the same columns (e.g. the
// input, the residual and the outputs of a norm): `addrs` are the byte
// addresses of the row's first element in each tensor, 0 for an absent one.
// When they share their misalignment, the scalar head runs up to the first
// column at which all of them are aligned to VEC * ELEM_BYTES bytes, so the
// body is vectorized for every tensor at once. When they do not, no column is
// aligned for all of them: the whole row is the scalar head.
template <int VEC, int ELEM_BYTES, int N>
TWSL_HOST_DEVICE RowSplit split_row_at(const uintptr_t (&addrs)[N], int64_t cols) {
  if (VEC == 1) return {0, cols};
  const int64_t mis = common_misalignment<VEC, ELEM_BYTES>(addrs);
  if (mis < 0) return {cols, cols};
  constexpr int64_t kBytes = static_cast<int64_t>(VEC) * ELEM_BYTES;
  return split_after_head<VEC>((kBytes - mis) % kBytes / ELEM_BYTES, cols);
}

template <int N>
using Width = std::integral_constant<int, N>;

// Calls body(Width<W>{}, i) for every element group of a split row that
// member `rank` of a team of `size` threads owns: VEC-wide groups (i a
// multiple of VEC past head_end) over the body, single elements over the head
// and tail; across the team every element of [0, cols) exactly once. Every
// pass of a kernel walks the row the same way, so each thread touches the same
// elements in every pass. The scalar loops stay rolled: head and tail are
// under a vector each (one iteration per thread at most, unless the row fell
// back to scalar), and unrolling them made ptxas spill registers.
template <int VEC, typename Body>
TWSL_HOST_DEVICE void for_row(const RowSplit& split, int64_t cols, int rank, int size, Body&& body) {
  TORCH_WSL_NO_UNROLL
  for (int64_t i = rank; i < split.head_end; i += size) body(Width<1>{}, i);
  const int64_t step = static_cast<int64_t>(size) * VEC;
  for (int64_t i = split.head_end + static_cast<int64_t>(rank) * VEC; i < split.body_end; i += step) {
    body(Width<VEC>{}, i);
  }
  TORCH_WSL_NO_UNROLL
  for (int64_t i = split.body_end + rank; i < cols; i += size) body(Width<1>{}, i);
}

}  // namespace torch_wsl
