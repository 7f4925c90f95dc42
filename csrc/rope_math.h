// The arithmetic of rotary position embeddings, defined once for the CPU
// kernels (csrc/cpu/rope_kernel.h, on vec.h's vectors) and the CUDA kernels
// (csrc/cuda/rope_kernels.cu, on float/double), so the CPU tests exercise the
// formulas that run on the GPU. Also the row layout both walk.
//
// Per output element j of the first rotary_dim elements of a head vector x,
// with tables c = cos and s = sin broadcast to that row:
//   forward:  y[j]  = x[j] * c[j] + rot(x)[j] * s[j]
//   backward: dx[j] = dy[j] * c[j] + rot^T(dy * s)[j]
// where rot pairs element a with its partner b and
//   rot(x)[a] = -x[b],  rot(x)[b] = x[a]       rot^T(g)[a] = g[b],  rot^T(g)[b] = -g[a]
// Partners: rotate-half (Llama, NeoX): a = i, b = i + rotary_dim / 2;
// interleaved (GPT-J, Cohere, GLM): a = 2i, b = 2i + 1. Elements past
// rotary_dim pass through unchanged (partial rotary, as NeoX/Phi/GPT-J slice).
//
// The backward is the transpose of the forward map, which is the rotation by
// minus the angle for the tables of every RoPE (c[a] == c[b], s[a] == s[b]),
// and stays exact for scaled tables (YaRN's attention factor) and for any
// tables a test feeds it. cos/sin are not differentiated.
//
// Products are rounded on their own before the add (never contracted into an
// FMA), so float32 results are bit for bit those of transformers' eager
// `q * cos + rotate_half(q) * sin` (forward and autograd's backward); 16-bit
// inputs are computed in float32 and rounded once at the store.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace torch_wsl::rope_math {

// a * b, rounded before any following add.
template <typename T>
TWSL_HOST_DEVICE T mul_rn(T a, T b) {
  if constexpr (std::is_arithmetic_v<T>) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) {
      return __fmul_rn(a, b);
    } else {
      return __dmul_rn(a, b);
    }
#else
    T r = a * b;
#if defined(__x86_64__) || defined(_M_X64)
    asm("" : "+x"(r));  // a register barrier: the compiler cannot fuse the product into an FMA
#elif defined(__aarch64__)
    asm("" : "+w"(r));
#endif
    return r;
#endif
  } else {
    return a.mul_rn(b);  // vec.h's vector and scalar types
  }
}

template <typename T>
TWSL_HOST_DEVICE T neg(T a) {
  if constexpr (std::is_arithmetic_v<T>) {
    return -a;
  } else {
    return a.neg();
  }
}

// y = x * c + x_rot * s, with x_rot = rot(x) at this element.
template <typename T>
TWSL_HOST_DEVICE T forward(T x, T x_rot, T c, T s) {
  return mul_rn(x, c) + mul_rn(x_rot, s);
}

// dx = dy * c + g_rot, with g_rot = rot^T(dy * s) at this element.
template <typename T>
TWSL_HOST_DEVICE T backward(T dy, T c, T g_rot) {
  return mul_rn(dy, c) + g_rot;
}

// One pair (a, b), both directions: what scalar code and rotate-half's
// vectors (a and b in separate registers) call.
template <typename T>
TWSL_HOST_DEVICE void forward_pair(T xa, T xb, T ca, T cb, T sa, T sb, T& ya, T& yb) {
  ya = forward(xa, neg(xb), ca, sa);
  yb = forward(xb, xa, cb, sb);
}

template <typename T>
TWSL_HOST_DEVICE void backward_pair(T dya, T dyb, T ca, T cb, T sa, T sb, T& dxa, T& dxb) {
  dxa = backward(dya, ca, mul_rn(dyb, sb));
  dxb = backward(dyb, cb, neg(mul_rn(dya, sa)));
}

// ---------------------------------------------------------------- layout
// The head vectors of q (or k) as rows of head_dim elements: a row's
// elements are contiguous (stride 1); rows are indexed by up to kMaxDims
// leading dimensions with their own strides for the input, the output and
// each table (0 where cos/sin broadcast). The operator layer orders the
// dimensions by the output's strides (outermost first) and merges those that
// are contiguous in every operand, so rows run in memory order.
constexpr int kMaxDims = 6;

struct RowLayout {
  int ndim = 0;  // leading dimensions after merging; 0: one row
  int64_t size[kMaxDims] = {};
  int64_t x_stride[kMaxDims] = {};
  int64_t y_stride[kMaxDims] = {};
  int64_t cos_stride[kMaxDims] = {};
  int64_t sin_stride[kMaxDims] = {};
  int64_t rows = 0;       // product of size[]
  int64_t head_dim = 0;
};

// Element offsets of row r (0 <= r < rows) in each operand.
struct RowOffsets {
  int64_t x = 0;
  int64_t y = 0;
  int64_t cos = 0;
  int64_t sin = 0;
};

TWSL_HOST_DEVICE RowOffsets row_offsets(const RowLayout& l, int64_t r) {
  RowOffsets o;
  for (int d = l.ndim - 1; d >= 0; --d) {
    const int64_t i = r % l.size[d];
    r /= l.size[d];
    o.x += i * l.x_stride[d];
    o.y += i * l.y_stride[d];
    o.cos += i * l.cos_stride[d];
    o.sin += i * l.sin_stride[d];
  }
  return o;
}

}  // namespace torch_wsl::rope_math
