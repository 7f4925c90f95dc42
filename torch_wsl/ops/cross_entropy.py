"""Cross-entropy with softcap, its in-place loss-and-gradient form, and the chunked linear cross-entropy.

Operators (schemas in csrc/cross_entropy.cpp):

* ``cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, softcap)
  -> (loss, lse, total_weight)``: one pass over each row of logits (online
  max / sum-exp in float32, float64 for float64 logits), saving the row's
  log-sum-exp for ``cross_entropy_backward``, which reads the logits once and
  writes their gradient once.
* ``cross_entropy_loss_grad_(input, target, grad_scale, ...) -> loss``: per-row
  losses, and the gradient written over ``input`` (for callers that do not
  need the logits again; ``linear_cross_entropy`` uses it on each chunk).
* ``linear_cross_entropy(input, weight, target, bias, ...)``: the loss of
  ``input @ weight.T + bias`` without ever holding the ``[tokens, vocab]``
  logits; see :func:`linear_cross_entropy`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _checks, _dtensor
from ._autograd import forbid_double_backward

__all__ = ["cross_entropy", "cross_entropy_loss_grad_", "default_chunk_size", "linear_cross_entropy"]

_ops = torch.ops.torch_wsl
_REDUCTIONS = ("none", "mean", "sum")
# Mirrors csrc/cross_entropy.cpp's kMinDefaultChunk.
_MIN_DEFAULT_CHUNK = 512


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: Optional[float] = None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` for class-index targets, plus Gemma 2's logit softcap.

    input: ``[N, C]`` logits (also ``[C]``, and ``[N, C, d1, ...]`` with target
    ``[N, d1, ...]``, which are reshaped to rows first), float32 / bfloat16 /
    float16 / float64; target: class indices (int64 or int32) in ``[0, C)`` or
    ``ignore_index``. Class probabilities as targets are not supported. weight:
    ``[C]`` class weights. Reductions, ``ignore_index``, label smoothing and
    class weights follow torch's definition exactly ("mean" divides by the sum
    of the weights of the non-ignored targets; all ignored gives nan).
    ``softcap``: ``logits -> softcap * tanh(logits / softcap)`` before the loss
    (``final_logit_softcapping``), differentiated through.

    Forward: one pass over each row (float32 accumulation for 16-bit logits).
    Backward: one read of the logits, one write of their gradient.
    A target out of range raises on CPU before anything is written; on CUDA it
    trips a device-side assertion, as PyTorch's own kernel does (checking on
    the host would synchronize, which costs dearly under WSL2).
    """
    options = (weight, reduction, ignore_index, label_smoothing, softcap)
    if input.dim() == 2:
        return _rows_loss(input, target, *options)
    if input.dim() == 1:  # one sample: [C] and a 0-dim target
        loss = _rows_loss(input.unsqueeze(0), target.reshape(1), *options)
        return loss.squeeze(0) if reduction == "none" else loss
    if input.dim() > 2:  # [N, C, d1, ...]: rows are the (n, d1, ...) positions
        classes = input.shape[1]
        loss = _rows_loss(input.movedim(1, -1).reshape(-1, classes), target.reshape(-1), *options)
        return loss.reshape(target.shape) if reduction == "none" else loss
    # 0-dim input: let the operator name the problem
    return _ops.cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, softcap)[0]


def _rows_loss(input, target, weight, reduction, ignore_index, label_smoothing, softcap) -> Tensor:
    if reduction == "mean" and _dtensor.is_sharded_dtensor(input):
        # Rows on several ranks: the mean is the sum over all ranks divided by their total weight,
        # not the mean of the ranks' means. The "sum" operator gives both as partial sums
        # (DTensor reduces them, two scalars), so the logits are never gathered.
        loss_sum, _, total_weight = _ops.cross_entropy(
            input, target, weight, "sum", ignore_index, label_smoothing, softcap
        )
        return (loss_sum / total_weight).to(loss_sum.dtype)
    return _ops.cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, softcap)[0]


def cross_entropy_loss_grad_(
    input: Tensor,
    target: Tensor,
    grad_scale: Union[Tensor, float] = 1.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    *,
    softcap: Optional[float] = None,
) -> Tensor:
    """Per-row cross-entropy losses, with ``d loss_i / d input_i * grad_scale`` written over ``input``.

    For callers whose logits are not needed after the loss: one read of each
    row from memory, the gradient formed while the row is cached, no second
    ``[N, C]`` buffer. ``input``: ``[N, C]`` with contiguous, non-overlapping
    rows (it is overwritten). ``grad_scale``: a number, a 0-dim tensor, or one
    value per row (e.g. ``1 / number_of_valid_targets`` for a mean, on the
    device, without a host synchronization). Returns the ``[N]`` float32
    (float64 for float64 input) losses, 0 for ignored rows, which get a zero
    gradient. Not differentiable (it is a gradient).
    """
    if not isinstance(grad_scale, Tensor):
        grad_scale = torch.full((), float(grad_scale), dtype=torch.float32, device=input.device)
    return _ops.cross_entropy_loss_grad_(input, target, grad_scale, weight, ignore_index, label_smoothing, softcap)


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """The tokens per chunk ``linear_cross_entropy`` uses when ``chunk_size`` is None.

    A chunk's logits (``chunk x vocab``) about the size of the hidden states
    (``tokens x hidden``), but at least 512 tokens, and at most all tokens.
    The floor is for speed: every chunk runs three matmuls whose shapes shrink
    with the chunk (the weight gradient's has the chunk's tokens as its inner
    dimension), re-reads the weight twice and re-reads and re-writes the
    weight gradient once; below ~512 tokens that costs more than 10% on a CPU
    (measured here at Llama 3's sizes). Llama 3 (hidden 2048, vocab 128256)
    at 4096 tokens: 512 tokens, chunk logits 1/8 of the full logits.
    """
    same_size = -(-tokens * hidden // max(vocab, 1))
    return max(1, min(tokens, max(same_size, _MIN_DEFAULT_CHUNK)))


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``cross_entropy(F.linear(input, weight, bias), target, ...)`` without holding the full logits.

    input: ``[..., hidden]`` hidden states (e.g. ``[batch, seq, hidden]``);
    weight: ``[vocab, hidden]`` (the LM head, possibly tied to the embedding);
    bias: ``[vocab]``; target: ``input.shape[:-1]`` class indices. All floating
    tensors share one dtype. Tokens are processed ``chunk_size`` at a time
    (default: :func:`default_chunk_size`): per chunk the logits come from
    ATen's matmul (cuBLAS on CUDA, the CPU BLAS here), the in-place
    loss-and-gradient kernel turns them into their gradient, and two more
    matmuls push it into the gradients of input, weight and bias, all in the
    forward; the backward only scales them by the loss's gradient. So peak
    memory holds one chunk's logits, not ``tokens x vocab``.

    For bfloat16/float16 weights the weight gradient is summed over chunks in
    float32 (each chunk's product is rounded to the weight's dtype once, as a
    single matmul would round it); the float32 sum lives in the result's own
    storage plus a 16-bit side buffer, so it costs 2 bytes per weight element
    (0.5 GiB for Llama 3's LM head) during the call, instead of a separate
    float32 copy next to the result.

    reduction "none" returns per-token losses ``input.shape[:-1]``; their
    gradient needs each token's upstream gradient, so its backward computes
    the chunks again (one more logits matmul than the fused "mean"/"sum").
    Any chunk size gives the same result within float32 rounding.
    """
    if reduction not in _REDUCTIONS:  # the operator names it; keep shapes below meaningful
        return _ops.linear_cross_entropy(
            input, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size,
            [False, False, False],
        )[0]
    hidden = input.shape[-1] if input.dim() > 0 else 1
    x = input.reshape(-1, hidden) if input.dim() != 2 else input
    t = target.reshape(-1) if target.dim() != 1 else target
    grad = torch.is_grad_enabled()
    mask = [
        grad and input.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    ]
    if reduction == "mean" and _dtensor.is_sharded_dtensor(x):
        # Tokens on several ranks: the sum over all ranks divided by their count of valid targets
        # (see _rows_loss); the hidden states are not gathered and the LM head's gradient stays a
        # partial sum.
        loss_sum = _ops.linear_cross_entropy(x, weight, t, bias, ignore_index, "sum", label_smoothing, softcap,
                                             chunk_size, mask)[0]
        return (loss_sum / (t != ignore_index).sum()).to(loss_sum.dtype)
    loss = _ops.linear_cross_entropy(x, weight, t, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size,
                                     mask)[0]
    if reduction == "none" and input.dim() != 2:
        loss = loss.reshape(input.shape[:-1])
    return loss


# ---------------------------------------------------------------- fake kernels
# Shapes and dtypes only, mirroring csrc/cross_entropy.cpp's checks (same
# order, same words, through _checks) and its allocation.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_options(op: str, label_smoothing: float, softcap: Optional[float]) -> None:
    _checks.that(
        0.0 <= label_smoothing <= 1.0, op, "label_smoothing", "to be in [0, 1]", lambda: _checks.num_str(label_smoothing)
    )
    if softcap is not None:
        ok = softcap > 0.0 and softcap != float("inf")
        _checks.that(ok, op, "softcap", "to be a positive finite number or None", lambda: _checks.num_str(softcap))


def _check_target(op: str, target: Tensor, rows, input: Tensor) -> None:
    _checks.that(
        target.dtype in _checks.INTEGER,
        op,
        "target",
        "to hold class indices as int64 or int32 (class probabilities are not supported)",
        lambda: _checks.dtype_name(target.dtype),
    )
    _checks.same_device(op, "target", target, "input", input)
    _checks.that(
        target.dim() == 1 and target.shape[0] == rows,
        op,
        "target",
        f"to have shape [{rows}] (one class index per row of input)",
        lambda: "shape " + _checks.shape_str(target.shape),
    )


def _parse_reduction(op: str, reduction: str) -> str:
    _checks.that(reduction in _REDUCTIONS, op, "reduction", "to be 'none', 'mean' or 'sum'", lambda: f"'{reduction}'")
    return reduction


def _check_rows(op, input, target, weight, label_smoothing, softcap) -> None:
    """prepare_rows's checks."""
    _checks.floating(op, "input", input)
    _checks.that(
        input.dim() == 2, op, "input", "to have 2 dimensions [batch, classes]",
        lambda: "shape " + _checks.shape_str(input.shape),
    )
    _checks.that(
        input.shape[1] >= 1, op, "input", "to have at least one class (input.shape[1] >= 1)",
        lambda: "shape " + _checks.shape_str(input.shape),
    )
    _check_target(op, target, input.shape[0], input)
    if weight is not None:
        _checks.same_device(op, "weight", weight, "input", input)
        _checks.floating(op, "weight", weight)
        _checks.that(
            weight.dim() == 1 and weight.shape[0] == input.shape[1],
            op,
            "weight",
            f"to have shape [{input.shape[1]}] (one weight per class)",
            lambda: "shape " + _checks.shape_str(weight.shape),
        )
    _check_options(op, label_smoothing, softcap)


@torch.library.register_fake("torch_wsl::cross_entropy")
def _cross_entropy_fake(input, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                        softcap=None):
    _check_rows("cross_entropy", input, target, weight, label_smoothing, softcap)
    reduction = _parse_reduction("cross_entropy", reduction)
    acc = _acc_dtype(input.dtype)
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == "none" else ())
    return loss, input.new_empty((rows,), dtype=acc), input.new_empty((), dtype=acc)


@torch.library.register_fake("torch_wsl::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
                                 label_smoothing, softcap):
    op = "cross_entropy_backward"
    _check_rows(op, input, target, weight, label_smoothing, softcap)
    reduction = _parse_reduction(op, reduction)
    rows = input.shape[0]
    acc = _acc_dtype(input.dtype)
    _checks.same_device(op, "grad_loss", grad_loss, "input", input)
    _checks.floating(op, "grad_loss", grad_loss)
    if reduction == "none":
        _checks.that(
            grad_loss.dim() == 1 and grad_loss.shape[0] == rows, op, "grad_loss",
            f"to have shape [{rows}] (reduction 'none')", lambda: "shape " + _checks.shape_str(grad_loss.shape),
        )
    else:
        _checks.that(
            grad_loss.dim() == 0, op, "grad_loss", "to have shape [] (a reduced loss)",
            lambda: "shape " + _checks.shape_str(grad_loss.shape),
        )
    _checks.same_device(op, "lse", lse, "input", input)
    _checks.that(
        lse.dim() == 1 and lse.shape[0] == rows and lse.dtype == acc,
        op,
        "lse",
        f"to hold {rows} values of dtype {_checks.dtype_name(acc)} (one per row)",
        lambda: f"shape {_checks.shape_str(lse.shape)} and dtype {_checks.dtype_name(lse.dtype)}",
    )
    _checks.same_device(op, "total_weight", total_weight, "input", input)
    _checks.that(
        total_weight.dim() == 0 and total_weight.dtype == acc,
        op,
        "total_weight",
        f"to be a 0-dim tensor of dtype {_checks.dtype_name(acc)}",
        lambda: f"shape {_checks.shape_str(total_weight.shape)} and dtype {_checks.dtype_name(total_weight.dtype)}",
    )
    return input.new_empty((rows, input.shape[1]))


@torch.library.register_fake("torch_wsl::cross_entropy_loss_grad_")
def _cross_entropy_loss_grad_fake(input, target, grad_scale, weight=None, ignore_index=-100, label_smoothing=0.0,
                                  softcap=None):
    op = "cross_entropy_loss_grad_"
    _check_rows(op, input, target, weight, label_smoothing, softcap)
    rows, classes = input.shape
    _checks.that(
        input.stride(1) == 1 and (rows <= 1 or input.stride(0) >= classes),
        op,
        "input",
        "to have contiguous, non-overlapping rows (it is overwritten with the gradient)",
        lambda: "strides " + _checks.shape_str(input.stride()),
    )
    _checks.same_device(op, "grad_scale", grad_scale, "input", input)
    _checks.floating(op, "grad_scale", grad_scale)
    _checks.that(
        grad_scale.dim() == 0 or (grad_scale.dim() == 1 and grad_scale.shape[0] == rows),
        op,
        "grad_scale",
        f"to have shape [] or [{rows}]",
        lambda: "shape " + _checks.shape_str(grad_scale.shape),
    )
    return input.new_empty((rows,), dtype=_acc_dtype(input.dtype))


def _check_linear(op, input, weight, target, bias, reduction, label_smoothing, softcap, chunk_size) -> str:
    """prepare_linear's checks; returns the reduction."""
    _checks.floating(op, "input", input)
    _checks.that(
        input.dim() == 2, op, "input", "to have 2 dimensions [tokens, hidden]",
        lambda: "shape " + _checks.shape_str(input.shape),
    )
    _checks.same_device(op, "weight", weight, "input", input)
    _checks.same_dtype(op, "weight", weight, "input", input)
    _checks.that(
        weight.dim() == 2, op, "weight", "to have 2 dimensions [vocab, hidden]",
        lambda: "shape " + _checks.shape_str(weight.shape),
    )
    _checks.that(
        weight.shape[1] == input.shape[1],
        op,
        "weight",
        f"to have input's hidden size {input.shape[1]} as its last dimension ([vocab, hidden])",
        lambda: "shape " + _checks.shape_str(weight.shape),
    )
    _checks.that(
        weight.shape[0] >= 1, op, "weight", "to have at least one row (vocab >= 1)",
        lambda: "shape " + _checks.shape_str(weight.shape),
    )
    _check_target(op, target, input.shape[0], input)
    if bias is not None:
        _checks.same_device(op, "bias", bias, "input", input)
        _checks.same_dtype(op, "bias", bias, "input", input)
        _checks.that(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            op,
            "bias",
            f"to have shape [{weight.shape[0]}] (one per row of weight)",
            lambda: "shape " + _checks.shape_str(bias.shape),
        )
    _check_options(op, label_smoothing, softcap)
    reduction = _parse_reduction(op, reduction)
    if chunk_size is not None:
        _checks.that(chunk_size >= 1, op, "chunk_size", ">= 1 or None", lambda: str(chunk_size))
    return reduction


def _linear_grads_fake(input, weight, bias, want):
    gi = input.new_empty(input.shape) if want[0] else input.new_empty((0,))
    gw = weight.new_empty(weight.shape) if want[1] else input.new_empty((0,))
    gb = bias.new_empty(bias.shape) if (want[2] and bias is not None) else input.new_empty((0,))
    return gi, gw, gb


@torch.library.register_fake("torch_wsl::linear_cross_entropy")
def _linear_cross_entropy_fake(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, softcap=None, chunk_size=None, grad_mask=(False, False, False)):
    reduction = _check_linear("linear_cross_entropy", input, weight, target, bias, reduction, label_smoothing, softcap,
                              chunk_size)
    fused = reduction != "none"
    want = [fused and grad_mask[0], fused and grad_mask[1], fused and grad_mask[2] and bias is not None]
    loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
    return (loss, *_linear_grads_fake(input, weight, bias, want))


@torch.library.register_fake("torch_wsl::linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(grad_loss, input, weight, target, bias, ignore_index, label_smoothing, softcap,
                                        chunk_size, grad_mask):
    op = "linear_cross_entropy_backward"
    _check_linear(op, input, weight, target, bias, "none", label_smoothing, softcap, chunk_size)
    tokens = input.shape[0]
    _checks.same_device(op, "grad_loss", grad_loss, "input", input)
    _checks.floating(op, "grad_loss", grad_loss)
    _checks.that(
        grad_loss.dim() == 1 and grad_loss.shape[0] == tokens, op, "grad_loss",
        f"to have shape [{tokens}] (one per token)", lambda: "shape " + _checks.shape_str(grad_loss.shape),
    )
    return _linear_grads_fake(input, weight, bias, [grad_mask[0], grad_mask[1], grad_mask[2] and bias is not None])


# -------------------------------------------------------------------- autograd


def _needs(ctx, i: int) -> bool:
    # The dispatcher drops trailing arguments equal to their defaults, and
    # needs_input_grad with them.
    return i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]


def _setup_cross_entropy(ctx, inputs, output):
    input, target, weight, reduction, ignore_index, label_smoothing, softcap = inputs
    _, lse, total_weight = output
    # No zeros materialized for the gradients of lse and total_weight.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, total_weight)
    ctx.options = (reduction, ignore_index, label_smoothing, softcap)
    ctx.save_for_backward(input, target, weight, lse, total_weight)


def _backward_cross_entropy(ctx, grad_loss, _grad_lse, _grad_total_weight):
    input, target, weight, lse, total_weight = ctx.saved_tensors
    if _needs(ctx, 2):
        raise RuntimeError("torch_wsl.cross_entropy: the gradient of weight is not implemented "
                           "(as in torch.nn.functional.cross_entropy)")
    grad_input = None
    if _needs(ctx, 0) and grad_loss is not None:
        reduction, ignore_index, label_smoothing, softcap = ctx.options
        grad_input = _ops.cross_entropy_backward(
            grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing, softcap
        )
    return grad_input, None, None, None, None, None, None


def _setup_linear_cross_entropy(ctx, inputs, output):
    input, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size, grad_mask = inputs
    _, gi, gw, gb = output
    # Without this, autograd would hand the backward zero tensors for the
    # gradient outputs' own (unused) gradients: weight-sized, each call.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(gi, gw, gb)
    ctx.reduction = reduction
    ctx.grad_mask = list(grad_mask)
    ctx.has_bias = bias is not None
    ctx.options = (ignore_index, label_smoothing, softcap, chunk_size)
    ctx.save_for_backward(input, weight, target, bias)
    # With a reduction, the forward formed the gradients: the first backward
    # takes them (off the context, so nothing else holds them) and scales
    # them in place; no weight-sized copy is made.
    ctx.fused_grads = [gi, gw, gb] if reduction != "none" else None


def _tracing(t: Tensor) -> bool:
    """Whether the backward is being traced (torch.compile, AOT autograd, make_fx) or runs on tensor subclasses:
    there, mutating the forward's outputs is not allowed (and a compiler plans the memory itself)."""
    return torch.compiler.is_compiling() or type(t) is not Tensor or torch._C._len_torch_dispatch_stack() > 0


def _backward_linear_cross_entropy(ctx, grad_loss, _gi, _gw, _gb):
    needs = [_needs(ctx, 0), _needs(ctx, 1), ctx.has_bias and _needs(ctx, 3)]
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None, None
    if ctx.fused_grads is not None:
        for i, name in enumerate(("input", "weight", "bias")):
            if needs[i] and not ctx.grad_mask[i]:
                raise RuntimeError(
                    f"torch_wsl.linear_cross_entropy: the gradient of {name} was not computed in the forward "
                    f"({name} did not require grad, or grad mode was off, when the loss was computed)"
                )
        fused, ctx.fused_grads = ctx.fused_grads, None
        # mark_non_differentiable kept references too; with them gone, autograd
        # takes the gradients as they are instead of cloning them.
        ctx.non_differentiable = ()
        if _tracing(grad_loss):
            grads = [g * grad_loss if need else None for g, need in zip(fused, needs)]
        else:
            grads = [g.mul_(grad_loss) if need else None for g, need in zip(fused, needs)]
        del fused
        return grads[0], grads[1], None, grads[2], None, None, None, None, None, None
    # Per-token losses, or a second backward through the same graph
    # (retain_graph, gradcheck): the chunks are run again with each token's
    # upstream gradient.
    input, weight, target, bias = ctx.saved_tensors
    ignore_index, label_smoothing, softcap, chunk_size = ctx.options
    per_token = grad_loss
    if ctx.reduction != "none":
        per_token = grad_loss.expand(target.shape)
        if ctx.reduction == "mean":
            per_token = per_token / (target != ignore_index).sum()
    gi, gw, gb = _ops.linear_cross_entropy_backward(
        per_token, input, weight, target, bias, ignore_index, label_smoothing, softcap, chunk_size, needs
    )
    grads = [gi if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None]
    return grads[0], grads[1], None, grads[2], None, None, None, None, None, None


torch.library.register_autograd(
    "torch_wsl::cross_entropy", _backward_cross_entropy, setup_context=_setup_cross_entropy
)
torch.library.register_autograd(
    "torch_wsl::linear_cross_entropy", _backward_linear_cross_entropy, setup_context=_setup_linear_cross_entropy
)
forbid_double_backward("torch_wsl::cross_entropy_backward", "torch_wsl::linear_cross_entropy_backward")
