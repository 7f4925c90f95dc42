"""LayerNorm / RMSNorm operators: wrappers, fake kernels and autograd.

The operators (schemas in csrc/norm.cpp) return their saved statistics too;
the wrappers here return what ``torch.nn.functional`` returns. ``mean`` and
``rstd`` are float32 (float64 for float64 input) with shape
``input.shape[:-len(normalized_shape)]``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks
from ._autograd import forbid_double_backward

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm"]

_ops = torch.ops.torch_wsl
ShapeLike = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: ShapeLike) -> list[int]:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return list(normalized_shape)


def layer_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Same contract and result as ``torch.nn.functional.layer_norm``, one fused kernel each way."""
    return _ops.layer_norm(input, _as_shape(normalized_shape), weight, bias, eps)[0]


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """``residual_out = input + residual; output = layer_norm(residual_out)`` in one pass over memory.

    Returns ``(output, residual_out)``: the pre-norm transformer pattern, where
    ``residual_out`` carries the residual stream on. ``residual`` must have
    input's shape and dtype. Gradients flow to input, residual, weight and bias.
    """
    out = _ops.add_layer_norm(input, residual, _as_shape(normalized_shape), weight, bias, eps)
    return out[0], out[1]


CASTING_MODES = ("torch", "gemma", "llama")


def rms_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    offset: float = 0.0,
    casting_mode: str = "torch",
) -> Tensor:
    """``torch.nn.functional.rms_norm`` (eps=None: the machine epsilon of the accumulation type), plus the
    variants Hugging Face models compute, so a patched model matches its own code bit for bit:

    - ``offset``: the weight is ``offset + weight`` (added in float32). Gemma's ``x̂ * (1 + w)`` is ``offset=1``.
    - ``casting_mode="torch"`` (default) and ``"gemma"``: everything in float32, rounded once to input's dtype
      (torch's ``F.rms_norm``; Gemma's ``GemmaRMSNorm``).
    - ``casting_mode="llama"``: ``weight * x̂.to(input.dtype)`` (``LlamaRMSNorm``, also Mistral, Qwen2/3):
      x̂ is rounded to input's dtype before the weight multiplies it, in the dtype of their promotion (a
      float32 weight with bfloat16 input gives a float32 result, as in transformers).
    """
    shape = _as_shape(normalized_shape)
    if casting_mode == "llama" and weight is not None and weight.dtype != input.dtype:
        # Transformers multiplies in the promoted dtype: the kernel rounds x̂, ATen does the product.
        normed = _ops.rms_norm(input, shape, None, eps, 0.0, "llama")[0]
        return (weight + offset if offset else weight) * normed
    return _ops.rms_norm(input, shape, weight, eps, offset, casting_mode)[0]


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    offset: float = 0.0,
    casting_mode: str = "torch",
) -> tuple[Tensor, Tensor]:
    """``residual_out = input + residual; output = rms_norm(residual_out, ...)`` in one pass; returns both.

    ``offset`` and ``casting_mode`` as in :func:`rms_norm`; ``"llama"`` needs weight in input's dtype here
    (the fused kernel writes one dtype).
    """
    out = _ops.add_rms_norm(input, residual, _as_shape(normalized_shape), weight, eps, offset, casting_mode)
    return out[0], out[1]


# ---------------------------------------------------------------- fake kernels
# Shapes and dtypes only, mirroring csrc/norm.cpp's checks (same order, same
# words, through _checks) and its allocation.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_input(op: str, input: Tensor, normalized_shape: Sequence[int]) -> list[int]:
    """check_input_shape: returns the statistics' shape, input.shape[:-len(normalized_shape)]."""
    _checks.floating(op, "input", input)
    k = len(normalized_shape)
    _checks.that(k > 0, op, "normalized_shape", "to name at least one dimension", "[]")
    _checks.that(
        input.dim() >= k and list(input.shape[input.dim() - k :]) == list(normalized_shape),
        op,
        "normalized_shape",
        f"{_checks.shape_str(normalized_shape)} to match the trailing dimensions of input",
        lambda: "input of shape " + _checks.shape_str(input.shape),
    )
    return list(input.shape[: input.dim() - k])


def _check_param(op: str, name: str, p: Optional[Tensor], normalized_shape: Sequence[int], input: Tensor) -> None:
    if p is None:
        return
    _checks.same_device(op, name, p, "input", input)
    _checks.floating(op, name, p)
    _checks.that(
        list(p.shape) == list(normalized_shape),
        op,
        name,
        f"to have shape normalized_shape {_checks.shape_str(normalized_shape)}",
        lambda: _checks.shape_str(p.shape),
    )


def _check_rms_options(op: str, offset: float, casting_mode: str, weight: Optional[Tensor]) -> None:
    """parse_rms_options's checks."""
    _checks.that(
        casting_mode in CASTING_MODES, op, "casting_mode", "to be one of 'torch', 'gemma', 'llama'", f"'{casting_mode}'"
    )
    _checks.that(offset == 0.0 or weight is not None, op, "weight", f"to be given with offset {_checks.num_str(offset)}",
                 "None")


def _check_forward(op, input, normalized_shape, residual=None, weight=None, bias=None, eps=None) -> Tensor:
    """prepare_norm_forward's checks; returns an empty statistics tensor."""
    shape = _check_input(op, input, normalized_shape)
    if residual is not None:
        _checks.like(op, "residual", residual, "input", input)
    _check_param(op, "weight", weight, normalized_shape, input)
    _check_param(op, "bias", bias, normalized_shape, input)
    if eps is not None:
        _checks.that(eps >= 0.0, op, "eps", ">= 0", _checks.num_str(eps))
    return input.new_empty(shape, dtype=_acc_dtype(input.dtype))


def _check_backward(op, grad_output, grad_residual_out, input, normalized_shape, mean, rstd, weight) -> None:
    """prepare_norm_backward's checks."""
    stat_shape = _check_input(op, input, normalized_shape)
    _checks.like(op, "grad_output", grad_output, "input", input)
    if grad_residual_out is not None:
        _checks.like(op, "grad_residual_out", grad_residual_out, "input", input)
    rows = 1
    for s in stat_shape:
        rows *= s
    acc = _acc_dtype(input.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is None:
            continue
        _checks.same_device(op, name, t, "input", input)
        _checks.that(
            t.numel() == rows and t.dtype == acc,
            op,
            name,
            f"to hold {rows} values of dtype {_checks.dtype_name(acc)} (one per normalized row)",
            lambda: f"shape {_checks.shape_str(t.shape)} and dtype {_checks.dtype_name(t.dtype)}",
        )
    _check_param(op, "weight", weight, normalized_shape, input)


def _param_grad(param: Optional[Tensor], wanted: bool, input: Tensor) -> Tensor:
    if param is None or not wanted:
        return input.new_empty((0,))
    return param.new_empty(param.shape)


@torch.library.register_fake("torch_wsl::layer_norm")
def _layer_norm_fake(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    stats = _check_forward("layer_norm", input, normalized_shape, None, weight, bias, eps)
    return input.new_empty(input.shape), stats, torch.empty_like(stats)


@torch.library.register_fake("torch_wsl::add_layer_norm")
def _add_layer_norm_fake(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    stats = _check_forward("add_layer_norm", input, normalized_shape, residual, weight, bias, eps)
    return input.new_empty(input.shape), input.new_empty(input.shape), stats, torch.empty_like(stats)


@torch.library.register_fake("torch_wsl::rms_norm")
def _rms_norm_fake(input, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch"):
    _check_rms_options("rms_norm", offset, casting_mode, weight)
    return input.new_empty(input.shape), _check_forward("rms_norm", input, normalized_shape, None, weight, None, eps)


@torch.library.register_fake("torch_wsl::add_rms_norm")
def _add_rms_norm_fake(input, residual, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch"):
    _check_rms_options("add_rms_norm", offset, casting_mode, weight)
    stats = _check_forward("add_rms_norm", input, normalized_shape, residual, weight, None, eps)
    return input.new_empty(input.shape), input.new_empty(input.shape), stats


@torch.library.register_fake("torch_wsl::layer_norm_backward")
def _layer_norm_backward_fake(
    grad_output, grad_residual_out, input, normalized_shape, mean, rstd, weight, bias, output_mask
):
    _check_backward("layer_norm_backward", grad_output, grad_residual_out, input, normalized_shape, mean, rstd, weight)
    return (
        input.new_empty(input.shape),
        _param_grad(weight, output_mask[0], input),
        _param_grad(bias, output_mask[1], input),
    )


@torch.library.register_fake("torch_wsl::rms_norm_backward")
def _rms_norm_backward_fake(
    grad_output, grad_residual_out, input, normalized_shape, rstd, weight, weight_grad, offset=0.0, casting_mode="torch"
):
    _check_rms_options("rms_norm_backward", offset, casting_mode, weight)
    _check_backward("rms_norm_backward", grad_output, grad_residual_out, input, normalized_shape, None, rstd, weight)
    return input.new_empty(input.shape), _param_grad(weight, weight_grad, input)


# -------------------------------------------------------------------- autograd
# Backward passes are operators too, so they run as one kernel per device and
# trace under torch.compile. mean/rstd outputs are not differentiable. Grads
# of unused outputs arrive as None rather than materialized zeros: each zeros
# tensor would be one more kernel launch.


def _grad_or_none(grad: Tensor, wanted: bool) -> Optional[Tensor]:
    return grad if wanted and grad.numel() > 0 else None


def _zero_size_param_grad(param: Optional[Tensor], wanted: bool) -> Optional[Tensor]:
    # A zero-element parameter's gradient is an empty tensor of its own shape.
    return torch.zeros_like(param) if (wanted and param is not None and param.numel() == 0) else None


def _setup_layer_norm(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    input, normalized_shape, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.save_for_backward(input, mean, rstd, weight, bias)


def _setup_add_layer_norm(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    _, _, normalized_shape, weight, bias, _ = inputs
    _, residual_out, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.save_for_backward(residual_out, mean, rstd, weight, bias)


def _layer_norm_grads(ctx, grad_output, grad_residual_out, weight_index: int):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    if grad_output is None:  # only residual_out was used: it passes its gradient straight through
        return grad_residual_out, None, None
    want_w = weight is not None and ctx.needs_input_grad[weight_index]
    want_b = bias is not None and ctx.needs_input_grad[weight_index + 1]
    gi, gw, gb = _ops.layer_norm_backward(
        grad_output, grad_residual_out, x, ctx.normalized_shape, mean, rstd, weight, bias, [want_w, want_b]
    )
    gw = _grad_or_none(gw, want_w) if gw.numel() else _zero_size_param_grad(weight, want_w)
    gb = _grad_or_none(gb, want_b) if gb.numel() else _zero_size_param_grad(bias, want_b)
    return gi, gw, gb


def _backward_layer_norm(ctx, grad_output, _grad_mean, _grad_rstd):
    gi, gw, gb = _layer_norm_grads(ctx, grad_output, None, 2)
    return gi, None, gw, gb, None


def _backward_add_layer_norm(ctx, grad_output, grad_residual_out, _grad_mean, _grad_rstd):
    gi, gw, gb = _layer_norm_grads(ctx, grad_output, grad_residual_out, 3)
    return gi, gi, None, gw, gb, None


def _setup_rms_norm(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    input, normalized_shape, weight, _, ctx.offset, ctx.casting_mode = inputs
    ctx.normalized_shape = normalized_shape
    ctx.save_for_backward(input, output[1], weight)


def _setup_add_rms_norm(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    _, _, normalized_shape, weight, _, ctx.offset, ctx.casting_mode = inputs
    _, residual_out, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.save_for_backward(residual_out, rstd, weight)


def _rms_norm_grads(ctx, grad_output, grad_residual_out, weight_index: int):
    x, rstd, weight = ctx.saved_tensors
    if grad_output is None:  # only residual_out was used: it passes its gradient straight through
        return grad_residual_out, None
    want_w = weight is not None and ctx.needs_input_grad[weight_index]
    gi, gw = _ops.rms_norm_backward(
        grad_output, grad_residual_out, x, ctx.normalized_shape, rstd, weight, want_w, ctx.offset, ctx.casting_mode
    )
    gw = _grad_or_none(gw, want_w) if gw.numel() else _zero_size_param_grad(weight, want_w)
    return gi, gw


def _backward_rms_norm(ctx, grad_output, _grad_rstd):
    gi, gw = _rms_norm_grads(ctx, grad_output, None, 2)
    return gi, None, gw, None, None, None


def _backward_add_rms_norm(ctx, grad_output, grad_residual_out, _grad_rstd):
    gi, gw = _rms_norm_grads(ctx, grad_output, grad_residual_out, 3)
    return gi, gi, None, gw, None, None, None


torch.library.register_autograd("torch_wsl::layer_norm", _backward_layer_norm, setup_context=_setup_layer_norm)
torch.library.register_autograd(
    "torch_wsl::add_layer_norm", _backward_add_layer_norm, setup_context=_setup_add_layer_norm
)
torch.library.register_autograd("torch_wsl::rms_norm", _backward_rms_norm, setup_context=_setup_rms_norm)
torch.library.register_autograd("torch_wsl::add_rms_norm", _backward_add_rms_norm, setup_context=_setup_add_rms_norm)
forbid_double_backward("torch_wsl::layer_norm_backward", "torch_wsl::rms_norm_backward")
