// The operator layer of the gated MLP activations (SwiGLU / GeGLU), shared by
// the CPU (csrc/activation.cpp) and CUDA (csrc/cuda/activation_kernels.cu)
// registrations: argument checks with messages that name the argument, the
// [rows, cols] views the kernels walk, output allocation, and the
// registration of every operator for one backend. A backend only supplies
// `forward(GatedForward&)` and `backward(GatedBackward&)`.
//
// Operators (schemas in activation.cpp):
//   silu_mul(gate, up)                       act(gate) * up
//   gelu_mul(gate, up, approximate)
//   silu_mul_packed(gate_up)                 the same on one [..., 2*I] tensor, gate first
//   gelu_mul_packed(gate_up, approximate)    (Phi-3's gate_up_proj output)
//   *_backward                               both input gradients in one pass
//
// Every tensor reaches the kernels as a [rows, cols] view with unit column
// stride and any row stride (cols: the last dimension), so the packed halves
// (row stride 2*I), row slices and batch-transposed views are read in place;
// only a tensor whose leading dimensions do not collapse into one row stride,
// or whose last dimension is strided, is copied first.
#pragma once

#include <string>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "activation_math.h"

namespace torch_wsl {

using at::Tensor;

// One tensor as [rows, cols] rows: element (r, c) is at data + r * row_stride + c.
struct RowView {
  Tensor tensor;  // the view itself, or a contiguous copy (its storage stays alive)
  int64_t row_stride = 0;
};

// All tensors of one call share rows and cols; when every row stride equals
// cols (all dense), rows is folded into one row of rows * cols elements.
struct GatedForward {
  RowView gate;
  RowView up;
  RowView out;
  int64_t rows = 0;
  int64_t cols = 0;
  act_math::Activation act = act_math::Activation::kSilu;
};

struct GatedBackward {
  RowView grad_output;
  RowView gate;
  RowView up;
  RowView grad_gate;
  RowView grad_up;
  int64_t rows = 0;
  int64_t cols = 0;
  act_math::Activation act = act_math::Activation::kSilu;
};

// The activation of a gelu op from its `approximate` argument ("none" or "tanh").
act_math::Activation gelu_activation(std::string_view op, std::string_view approximate);

// The forward problem and the tensor the operator returns (out's tensor).
GatedForward prepare_gated_forward(const char* op, act_math::Activation act, const Tensor& gate, const Tensor& up);
GatedForward prepare_packed_forward(const char* op, act_math::Activation act, const Tensor& gate_up);
// grad_gate/grad_up are fresh tensors of gate's shape; for the packed form
// they are the two halves of one fresh [..., 2*I] gradient, `grad_gate_up`.
GatedBackward prepare_gated_backward(const char* op, act_math::Activation act, const Tensor& grad_output,
                                     const Tensor& gate, const Tensor& up);
GatedBackward prepare_packed_backward(const char* op, act_math::Activation act, const Tensor& grad_output,
                                      const Tensor& gate_up, Tensor& grad_gate_up);

namespace activation_detail {

template <typename Backend>
Tensor run_forward(GatedForward p) {
  Backend::forward(p);
  return p.out.tensor;
}

template <typename Backend>
std::tuple<Tensor, Tensor> run_backward(GatedBackward p) {
  Backend::backward(p);
  return std::make_tuple(p.grad_gate.tensor, p.grad_up.tensor);
}

template <typename Backend>
Tensor run_packed_backward(const char* op, act_math::Activation act, const Tensor& grad_output,
                           const Tensor& gate_up) {
  Tensor grad_gate_up;
  GatedBackward p = prepare_packed_backward(op, act, grad_output, gate_up, grad_gate_up);
  Backend::backward(p);
  return grad_gate_up;
}

}  // namespace activation_detail

// Registers the eight operators for one dispatch key.
template <typename Backend>
void register_activation_kernels(torch::Library& m) {
  using act_math::Activation;
  using namespace activation_detail;
  m.impl("silu_mul", [](const Tensor& gate, const Tensor& up) {
    return run_forward<Backend>(prepare_gated_forward("silu_mul", Activation::kSilu, gate, up));
  });
  m.impl("gelu_mul", [](const Tensor& gate, const Tensor& up, c10::string_view approximate) {
    const Activation act = gelu_activation("gelu_mul", approximate);
    return run_forward<Backend>(prepare_gated_forward("gelu_mul", act, gate, up));
  });
  m.impl("silu_mul_packed", [](const Tensor& gate_up) {
    return run_forward<Backend>(prepare_packed_forward("silu_mul_packed", Activation::kSilu, gate_up));
  });
  m.impl("gelu_mul_packed", [](const Tensor& gate_up, c10::string_view approximate) {
    const Activation act = gelu_activation("gelu_mul_packed", approximate);
    return run_forward<Backend>(prepare_packed_forward("gelu_mul_packed", act, gate_up));
  });
  m.impl("silu_mul_backward", [](const Tensor& grad_output, const Tensor& gate, const Tensor& up) {
    return run_backward<Backend>(
        prepare_gated_backward("silu_mul_backward", Activation::kSilu, grad_output, gate, up));
  });
  m.impl("gelu_mul_backward",
         [](const Tensor& grad_output, const Tensor& gate, const Tensor& up, c10::string_view approximate) {
           const Activation act = gelu_activation("gelu_mul_backward", approximate);
           return run_backward<Backend>(prepare_gated_backward("gelu_mul_backward", act, grad_output, gate, up));
         });
  m.impl("silu_mul_packed_backward", [](const Tensor& grad_output, const Tensor& gate_up) {
    return run_packed_backward<Backend>("silu_mul_packed_backward", Activation::kSilu, grad_output, gate_up);
  });
  m.impl("gelu_mul_packed_backward",
         [](const Tensor& grad_output, const Tensor& gate_up, c10::string_view approximate) {
           const Activation act = gelu_activation("gelu_mul_packed_backward", approximate);
           return run_packed_backward<Backend>("gelu_mul_packed_backward", act, grad_output, gate_up);
         });
}

}  // namespace torch_wsl
