// The operator layer of the rotary position embedding family, shared by the
// CPU (csrc/rope.cpp) and CUDA (csrc/cuda/rope_kernels.cu) registrations:
// argument checks with messages that name the argument, output allocation in
// the caller's memory order, and the row layout the kernels walk. A backend
// only supplies `apply(RopeProblem&)`, which rotates q's and k's rows in one
// kernel launch (forward, or the transposed rotation for the backward).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "rope_math.h"

namespace torch_wsl {

using at::Tensor;

// One of q / k (or of their gradients): the input, the output allocated for
// it, and the layout of their rows against the tables.
struct RopeOperand {
  Tensor input;   // head dimension contiguous
  Tensor output;  // dense, same shape
  rope_math::RowLayout layout;
};

struct RopeProblem {
  RopeOperand q;
  RopeOperand k;
  Tensor cos;  // last dimension contiguous
  Tensor sin;
  int64_t rotary_dim = 0;
  bool interleaved = false;
  bool backward = false;  // apply the transpose (the rotation by minus the angle)

  int64_t rows() const { return q.layout.rows + k.layout.rows; }
};

RopeProblem prepare_rope_forward(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                 int64_t unsqueeze_dim, bool interleaved);
// An absent gradient gives an empty [0] output (the other is still computed).
RopeProblem prepare_rope_backward(const std::optional<Tensor>& grad_q_embed, const std::optional<Tensor>& grad_k_embed,
                                  const Tensor& cos, const Tensor& sin, int64_t unsqueeze_dim, bool interleaved,
                                  at::IntArrayRef q_stride, at::IntArrayRef k_stride);

// Registers apply_rotary_pos_emb and apply_rotary_pos_emb_backward for one dispatch key.
template <typename Backend>
void register_rope_kernels(torch::Library& m) {
  m.impl("apply_rotary_pos_emb",
         [](const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin, int64_t unsqueeze_dim,
            bool interleaved) {
           RopeProblem p = prepare_rope_forward(q, k, cos, sin, unsqueeze_dim, interleaved);
           Backend::apply(p);
           return std::make_tuple(p.q.output, p.k.output);
         });
  m.impl("apply_rotary_pos_emb_backward",
         [](const std::optional<Tensor>& grad_q_embed, const std::optional<Tensor>& grad_k_embed, const Tensor& cos,
            const Tensor& sin, int64_t unsqueeze_dim, bool interleaved, at::IntArrayRef q_stride,
            at::IntArrayRef k_stride) {
           RopeProblem p = prepare_rope_backward(grad_q_embed, grad_k_embed, cos, sin, unsqueeze_dim, interleaved,
                                                 q_stride, k_stride);
           Backend::apply(p);
           return std::make_tuple(p.q.output, p.k.output);
         });
}

}  // namespace torch_wsl
