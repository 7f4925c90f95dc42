// The operator layer of the LayerNorm / RMSNorm family, shared by the CPU
// (csrc/norm.cpp) and CUDA (csrc/cuda/norm_kernels.cu) registrations:
// argument checks with messages that name the argument, output allocation,
// and the registration of every operator for one backend. A backend only
// supplies `forward(NormForward&)` and `backward(NormBackward&)`.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace torch_wsl {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// One forward problem: contiguous [rows, cols] views and preallocated outputs.
struct NormForward {
  Tensor input;
  Tensor residual;      // undefined unless fused add
  Tensor weight;        // undefined, or dtype input's or its accumulation type
  Tensor bias;          // likewise
  Tensor output;
  Tensor residual_out;  // undefined unless fused add
  Tensor mean;          // undefined for RMSNorm
  Tensor rstd;          // accumulation type, [rows]
  int64_t rows = 0;
  int64_t cols = 0;
  double eps = 0.0;
  bool center = true;
  bool round_xhat = false;  // RMSNorm casting_mode "llama"
};

struct NormBackward {
  Tensor grad_output;
  Tensor grad_residual_out;  // undefined if no gradient flows past the norm
  Tensor input;              // the tensor that was normalized
  Tensor mean;               // undefined for RMSNorm
  Tensor rstd;
  Tensor weight;             // undefined, or dtype input's or its accumulation type
  Tensor grad_input;
  Tensor grad_weight;        // accumulation type [cols]; undefined when not wanted
  Tensor grad_bias;          // accumulation type [cols]; undefined when not wanted
  int64_t rows = 0;
  int64_t cols = 0;
  bool center = true;
  bool round_xhat = false;  // RMSNorm casting_mode "llama"
};

// RMSNorm's weight options (LayerNorm takes the defaults): `offset` is added to
// the weight (Gemma's x̂ * (1 + w) is offset 1), and casting_mode says where
// the result is rounded: "torch" (torch.nn.functional.rms_norm) and "gemma"
// compute in float32 and round once; "llama" (Llama, Mistral, Qwen) rounds x̂
// to the input's dtype before the weight multiplies it.
struct RmsOptions {
  double offset = 0.0;
  bool round_xhat = false;
};
RmsOptions parse_rms_options(const char* op, double offset, c10::string_view casting_mode, const OptTensor& weight);

NormForward prepare_norm_forward(const char* op, bool center, const Tensor& input, const OptTensor& residual,
                                 at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                                 std::optional<double> eps, RmsOptions rms = {});
NormBackward prepare_norm_backward(const char* op, bool center, const Tensor& grad_output,
                                   const OptTensor& grad_residual_out, const Tensor& input,
                                   at::IntArrayRef normalized_shape, const OptTensor& mean, const Tensor& rstd,
                                   const OptTensor& weight, bool want_grad_weight, bool want_grad_bias,
                                   RmsOptions rms = {});
// A weight/bias gradient in the parameter's dtype and shape; when it was not
// computed, an empty [0] tensor with input's dtype and device.
Tensor finish_param_grad(const Tensor& grad_acc, const OptTensor& param, const Tensor& input);

// Registers layer_norm, add_layer_norm, layer_norm_backward, rms_norm,
// add_rms_norm and rms_norm_backward for one dispatch key.
template <typename Backend>
void register_norm_kernels(torch::Library& m) {
  m.impl("layer_norm", [](const Tensor& input, at::IntArrayRef shape, const OptTensor& weight, const OptTensor& bias,
                          double eps) {
    NormForward p = prepare_norm_forward("layer_norm", true, input, std::nullopt, shape, weight, bias, eps);
    Backend::forward(p);
    return std::make_tuple(p.output, p.mean, p.rstd);
  });
  m.impl("add_layer_norm", [](const Tensor& input, const Tensor& residual, at::IntArrayRef shape,
                              const OptTensor& weight, const OptTensor& bias, double eps) {
    NormForward p = prepare_norm_forward("add_layer_norm", true, input, residual, shape, weight, bias, eps);
    Backend::forward(p);
    return std::make_tuple(p.output, p.residual_out, p.mean, p.rstd);
  });
  m.impl("layer_norm_backward",
         [](const Tensor& grad_output, const OptTensor& grad_residual_out, const Tensor& input, at::IntArrayRef shape,
            const Tensor& mean, const Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
            std::array<bool, 2> output_mask) {
           NormBackward p = prepare_norm_backward("layer_norm_backward", true, grad_output, grad_residual_out, input,
                                                  shape, mean, rstd, weight, output_mask[0] && weight.has_value(),
                                                  output_mask[1] && bias.has_value());
           Backend::backward(p);
           return std::make_tuple(p.grad_input, finish_param_grad(p.grad_weight, weight, input),
                                  finish_param_grad(p.grad_bias, bias, input));
         });
  m.impl("rms_norm", [](const Tensor& input, at::IntArrayRef shape, const OptTensor& weight, std::optional<double> eps,
                        double offset, c10::string_view casting_mode) {
    const RmsOptions rms = parse_rms_options("rms_norm", offset, casting_mode, weight);
    NormForward p = prepare_norm_forward("rms_norm", false, input, std::nullopt, shape, weight, std::nullopt, eps, rms);
    Backend::forward(p);
    return std::make_tuple(p.output, p.rstd);
  });
  m.impl("add_rms_norm", [](const Tensor& input, const Tensor& residual, at::IntArrayRef shape,
                            const OptTensor& weight, std::optional<double> eps, double offset,
                            c10::string_view casting_mode) {
    const RmsOptions rms = parse_rms_options("add_rms_norm", offset, casting_mode, weight);
    NormForward p =
        prepare_norm_forward("add_rms_norm", false, input, residual, shape, weight, std::nullopt, eps, rms);
    Backend::forward(p);
    return std::make_tuple(p.output, p.residual_out, p.rstd);
  });
  m.impl("rms_norm_backward", [](const Tensor& grad_output, const OptTensor& grad_residual_out, const Tensor& input,
                                 at::IntArrayRef shape, const Tensor& rstd, const OptTensor& weight,
                                 bool weight_grad, double offset, c10::string_view casting_mode) {
    const RmsOptions rms = parse_rms_options("rms_norm_backward", offset, casting_mode, weight);
    NormBackward p = prepare_norm_backward("rms_norm_backward", false, grad_output, grad_residual_out, input, shape,
                                           std::nullopt, rstd, weight, weight_grad && weight.has_value(), false, rms);
    Backend::backward(p);
    return std::make_tuple(p.grad_input, finish_param_grad(p.grad_weight, weight, input));
  });
}

}  // namespace torch_wsl
