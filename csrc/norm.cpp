// LayerNorm / RMSNorm operators: schemas, argument checks, and the CPU kernels'
// registration. The CUDA registration is in cuda/norm_kernels.cu.
#include "norm.h"

#include <limits>

#include <ATen/ops/empty.h>
#include <c10/util/irange.h>

#include "checks.h"
#include "cpu/norm_kernel.h"
#include "dtypes.h"

namespace torch_wsl {
namespace {

// weight / bias: shape normalized_shape, any floating dtype. Returned contiguous,
// in input's dtype or the accumulation type (converted if it was neither).
Tensor prepare_param(const char* op, const char* name, const Tensor& p, at::IntArrayRef normalized_shape,
                     const Tensor& input, double offset = 0.0) {
  check::same_device(op, name, p, "input", input);
  check::floating(op, name, p);
  check::that(p.sizes() == normalized_shape, op, name, c10::str("to have shape normalized_shape ", normalized_shape),
              p.sizes());
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  if (offset != 0.0) return p.to(acc).add(offset).contiguous();  // added in the accumulation type, as Gemma does
  Tensor out = p;
  if (p.scalar_type() != input.scalar_type() && p.scalar_type() != acc) out = p.to(acc);
  return out.contiguous();
}

struct RowsCols {
  int64_t rows;
  int64_t cols;
  std::vector<int64_t> stat_shape;  // input.shape[:-len(normalized_shape)]
};

RowsCols check_input_shape(const char* op, const Tensor& input, at::IntArrayRef normalized_shape) {
  check::floating(op, "input", input);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  check::that(k > 0, op, "normalized_shape", "to name at least one dimension", "[]");
  check::that(input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape, op, "normalized_shape",
              c10::str(normalized_shape, " to match the trailing dimensions of input"), "input of shape ",
              input.sizes());
  RowsCols rc{1, 1, {}};
  for (const auto i : c10::irange(input.dim())) {
    if (i < input.dim() - k) {
      rc.rows *= input.size(i);
      rc.stat_shape.push_back(input.size(i));
    } else {
      rc.cols *= input.size(i);
    }
  }
  return rc;
}

}  // namespace

NormForward prepare_norm_forward(const char* op, bool center, const Tensor& input, const OptTensor& residual,
                                 at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                                 std::optional<double> eps, RmsOptions rms) {
  const RowsCols rc = check_input_shape(op, input, normalized_shape);
  if (residual) check::like(op, "residual", *residual, "input", input);
  NormForward p;
  if (weight) p.weight = prepare_param(op, "weight", *weight, normalized_shape, input, rms.offset);
  if (bias) p.bias = prepare_param(op, "bias", *bias, normalized_shape, input);
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  if (eps) {
    p.eps = *eps;
  } else {  // torch.nn.functional.rms_norm's default: the accumulation type's machine epsilon
    p.eps = acc == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
  }
  check::that(p.eps >= 0.0, op, "eps", ">= 0", p.eps);

  p.input = input.contiguous();
  if (residual) p.residual = residual->contiguous();
  p.rows = rc.rows;
  p.cols = rc.cols;
  p.center = center;
  p.round_xhat = rms.round_xhat;
  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  p.output = at::empty(input.sizes(), opts);
  if (residual) p.residual_out = at::empty(input.sizes(), opts);
  const auto stat_opts = input.options().dtype(acc);
  if (center) p.mean = at::empty(rc.stat_shape, stat_opts);
  p.rstd = at::empty(rc.stat_shape, stat_opts);
  return p;
}

NormBackward prepare_norm_backward(const char* op, bool center, const Tensor& grad_output,
                                   const OptTensor& grad_residual_out, const Tensor& input,
                                   at::IntArrayRef normalized_shape, const OptTensor& mean, const Tensor& rstd,
                                   const OptTensor& weight, bool want_grad_weight, bool want_grad_bias,
                                   RmsOptions rms) {
  const RowsCols rc = check_input_shape(op, input, normalized_shape);
  check::like(op, "grad_output", grad_output, "input", input);
  if (grad_residual_out) check::like(op, "grad_residual_out", *grad_residual_out, "input", input);
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  auto check_stat = [&](const char* name, const Tensor& t) {
    check::same_device(op, name, t, "input", input);
    check::that(t.numel() == rc.rows && t.scalar_type() == acc, op, name,
                c10::str("to hold ", rc.rows, " values of dtype ", check::dtype_name(acc), " (one per normalized row)"),
                "shape ", t.sizes(), " and dtype ", check::dtype_name(t.scalar_type()));
  };
  NormBackward p;
  if (center) {
    check::that(mean.has_value(), op, "mean", "to be given", "None");
    check_stat("mean", *mean);
    p.mean = mean->contiguous();
  }
  check_stat("rstd", rstd);
  p.rstd = rstd.contiguous();
  if (weight) p.weight = prepare_param(op, "weight", *weight, normalized_shape, input, rms.offset);

  p.grad_output = grad_output.contiguous();
  if (grad_residual_out) p.grad_residual_out = grad_residual_out->contiguous();
  p.input = input.contiguous();
  p.rows = rc.rows;
  p.cols = rc.cols;
  p.center = center;
  p.round_xhat = rms.round_xhat;
  p.grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  const auto acc_opts = input.options().dtype(acc);
  if (want_grad_weight) p.grad_weight = at::empty({rc.cols}, acc_opts);
  if (want_grad_bias) p.grad_bias = at::empty({rc.cols}, acc_opts);
  return p;
}

RmsOptions parse_rms_options(const char* op, double offset, c10::string_view casting_mode, const OptTensor& weight) {
  RmsOptions o;
  check::that(casting_mode == "torch" || casting_mode == "gemma" || casting_mode == "llama", op, "casting_mode",
              "to be one of 'torch', 'gemma', 'llama'", "'", casting_mode, "'");
  check::that(offset == 0.0 || weight.has_value(), op, "weight", c10::str("to be given with offset ", offset),
              "None");
  o.offset = offset;
  o.round_xhat = casting_mode == "llama";
  return o;
}

Tensor finish_param_grad(const Tensor& grad_acc, const OptTensor& param, const Tensor& input) {
  if (!grad_acc.defined() || !param.has_value()) return at::empty({0}, input.options());
  return grad_acc.view(param->sizes()).to(param->scalar_type());
}

namespace {

const void* data_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mutable_data_or_null(const Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

// The CPU kernels take weight/bias in the accumulation type.
Tensor to_acc(const Tensor& param, at::ScalarType acc) {
  return param.defined() ? param.to(acc).contiguous() : param;
}

struct CpuNormBackend {
  static void forward(NormForward& p) {
    if (p.rows == 0) return;
    const at::ScalarType acc = acc_scalar_type(p.input.scalar_type());
    const Tensor weight = to_acc(p.weight, acc);
    const Tensor bias = to_acc(p.bias, acc);
    cpu::NormForwardArgs a;
    a.input = p.input.const_data_ptr();
    a.residual = data_or_null(p.residual);
    a.weight = data_or_null(weight);
    a.bias = data_or_null(bias);
    a.output = p.output.mutable_data_ptr();
    a.residual_out = mutable_data_or_null(p.residual_out);
    a.mean = mutable_data_or_null(p.mean);
    a.rstd = p.rstd.mutable_data_ptr();
    a.rows = p.rows;
    a.cols = p.cols;
    a.eps = p.eps;
    a.center = p.center;
    a.round_xhat = p.round_xhat;
    a.dtype = p.input.scalar_type();
    cpu::norm_kernels().forward(a);
  }

  static void backward(NormBackward& p) {
    const at::ScalarType acc = acc_scalar_type(p.input.scalar_type());
    if (p.rows == 0 || p.cols == 0) {  // the kernel writes every gradient element otherwise
      if (p.grad_weight.defined()) p.grad_weight.zero_();
      if (p.grad_bias.defined()) p.grad_bias.zero_();
      return;
    }
    const Tensor weight = to_acc(p.weight, acc);
    cpu::NormBackwardArgs a;
    a.grad_output = p.grad_output.const_data_ptr();
    a.grad_residual_out = data_or_null(p.grad_residual_out);
    a.input = p.input.const_data_ptr();
    a.mean = data_or_null(p.mean);
    a.rstd = p.rstd.const_data_ptr();
    a.weight = data_or_null(weight);
    a.grad_input = p.grad_input.mutable_data_ptr();
    a.grad_weight = mutable_data_or_null(p.grad_weight);
    a.grad_bias = mutable_data_or_null(p.grad_bias);
    a.rows = p.rows;
    a.cols = p.cols;
    a.center = p.center;
    a.round_xhat = p.round_xhat;
    a.dtype = p.input.scalar_type();
    cpu::norm_kernels().backward(a);
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_wsl, m) {
  m.def(
      "layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, Tensor? bias=None, float eps=1e-05)"
      " -> (Tensor output, Tensor mean, Tensor rstd)");
  m.def(
      "add_layer_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05) -> (Tensor output, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor? grad_residual_out, Tensor input, SymInt[] normalized_shape, "
      "Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, bool[2] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, float? eps=None, float offset=0., "
      "str casting_mode=\"torch\") -> (Tensor output, Tensor rstd)");
  m.def(
      "add_rms_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight=None, float? eps=None, "
      "float offset=0., str casting_mode=\"torch\") -> (Tensor output, Tensor residual_out, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad_output, Tensor? grad_residual_out, Tensor input, SymInt[] normalized_shape, "
      "Tensor rstd, Tensor? weight, bool weight_grad, float offset=0., str casting_mode=\"torch\")"
      " -> (Tensor grad_input, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(torch_wsl, CPU, m) { register_norm_kernels<CpuNormBackend>(m); }

}  // namespace torch_wsl
