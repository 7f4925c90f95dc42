// How a row of a contiguous [rows, cols] tensor is split for vector access:
// a scalar head up to the first element whose address is aligned for VEC-wide
// loads, a body of whole vectors, and a scalar tail. Used by the CUDA row
// kernels; kept here, free of CUDA, so the index arithmetic is tested on CPU.
#pragma once

#include <cstdint>

#include "common.h"

namespace torch_wsl {

struct RowSplit {
  int64_t head_end;  // [0, head_end): scalar head
  int64_t body_end;  // [head_end, body_end): whole vectors; [body_end, cols): scalar tail
};

// `row_start` is the row's first element's index from a base pointer aligned
// to VEC elements (so element i is aligned iff (row_start + i) % VEC == 0).
template <int VEC>
TWSL_HOST_DEVICE RowSplit split_row(int64_t row_start, int64_t cols) {
  if (VEC == 1) return {0, cols};
  int64_t head = (VEC - row_start % VEC) % VEC;
  head = head < cols ? head : cols;
  return {head, head + (cols - head) / VEC * VEC};
}

}  // namespace torch_wsl
