// Gated MLP activation operators (SwiGLU / GeGLU): schemas, argument checks,
// the [rows, cols] views, and the CPU kernels' registration. The CUDA
// registration is in cuda/activation_kernels.cu.
#include "activation.h"

#include <optional>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/util/irange.h>

#include "checks.h"
#include "cpu/activation_kernel.h"
#include "dtypes.h"

namespace torch_wsl {
namespace {

using act_math::Activation;

// The row stride of t read as [rows, cols] rows (cols = its last dimension):
// set when the last dimension has unit stride (or at most one element) and
// the leading dimensions collapse into one stride. Size-1 dimensions never
// matter; an input's rows may overlap (stride 0 from expand() reads fine).
std::optional<int64_t> row_stride_of(const Tensor& t) {
  const int64_t d = t.dim();
  if (d == 0) return int64_t{1};
  const int64_t cols = t.size(d - 1);
  if (cols > 1 && t.stride(d - 1) != 1) return std::nullopt;
  int64_t row_stride = cols;
  int64_t next = -1;  // the stride the next outer dimension must have, once one is seen
  for (int64_t i = d - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (next < 0) {
      row_stride = t.stride(i);
    } else if (t.stride(i) != next) {
      return std::nullopt;
    }
    next = t.stride(i) * t.size(i);
  }
  return row_stride;
}

// t as rows, copied to a contiguous tensor only when its strides do not fit.
RowView rows_of(const Tensor& t) {
  if (const auto rs = row_stride_of(t)) return {t, *rs};
  Tensor c = t.contiguous();
  return {c, c.dim() > 0 ? c.size(-1) : int64_t{1}};
}

int64_t last_dim(const Tensor& t) { return t.dim() > 0 ? t.size(-1) : int64_t{1}; }

// Dense everywhere (row stride == cols for every view): one long row, so a
// short last dimension still runs in whole vectors.
template <typename... Views>
void fold_dense_rows(int64_t& rows, int64_t& cols, Views&... views) {
  if (rows > 1 && ((views.row_stride == cols) && ...)) {
    cols *= rows;
    rows = 1;
    ((views.row_stride = cols), ...);
  }
}

Tensor empty_like_contiguous(const Tensor& t, at::IntArrayRef sizes) {
  return at::empty(sizes, t.options().memory_format(at::MemoryFormat::Contiguous));
}

void check_pair(const char* op, const Tensor& gate, const Tensor& up) {
  check::floating(op, "gate", gate);
  check::like(op, "up", up, "gate", gate);
}

// gate_up: floating, at least 1-D, an even last dimension.
void check_packed(const char* op, const Tensor& gate_up) {
  check::floating(op, "gate_up", gate_up);
  check::dim_at_least(op, "gate_up", gate_up, 1);
  check::that(gate_up.size(-1) % 2 == 0, op, "gate_up",
              "to have an even last dimension (the gate half, then the up half)", "shape ", gate_up.sizes());
}

std::vector<int64_t> halved_shape(const Tensor& gate_up) {
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return shape;
}

}  // namespace

Activation gelu_activation(std::string_view op, std::string_view approximate) {
  check::that(approximate == "none" || approximate == "tanh", op, "approximate", "to be 'none' or 'tanh'", "'",
              approximate, "'");
  return approximate == "tanh" ? Activation::kGeluTanh : Activation::kGelu;
}

GatedForward prepare_gated_forward(const char* op, Activation act, const Tensor& gate, const Tensor& up) {
  check_pair(op, gate, up);
  GatedForward p;
  p.act = act;
  p.gate = rows_of(gate);
  p.up = rows_of(up);
  p.cols = last_dim(gate);
  p.rows = p.cols > 0 ? gate.numel() / p.cols : 0;
  p.out = {empty_like_contiguous(gate, gate.sizes()), p.cols};
  fold_dense_rows(p.rows, p.cols, p.gate, p.up, p.out);
  return p;
}

GatedForward prepare_packed_forward(const char* op, Activation act, const Tensor& gate_up) {
  check_packed(op, gate_up);
  const int64_t half = gate_up.size(-1) / 2;
  GatedForward p;
  p.act = act;
  const RowView both = rows_of(gate_up);
  p.gate = {both.tensor.narrow(-1, 0, half), both.row_stride};
  p.up = {both.tensor.narrow(-1, half, half), both.row_stride};
  p.cols = half;
  p.rows = half > 0 ? gate_up.numel() / (2 * half) : 0;
  p.out = {empty_like_contiguous(gate_up, halved_shape(gate_up)), half};
  return p;
}

GatedBackward prepare_gated_backward(const char* op, Activation act, const Tensor& grad_output, const Tensor& gate,
                                     const Tensor& up) {
  check_pair(op, gate, up);
  check::like(op, "grad_output", grad_output, "gate", gate);
  GatedBackward p;
  p.act = act;
  p.grad_output = rows_of(grad_output);
  p.gate = rows_of(gate);
  p.up = rows_of(up);
  p.cols = last_dim(gate);
  p.rows = p.cols > 0 ? gate.numel() / p.cols : 0;
  p.grad_gate = {empty_like_contiguous(gate, gate.sizes()), p.cols};
  p.grad_up = {empty_like_contiguous(gate, gate.sizes()), p.cols};
  fold_dense_rows(p.rows, p.cols, p.grad_output, p.gate, p.up, p.grad_gate, p.grad_up);
  return p;
}

GatedBackward prepare_packed_backward(const char* op, Activation act, const Tensor& grad_output,
                                      const Tensor& gate_up, Tensor& grad_gate_up) {
  check_packed(op, gate_up);
  const std::vector<int64_t> out_shape = halved_shape(gate_up);
  check::same_device(op, "grad_output", grad_output, "gate_up", gate_up);
  check::that(grad_output.sizes() == at::IntArrayRef(out_shape), op, "grad_output",
              c10::str("to have shape ", at::IntArrayRef(out_shape), " (gate_up's with its last dimension halved)"),
              grad_output.sizes());
  check::same_dtype(op, "grad_output", grad_output, "gate_up", gate_up);
  const int64_t half = out_shape.back();
  GatedBackward p;
  p.act = act;
  p.grad_output = rows_of(grad_output);
  const RowView both = rows_of(gate_up);
  p.gate = {both.tensor.narrow(-1, 0, half), both.row_stride};
  p.up = {both.tensor.narrow(-1, half, half), both.row_stride};
  p.cols = half;
  p.rows = half > 0 ? gate_up.numel() / (2 * half) : 0;
  grad_gate_up = empty_like_contiguous(gate_up, gate_up.sizes());
  p.grad_gate = {grad_gate_up.narrow(-1, 0, half), 2 * half};
  p.grad_up = {grad_gate_up.narrow(-1, half, half), 2 * half};
  return p;
}

namespace {

struct CpuActivationBackend {
  static void forward(GatedForward& p) {
    if (p.rows == 0 || p.cols == 0) return;
    cpu::GatedForwardArgs a;
    a.gate = p.gate.tensor.const_data_ptr();
    a.up = p.up.tensor.const_data_ptr();
    a.out = p.out.tensor.mutable_data_ptr();
    a.gate_stride = p.gate.row_stride;
    a.up_stride = p.up.row_stride;
    a.out_stride = p.out.row_stride;
    a.rows = p.rows;
    a.cols = p.cols;
    a.act = p.act;
    a.dtype = p.gate.tensor.scalar_type();
    cpu::activation_kernels().forward(a);
  }

  static void backward(GatedBackward& p) {
    if (p.rows == 0 || p.cols == 0) return;
    cpu::GatedBackwardArgs a;
    a.grad_output = p.grad_output.tensor.const_data_ptr();
    a.gate = p.gate.tensor.const_data_ptr();
    a.up = p.up.tensor.const_data_ptr();
    a.grad_gate = p.grad_gate.tensor.mutable_data_ptr();
    a.grad_up = p.grad_up.tensor.mutable_data_ptr();
    a.grad_output_stride = p.grad_output.row_stride;
    a.gate_stride = p.gate.row_stride;
    a.up_stride = p.up.row_stride;
    a.grad_gate_stride = p.grad_gate.row_stride;
    a.grad_up_stride = p.grad_up.row_stride;
    a.rows = p.rows;
    a.cols = p.cols;
    a.act = p.act;
    a.dtype = p.gate.tensor.scalar_type();
    cpu::activation_kernels().backward(a);
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_wsl, m) {
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("gelu_mul(Tensor gate, Tensor up, str approximate=\"none\") -> Tensor");
  m.def("silu_mul_packed(Tensor gate_up) -> Tensor");
  m.def("gelu_mul_packed(Tensor gate_up, str approximate=\"none\") -> Tensor");
  m.def("silu_mul_backward(Tensor grad_output, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
  m.def(
      "gelu_mul_backward(Tensor grad_output, Tensor gate, Tensor up, str approximate=\"none\")"
      " -> (Tensor grad_gate, Tensor grad_up)");
  m.def("silu_mul_packed_backward(Tensor grad_output, Tensor gate_up) -> Tensor");
  m.def("gelu_mul_packed_backward(Tensor grad_output, Tensor gate_up, str approximate=\"none\") -> Tensor");
}

TORCH_LIBRARY_IMPL(torch_wsl, CPU, m) { register_activation_kernels<CpuActivationBackend>(m); }

}  // namespace torch_wsl
