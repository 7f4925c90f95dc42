// Cross-entropy operators: schemas, argument checks, and the CPU kernels'
// registration. The CUDA registration is in cuda/cross_entropy_kernels.cu.
#include "cross_entropy.h"

#include <cmath>
#include <limits>

#include <ATen/ops/ne.h>
#include <c10/util/irange.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>

#include "checks.h"
#include "cpu/cross_entropy_kernel.h"
#include "dtypes.h"

namespace torch_wsl {

Reduction parse_reduction(const char* op, std::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  check::that(reduction == "none", op, "reduction", "to be 'none', 'mean' or 'sum'", "'", reduction, "'");
  return Reduction::kNone;
}

void check_options(const char* op, double label_smoothing, std::optional<double> softcap) {
  check::that(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, "label_smoothing", "to be in [0, 1]",
              label_smoothing);
  if (softcap) {
    check::that(*softcap > 0.0 && std::isfinite(*softcap), op, "softcap", "to be a positive finite number or None",
                *softcap);
  }
}

namespace {

void check_target(const char* op, const Tensor& target, int64_t rows, const Tensor& input) {
  const auto d = target.scalar_type();
  check::that(d == at::kLong || d == at::kInt, op, "target",
              "to hold class indices as int64 or int32 (class probabilities are not supported)",
              check::dtype_name(d));
  check::same_device(op, "target", target, "input", input);
  check::that(target.dim() == 1 && target.size(0) == rows, op, "target",
              c10::str("to have shape [", rows, "] (one class index per row of input)"), "shape ", target.sizes());
}

}  // namespace

CeRows prepare_rows(const char* op, const Tensor& input, const Tensor& target, const OptTensor& weight,
                    int64_t ignore_index, double label_smoothing, std::optional<double> softcap) {
  check::floating(op, "input", input);
  check::that(input.dim() == 2, op, "input", "to have 2 dimensions [batch, classes]", "shape ", input.sizes());
  check::that(input.size(1) >= 1, op, "input", "to have at least one class (input.shape[1] >= 1)", "shape ",
              input.sizes());
  check_target(op, target, input.size(0), input);
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  CeRows r;
  if (weight) {
    check::same_device(op, "weight", *weight, "input", input);
    check::floating(op, "weight", *weight);
    check::that(weight->dim() == 1 && weight->size(0) == input.size(1), op, "weight",
                c10::str("to have shape [", input.size(1), "] (one weight per class)"), "shape ", weight->sizes());
  }
  check_options(op, label_smoothing, softcap);
  if (weight) {
    r.weight = weight->to(acc).contiguous();
    if (label_smoothing > 0.0) r.weight_sum = r.weight.sum();
  }
  r.logits = input.stride(1) == 1 ? input : input.contiguous();
  r.target = target.contiguous();
  r.rows = input.size(0);
  r.classes = input.size(1);
  r.ignore_index = ignore_index;
  r.label_smoothing = label_smoothing;
  r.softcap = softcap.value_or(0.0);
  return r;
}

CeForwardOut allocate_forward(const CeRows& rows, Reduction reduction) {
  const auto opts = rows.logits.options().memory_format(at::MemoryFormat::Contiguous);
  const auto acc_opts = opts.dtype(acc_scalar_type(rows.logits.scalar_type()));
  CeForwardOut o;
  o.reduction = reduction;
  o.loss = reduction == Reduction::kNone ? at::empty({rows.rows}, opts) : at::empty({}, opts);
  o.lse = at::empty({rows.rows}, acc_opts);
  o.total_weight = at::empty({}, acc_opts);
  return o;
}

void check_backward_inputs(const char* op, const CeRows& rows, Reduction reduction, const Tensor& grad_loss,
                           const Tensor& lse, const Tensor& total_weight) {
  const Tensor& input = rows.logits;
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  check::same_device(op, "grad_loss", grad_loss, "input", input);
  check::floating(op, "grad_loss", grad_loss);
  if (reduction == Reduction::kNone) {
    check::that(grad_loss.dim() == 1 && grad_loss.size(0) == rows.rows, op, "grad_loss",
                c10::str("to have shape [", rows.rows, "] (reduction 'none')"), "shape ", grad_loss.sizes());
  } else {
    check::that(grad_loss.dim() == 0, op, "grad_loss", "to have shape [] (a reduced loss)", "shape ",
                grad_loss.sizes());
  }
  check::same_device(op, "lse", lse, "input", input);
  check::that(lse.dim() == 1 && lse.size(0) == rows.rows && lse.scalar_type() == acc, op, "lse",
              c10::str("to hold ", rows.rows, " values of dtype ", check::dtype_name(acc), " (one per row)"),
              "shape ", lse.sizes(), " and dtype ", check::dtype_name(lse.scalar_type()));
  check::same_device(op, "total_weight", total_weight, "input", input);
  check::that(total_weight.dim() == 0 && total_weight.scalar_type() == acc, op, "total_weight",
              c10::str("to be a 0-dim tensor of dtype ", check::dtype_name(acc)), "shape ", total_weight.sizes(),
              " and dtype ", check::dtype_name(total_weight.scalar_type()));
}

void check_loss_grad_inputs(const char* op, const Tensor& input, const CeRows& rows, const Tensor& grad_scale) {
  // The input is this operator's output: its rows must be dense and distinct
  // (prepare_rows copies other layouts, which would drop the write).
  check::that(input.stride(1) == 1 && (rows.rows <= 1 || input.stride(0) >= rows.classes), op, "input",
              "to have contiguous, non-overlapping rows (it is overwritten with the gradient)", "strides ",
              input.strides());
  check::same_device(op, "grad_scale", grad_scale, "input", input);
  check::floating(op, "grad_scale", grad_scale);
  check::that(grad_scale.dim() == 0 || (grad_scale.dim() == 1 && grad_scale.size(0) == rows.rows), op, "grad_scale",
              c10::str("to have shape [] or [", rows.rows, "]"), "shape ", grad_scale.sizes());
}

// ---------------------------------------------------------------- linear cross-entropy

// The default chunk: its logits about the size of the hidden states, but at
// least this many tokens. Every chunk runs three matmuls whose shapes shrink
// with it (the weight gradient's inner dimension is the chunk's tokens),
// re-reads the weight twice and re-reads and re-writes the weight gradient;
// below ~512 tokens that costs more than 10% of a CPU step at Llama 3's sizes.
// torch_wsl/ops/cross_entropy.py's default_chunk_size mirrors this.
constexpr int64_t kMinDefaultChunk = 512;

int64_t default_linear_chunk(int64_t tokens, int64_t hidden, int64_t vocab) {
  const int64_t same_size = (tokens * hidden + vocab - 1) / std::max<int64_t>(vocab, 1);
  return std::max<int64_t>(1, std::min(tokens, std::max(same_size, kMinDefaultChunk)));
}

int64_t split_slab_rows(int64_t hidden, int64_t elem_bytes, bool cuda) {
  // A slab's product (~32 MiB here, 64 MiB on a GPU) is read back by the
  // accumulation right after the matmul wrote it, from the last-level cache
  // on this CPU; larger slabs mean fewer matmuls and parallel regions (CPU)
  // or launches (GPU) per chunk.
  const int64_t bytes = cuda ? (int64_t{64} << 20) : (int64_t{32} << 20);
  return std::max<int64_t>(1, bytes / std::max<int64_t>(hidden * elem_bytes, 1));
}

LinearCe prepare_linear(const char* op, const Tensor& input, const Tensor& weight, const Tensor& target,
                        const OptTensor& bias, int64_t ignore_index, std::string_view reduction,
                        double label_smoothing, std::optional<double> softcap, std::optional<int64_t> chunk_size) {
  check::floating(op, "input", input);
  check::that(input.dim() == 2, op, "input", "to have 2 dimensions [tokens, hidden]", "shape ", input.sizes());
  check::same_device(op, "weight", weight, "input", input);
  check::same_dtype(op, "weight", weight, "input", input);
  check::that(weight.dim() == 2, op, "weight", "to have 2 dimensions [vocab, hidden]", "shape ", weight.sizes());
  check::that(weight.size(1) == input.size(1), op, "weight",
              c10::str("to have input's hidden size ", input.size(1), " as its last dimension ([vocab, hidden])"),
              "shape ", weight.sizes());
  check::that(weight.size(0) >= 1, op, "weight", "to have at least one row (vocab >= 1)", "shape ", weight.sizes());
  check_target(op, target, input.size(0), input);
  if (bias) {
    check::same_device(op, "bias", *bias, "input", input);
    check::same_dtype(op, "bias", *bias, "input", input);
    check::that(bias->dim() == 1 && bias->size(0) == weight.size(0), op, "bias",
                c10::str("to have shape [", weight.size(0), "] (one per row of weight)"), "shape ", bias->sizes());
  }
  check_options(op, label_smoothing, softcap);
  LinearCe p;
  p.reduction = parse_reduction(op, reduction);
  if (chunk_size) check::that(*chunk_size >= 1, op, "chunk_size", ">= 1 or None", *chunk_size);
  p.input = input.contiguous();
  p.weight = weight.contiguous();
  if (bias) p.bias = bias->contiguous();
  p.target = target.contiguous();
  p.tokens = input.size(0);
  p.hidden = input.size(1);
  p.vocab = weight.size(0);
  p.chunk = chunk_size ? std::min(*chunk_size, std::max<int64_t>(p.tokens, 1))
                       : default_linear_chunk(p.tokens, p.hidden, p.vocab);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.softcap = softcap.value_or(0.0);
  return p;
}

void check_linear_grad_loss(const char* op, const Tensor& grad_loss, const LinearCe& p) {
  check::same_device(op, "grad_loss", grad_loss, "input", p.input);
  check::floating(op, "grad_loss", grad_loss);
  check::that(grad_loss.dim() == 1 && grad_loss.size(0) == p.tokens, op, "grad_loss",
              c10::str("to have shape [", p.tokens, "] (one per token)"), "shape ", grad_loss.sizes());
}

// ---------------------------------------------------------------- CPU backend

namespace {

cpu::CrossEntropyRows cpu_rows(const CeRows& r) {
  cpu::CrossEntropyRows a;
  a.logits = r.logits.const_data_ptr();
  a.rows = r.rows;
  a.classes = r.classes;
  a.row_stride = r.rows > 0 ? r.logits.stride(0) : r.classes;
  a.dtype = r.logits.scalar_type();
  a.target = r.target.const_data_ptr();
  a.target_int32 = r.target.scalar_type() == at::kInt;
  a.ignore_index = r.ignore_index;
  a.weight = r.weight.defined() ? r.weight.const_data_ptr() : nullptr;
  a.weight_sum = r.weight_sum.defined() ? r.weight_sum.item<double>() : static_cast<double>(r.classes);
  a.label_smoothing = r.label_smoothing;
  a.softcap = r.softcap;
  return a;
}

int64_t target_value(const Tensor& target, int64_t i) {
  return target.scalar_type() == at::kInt ? target.const_data_ptr<int32_t>()[i] : target.const_data_ptr<int64_t>()[i];
}

struct CpuCrossEntropyBackend {
  // Every target a class index or ignore_index; before anything is written.
  static void check_targets(const char* op, const Tensor& target, int64_t classes, int64_t ignore_index) {
    const int64_t n = target.numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = target_value(target, i);
      if (C10_UNLIKELY(t != ignore_index && (t < 0 || t >= classes))) {
        check::fail(op, "target",
                    c10::str("values to be class indices in [0, ", classes, ") or ignore_index (", ignore_index, ")"),
                    c10::str(t, " at position ", i));
      }
    }
  }

  static Tensor valid_count(const Tensor& target, int64_t ignore_index, at::ScalarType dtype) {
    return at::sum(at::ne(target, ignore_index), dtype);
  }

  static void forward(const CeRows& r, CeForwardOut& o) {
    const at::ScalarType acc = acc_scalar_type(r.logits.scalar_type());
    const bool direct = o.reduction == Reduction::kNone && o.loss.scalar_type() == acc;
    Tensor losses = direct ? o.loss : at::empty({r.rows}, o.lse.options());
    if (r.rows > 0) {
      cpu::CrossEntropyForwardArgs a;
      a.r = cpu_rows(r);
      a.loss = losses.mutable_data_ptr();
      a.lse = o.lse.mutable_data_ptr();
      cpu::cross_entropy_kernels().forward(a);
    }
    // Reductions and the total weight in double, in row order: deterministic
    // for any thread count.
    double total_weight = 0.0;
    for (int64_t i = 0; i < r.rows; ++i) {
      const int64_t t = target_value(r.target, i);
      if (t == r.ignore_index) continue;
      total_weight += r.weight.defined() ? (acc == at::kDouble ? r.weight.const_data_ptr<double>()[t]
                                                               : r.weight.const_data_ptr<float>()[t])
                                         : 1.0;
    }
    o.total_weight.fill_(total_weight);
    if (o.reduction == Reduction::kNone) {
      if (!direct) o.loss.copy_(losses);
      return;
    }
    double sum = 0.0;
    if (acc == at::kDouble) {
      const double* l = losses.const_data_ptr<double>();
      for (int64_t i = 0; i < r.rows; ++i) sum += l[i];
    } else {
      const float* l = losses.const_data_ptr<float>();
      for (int64_t i = 0; i < r.rows; ++i) sum += l[i];
    }
    o.loss.fill_(o.reduction == Reduction::kMean ? sum / total_weight : sum);
  }

  static void row_losses(const CeRows& r, Tensor& losses) {
    if (r.rows == 0) return;
    Tensor lse = at::empty({r.rows}, losses.options());
    cpu::CrossEntropyForwardArgs a;
    a.r = cpu_rows(r);
    a.loss = losses.mutable_data_ptr();
    a.lse = lse.mutable_data_ptr();
    cpu::cross_entropy_kernels().forward(a);
  }

  static void backward(const CeRows& r, const CeScale& s, const Tensor& lse, Tensor& grad) {
    if (r.rows == 0) return;
    cpu::CrossEntropyBackwardArgs a;
    a.r = cpu_rows(r);
    a.lse = lse.const_data_ptr();
    a.scale = s.scale.const_data_ptr();
    a.scale_dtype = s.scale.scalar_type();
    a.per_row_scale = s.per_row;
    a.divisor = s.divisor.defined() ? s.divisor.const_data_ptr() : nullptr;
    a.grad = grad.mutable_data_ptr();
    a.grad_row_stride = grad.stride(0);
    cpu::cross_entropy_kernels().backward(a);
  }

  static void loss_grad(const CeRows& r, const CeScale& s, Tensor& losses) {
    if (r.rows == 0) return;
    cpu::CrossEntropyLossGradArgs a;
    a.r = cpu_rows(r);
    a.r.logits = r.logits.mutable_data_ptr();
    a.scale = s.scale.const_data_ptr();
    a.scale_dtype = s.scale.scalar_type();
    a.per_row_scale = s.per_row;
    a.divisor = s.divisor.defined() ? s.divisor.const_data_ptr() : nullptr;
    a.loss = losses.mutable_data_ptr();
    cpu::cross_entropy_kernels().loss_grad(a);
  }

  static void split_accumulate(Tensor& hi, Tensor& lo, const Tensor& add, bool zero_first) {
    cpu::SplitAccumulateArgs a;
    a.hi = static_cast<uint16_t*>(hi.mutable_data_ptr());
    a.lo = static_cast<uint16_t*>(lo.mutable_data_ptr());
    a.rows = hi.size(0);
    a.cols = hi.size(1);
    a.ld = hi.stride(0);
    a.add = add.const_data_ptr();
    a.add_ld = add.stride(0);
    a.add_dtype = add.scalar_type();
    a.zero_first = zero_first;
    cpu::cross_entropy_kernels().split_accumulate(a);
  }

  static void split_finish(Tensor& hi, const Tensor& lo, at::ScalarType out_dtype) {
    cpu::SplitFinishArgs a;
    a.hi = static_cast<uint16_t*>(hi.mutable_data_ptr());
    a.lo = static_cast<const uint16_t*>(lo.const_data_ptr());
    a.n = hi.numel();
    a.out_dtype = out_dtype;
    cpu::cross_entropy_kernels().split_finish(a);
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_wsl, m) {
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight=None, str reduction=\"mean\", "
      "int ignore_index=-100, float label_smoothing=0.0, float? softcap=None)"
      " -> (Tensor loss, Tensor lse, Tensor total_weight)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor total_weight, str reduction, int ignore_index, float label_smoothing, float? softcap)"
      " -> Tensor grad_input");
  m.def(
      "cross_entropy_loss_grad_(Tensor(a!) input, Tensor target, Tensor grad_scale, Tensor? weight=None, "
      "int ignore_index=-100, float label_smoothing=0.0, float? softcap=None) -> Tensor loss");
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor target, Tensor? bias=None, int ignore_index=-100, "
      "str reduction=\"mean\", float label_smoothing=0.0, float? softcap=None, SymInt? chunk_size=None, "
      "bool[3] grad_mask=[False, False, False])"
      " -> (Tensor loss, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "int ignore_index, float label_smoothing, float? softcap, SymInt? chunk_size, bool[3] grad_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(torch_wsl, CPU, m) { register_cross_entropy_kernels<CpuCrossEntropyBackend>(m); }

// The in-place operator writes a gradient and has none. Its autograd kernel
// refuses an input that requires grad (its history would no longer describe
// its values); its ADInplaceOrView kernel bumps the input's version counter
// after the write, so autograd refuses tensors it saved before they were
// overwritten. (PyTorch's fallbacks bump only mutated tensors that the
// schema returns, and a custom operator cannot return an alias of an input
// under torch.compile.)
namespace {

const at::Tensor& first_argument(const c10::OperatorHandle& op, const torch::jit::Stack* stack) {
  return (*stack)[stack->size() - op.schema().arguments().size()].toTensor();
}

void loss_grad_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::Tensor& input = first_argument(op, stack);
  check::that(!(at::GradMode::is_enabled() && input.requires_grad()), "cross_entropy_loss_grad_", "input",
              "not to require grad (it is overwritten with the gradient of its loss; the operator is not "
              "differentiable)",
              "a tensor that requires grad");
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void loss_grad_inplace_or_view(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::Tensor input = first_argument(op, stack);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  torch::autograd::impl::bump_version(input);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_wsl, Autograd, m) {
  m.impl("cross_entropy_loss_grad_", torch::CppFunction::makeFromBoxedFunction<&loss_grad_autograd>());
}
TORCH_LIBRARY_IMPL(torch_wsl, ADInplaceOrView, m) {
  m.impl("cross_entropy_loss_grad_", torch::CppFunction::makeFromBoxedFunction<&loss_grad_inplace_or_view>());
}

}  // namespace torch_wsl
