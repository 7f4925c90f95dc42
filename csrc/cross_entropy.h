// The operator layer of the cross-entropy family, shared by the CPU
// (csrc/cross_entropy.cpp) and CUDA (csrc/cuda/cross_entropy_kernels.cu)
// registrations: argument checks with messages that name the argument, output
// allocation, and every operator of the family for one backend, including the
// chunked linear cross-entropy, which is written once here on ATen's matmuls
// and the backend's row kernels.
//
// A backend supplies (all on checked, allocated tensors):
//   forward(const CeRows&, CeForwardOut&)      the loss (reduced), per-row lse, total weight
//   backward(const CeRows&, const CeScale&, const Tensor& lse, Tensor& grad)
//   row_losses(const CeRows&, Tensor& loss)     per-row losses (acc dtype), no gradient
//   loss_grad(const CeRows&, const CeScale&, Tensor& loss)
//                                               per-row losses, gradient written over the logits
//   check_targets(op, target, classes, ignore_index)
//                                               data-dependent target check, before anything is written
//                                               (CPU: an error; CUDA: nothing, the kernels assert)
//   valid_count(target, ignore_index, dtype) -> Tensor
//                                               number of non-ignored targets, 0-dim, on the device
//   split_accumulate(Tensor& hi, Tensor& lo, const Tensor& add, bool zero_first)
//   split_finish(Tensor& hi, const Tensor& lo, at::ScalarType out_dtype)
#pragma once

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace torch_wsl {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum class Reduction { kNone, kMean, kSum };

// One batch of rows to take the loss of, checked.
struct CeRows {
  Tensor logits;      // [rows, classes], stride(1) == 1 (row stride free)
  Tensor target;      // [rows], contiguous, int64 or int32
  Tensor weight;      // [classes], contiguous, accumulation dtype; undefined: no class weights
  Tensor weight_sum;  // 0-dim accumulation dtype: sum(weight); defined iff weight and label_smoothing > 0
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double softcap = 0.0;  // 0: none
};

// The gradient's per-row scale: scale[per_row ? i : 0] / divisor (divisor
// undefined: 1). scale has any floating dtype, divisor the accumulation dtype.
struct CeScale {
  Tensor scale;
  bool per_row = false;
  Tensor divisor;
};

struct CeForwardOut {
  Tensor loss;          // [rows] (none) or 0-dim, logits' dtype
  Tensor lse;           // [rows], accumulation dtype
  Tensor total_weight;  // 0-dim, accumulation dtype
  Reduction reduction = Reduction::kMean;
};

Reduction parse_reduction(const char* op, std::string_view reduction);

// Checks shared by the operators, in the order the fake kernels run them.
CeRows prepare_rows(const char* op, const Tensor& input, const Tensor& target, const OptTensor& weight,
                    int64_t ignore_index, double label_smoothing, std::optional<double> softcap);
void check_options(const char* op, double label_smoothing, std::optional<double> softcap);
CeForwardOut allocate_forward(const CeRows& rows, Reduction reduction);

// Backward-only checks: grad_loss ([rows] for none, else 0-dim), lse, total_weight.
void check_backward_inputs(const char* op, const CeRows& rows, Reduction reduction, const Tensor& grad_loss,
                           const Tensor& lse, const Tensor& total_weight);

// In-place loss-and-gradient checks: input rows contiguous (written), grad_scale 0-dim or [rows].
void check_loss_grad_inputs(const char* op, const Tensor& input, const CeRows& rows, const Tensor& grad_scale);

// ---------------------------------------------------------------- linear cross-entropy

struct LinearCe {
  Tensor input;   // [tokens, hidden], contiguous
  Tensor weight;  // [vocab, hidden], contiguous, input's dtype
  Tensor bias;    // [vocab] or undefined
  Tensor target;  // [tokens] contiguous
  int64_t tokens = 0;
  int64_t hidden = 0;
  int64_t vocab = 0;
  int64_t chunk = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double softcap = 0.0;
  Reduction reduction = Reduction::kMean;
};

LinearCe prepare_linear(const char* op, const Tensor& input, const Tensor& weight, const Tensor& target,
                        const OptTensor& bias, int64_t ignore_index, std::string_view reduction,
                        double label_smoothing, std::optional<double> softcap, std::optional<int64_t> chunk_size);

// The default chunk: a chunk's logits about the size of the hidden states
// (tokens * hidden elements), but at least kMinDefaultChunk tokens (see
// cross_entropy.cpp), and never more than the tokens.
int64_t default_linear_chunk(int64_t tokens, int64_t hidden, int64_t vocab);

// Rows of the weight gradient accumulated per matmul when it is kept as
// split float32 (bfloat16/float16 weights): a slab's product stays in cache.
int64_t split_slab_rows(int64_t hidden, int64_t elem_bytes, bool cuda);

// linear_cross_entropy_backward's grad_loss: [tokens].
void check_linear_grad_loss(const char* op, const Tensor& grad_loss, const LinearCe& p);

struct LinearCeGrads {
  Tensor grad_input;
  Tensor grad_weight;
  Tensor grad_bias;
};

// The chunk loop. With `scale` given, each chunk's loss gradient (scaled per
// row by it) is pushed through the linear layer into the wanted gradients
// (want: input, weight, bias); `losses` ([tokens], accumulation dtype)
// receives the per-row losses either way.
template <typename Backend>
LinearCeGrads linear_ce_chunks(const LinearCe& p, const CeScale* scale, std::array<bool, 3> want, Tensor& losses) {
  const at::ScalarType dtype = p.input.scalar_type();
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // bfloat16/float16 weight gradients are summed over chunks in float32, kept
  // split across the result's own storage and a 16-bit side buffer.
  const bool split = dtype == at::kBFloat16 || dtype == at::kHalf;
  const bool grads = scale != nullptr;
  LinearCeGrads g;
  Tensor lo, slab_buf, bias_acc;
  if (grads && want[0]) g.grad_input = at::empty({p.tokens, p.hidden}, p.input.options());
  if (grads && want[1]) {
    g.grad_weight = at::empty({p.vocab, p.hidden}, p.weight.options());
    if (split) lo = at::empty({p.vocab, p.hidden}, p.weight.options().dtype(at::kShort));
  }
  if (grads && want[2]) bias_acc = at::zeros({p.vocab}, p.input.options().dtype(acc));
  const int64_t slab = split ? split_slab_rows(p.hidden, p.input.element_size(), p.input.is_cuda()) : 0;
  if (lo.defined()) slab_buf = at::empty({std::min(slab, p.vocab), p.hidden}, p.input.options());
  Tensor buf = at::empty({std::min(p.chunk, p.tokens), p.vocab}, p.input.options());
  const Tensor weight_t = p.weight.t();
  for (int64_t s = 0; s < p.tokens; s += p.chunk) {
    const int64_t n = std::min(p.chunk, p.tokens - s);
    const Tensor x = p.input.narrow(0, s, n);
    Tensor logits = buf.narrow(0, 0, n);
    if (p.bias.defined()) {
      at::addmm_out(logits, p.bias, x, weight_t);
    } else {
      at::mm_out(logits, x, weight_t);
    }
    CeRows rows;
    rows.logits = logits;
    rows.target = p.target.narrow(0, s, n);
    rows.rows = n;
    rows.classes = p.vocab;
    rows.ignore_index = p.ignore_index;
    rows.label_smoothing = p.label_smoothing;
    rows.softcap = p.softcap;
    Tensor chunk_losses = losses.narrow(0, s, n);
    if (!grads) {
      Backend::row_losses(rows, chunk_losses);
      continue;
    }
    CeScale sc = *scale;
    if (sc.per_row) sc.scale = sc.scale.narrow(0, s, n);
    Backend::loss_grad(rows, sc, chunk_losses);  // logits now hold d loss / d logits
    if (g.grad_input.defined()) {
      Tensor gi = g.grad_input.narrow(0, s, n);
      at::mm_out(gi, logits, p.weight);
    }
    if (g.grad_weight.defined()) {
      const bool first = s == 0;
      if (!split) {
        if (first) {
          at::mm_out(g.grad_weight, logits.t(), x);
        } else {
          g.grad_weight.addmm_(logits.t(), x);
        }
      } else {
        for (int64_t v0 = 0; v0 < p.vocab; v0 += slab) {
          const int64_t m = std::min(slab, p.vocab - v0);
          Tensor product = slab_buf.narrow(0, 0, m);
          at::mm_out(product, logits.narrow(1, v0, m).t(), x);
          Tensor hi_rows = g.grad_weight.narrow(0, v0, m);
          Tensor lo_rows = lo.narrow(0, v0, m);
          Backend::split_accumulate(hi_rows, lo_rows, product, first);
        }
      }
    }
    if (bias_acc.defined()) bias_acc.add_(at::sum(logits, {0}, false, acc));
  }
  if (g.grad_weight.defined()) {
    if (p.tokens == 0) {
      g.grad_weight.zero_();
    } else if (split) {
      Backend::split_finish(g.grad_weight, lo, dtype);
    }
  }
  if (bias_acc.defined()) g.grad_bias = bias_acc.to(dtype);
  return g;
}

inline Tensor reduce_losses(const Tensor& losses, Reduction reduction, const Tensor& count, at::ScalarType dtype) {
  switch (reduction) {
    case Reduction::kNone: return losses.to(dtype);
    case Reduction::kSum: return losses.sum().to(dtype);
    default: return losses.sum().div(count).to(dtype);
  }
}

inline Tensor or_empty(const Tensor& t, const Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); }

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_forward(
    const Tensor& input, const Tensor& weight, const Tensor& target, const OptTensor& bias, int64_t ignore_index,
    std::string_view reduction, double label_smoothing, std::optional<double> softcap,
    std::optional<int64_t> chunk_size, std::array<bool, 3> grad_mask) {
  const char* op = "linear_cross_entropy";
  const LinearCe p =
      prepare_linear(op, input, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size);
  Backend::check_targets(op, p.target, p.vocab, p.ignore_index);
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::array<bool, 3> want = {grad_mask[0], grad_mask[1], grad_mask[2] && p.bias.defined()};
  // With a reduction, the gradients are formed here, chunk by chunk, and the
  // backward only scales them; per-row losses ("none") need the per-row
  // upstream gradient, so their backward runs the chunks again.
  const bool fused = p.reduction != Reduction::kNone && (want[0] || want[1] || want[2]);
  Tensor count;
  if (p.reduction == Reduction::kMean) count = Backend::valid_count(p.target, p.ignore_index, acc);
  CeScale sc;
  if (fused) {
    sc.scale = at::ones({}, input.options().dtype(acc));
    sc.divisor = count;
  }
  Tensor losses = at::empty({p.tokens}, input.options().dtype(acc));
  LinearCeGrads g = linear_ce_chunks<Backend>(p, fused ? &sc : nullptr, want, losses);
  return std::make_tuple(reduce_losses(losses, p.reduction, count, input.scalar_type()),
                         or_empty(g.grad_input, input), or_empty(g.grad_weight, input), or_empty(g.grad_bias, input));
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const Tensor& target, const OptTensor& bias,
    int64_t ignore_index, double label_smoothing, std::optional<double> softcap, std::optional<int64_t> chunk_size,
    std::array<bool, 3> grad_mask) {
  const char* op = "linear_cross_entropy_backward";
  const LinearCe p =
      prepare_linear(op, input, weight, target, bias, ignore_index, "none", label_smoothing, softcap, chunk_size);
  check_linear_grad_loss(op, grad_loss, p);
  Backend::check_targets(op, p.target, p.vocab, p.ignore_index);
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::array<bool, 3> want = {grad_mask[0], grad_mask[1], grad_mask[2] && p.bias.defined()};
  CeScale sc;
  sc.scale = grad_loss.contiguous();
  sc.per_row = true;
  Tensor losses = at::empty({p.tokens}, input.options().dtype(acc));
  LinearCeGrads g = linear_ce_chunks<Backend>(p, &sc, want, losses);
  return std::make_tuple(or_empty(g.grad_input, input), or_empty(g.grad_weight, input), or_empty(g.grad_bias, input));
}

// ---------------------------------------------------------------- registration

inline std::string_view as_view(c10::string_view s) { return std::string_view(s.data(), s.size()); }

template <typename Backend>
void register_cross_entropy_kernels(torch::Library& m) {
  m.impl("cross_entropy", [](const Tensor& input, const Tensor& target, const OptTensor& weight,
                             c10::string_view reduction, int64_t ignore_index, double label_smoothing,
                             std::optional<double> softcap) {
    const char* op = "cross_entropy";
    const CeRows rows = prepare_rows(op, input, target, weight, ignore_index, label_smoothing, softcap);
    const Reduction red = parse_reduction(op, as_view(reduction));
    Backend::check_targets(op, rows.target, rows.classes, rows.ignore_index);
    CeForwardOut out = allocate_forward(rows, red);
    Backend::forward(rows, out);
    return std::make_tuple(out.loss, out.lse, out.total_weight);
  });
  m.impl("cross_entropy_backward", [](const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                      const OptTensor& weight, const Tensor& lse, const Tensor& total_weight,
                                      c10::string_view reduction, int64_t ignore_index, double label_smoothing,
                                      std::optional<double> softcap) {
    const char* op = "cross_entropy_backward";
    const CeRows rows = prepare_rows(op, input, target, weight, ignore_index, label_smoothing, softcap);
    const Reduction red = parse_reduction(op, as_view(reduction));
    check_backward_inputs(op, rows, red, grad_loss, lse, total_weight);
    Backend::check_targets(op, rows.target, rows.classes, rows.ignore_index);
    CeScale sc;
    sc.scale = grad_loss.contiguous();
    sc.per_row = red == Reduction::kNone;
    if (red == Reduction::kMean) sc.divisor = total_weight;
    Tensor grad = at::empty({rows.rows, rows.classes}, input.options().memory_format(at::MemoryFormat::Contiguous));
    Backend::backward(rows, sc, lse.contiguous(), grad);
    return grad;
  });
  m.impl("cross_entropy_loss_grad_", [](const Tensor& input, const Tensor& target, const Tensor& grad_scale,
                                        const OptTensor& weight, int64_t ignore_index, double label_smoothing,
                                        std::optional<double> softcap) {
    const char* op = "cross_entropy_loss_grad_";
    const CeRows rows = prepare_rows(op, input, target, weight, ignore_index, label_smoothing, softcap);
    check_loss_grad_inputs(op, input, rows, grad_scale);
    Backend::check_targets(op, rows.target, rows.classes, rows.ignore_index);
    CeScale sc;
    sc.scale = grad_scale.contiguous();
    sc.per_row = grad_scale.dim() == 1;
    Tensor loss = at::empty({rows.rows}, input.options().dtype(input.scalar_type() == at::kDouble ? at::kDouble
                                                                                                   : at::kFloat));
    Backend::loss_grad(rows, sc, loss);
    return loss;
  });
  m.impl("linear_cross_entropy", [](const Tensor& input, const Tensor& weight, const Tensor& target,
                                    const OptTensor& bias, int64_t ignore_index, c10::string_view reduction,
                                    double label_smoothing, std::optional<double> softcap,
                                    std::optional<int64_t> chunk_size, std::array<bool, 3> grad_mask) {
    return linear_cross_entropy_forward<Backend>(input, weight, target, bias, ignore_index, as_view(reduction),
                                                 label_smoothing, softcap, chunk_size, grad_mask);
  });
  m.impl("linear_cross_entropy_backward",
         [](const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const Tensor& target,
            const OptTensor& bias, int64_t ignore_index, double label_smoothing, std::optional<double> softcap,
            std::optional<int64_t> chunk_size, std::array<bool, 3> grad_mask) {
           return linear_cross_entropy_backward<Backend>(grad_loss, input, weight, target, bias, ignore_index,
                                                         label_smoothing, softcap, chunk_size, grad_mask);
         });
}

}  // namespace torch_wsl
