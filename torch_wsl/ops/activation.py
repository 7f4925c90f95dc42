"""Gated MLP activations (SwiGLU / GeGLU): wrappers, fake kernels and autograd.

``silu_mul(gate, up)`` is ``F.silu(gate) * up`` (Llama, Mistral, Qwen:
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) and ``gelu_mul(gate, up,
approximate)`` is ``F.gelu(gate, approximate=approximate) * up`` (Gemma's
``gelu_pytorch_tanh`` is ``approximate="tanh"``), each one pass over memory
forward and one backward (the backward recomputes the activation from ``gate``;
only the inputs are saved). The ``*_packed`` siblings take Phi-3's layout: one
``[..., 2*I]`` tensor, gate half first (``gate, up = gate_up.chunk(2, -1)``),
and return ``[..., I]``; their gradient is one ``[..., 2*I]`` tensor, with no
concatenation.

Packed is a sibling function rather than a flag: its input, output shape and
gradient differ from the two-tensor form (one tensor in, half its last
dimension out), and a flag would make ``up`` optional and change what ``gate``
means.

Inputs: float32, float16, bfloat16 (float64 for gradcheck), any device with
kernels (CPU, CUDA); the math is in float32 (float64 for float64) with one
rounding to the storage dtype per output. gate and up must have the same shape
and dtype (no broadcasting). Any strides: rows with a unit-stride last dimension
(the packed halves, row slices) are read in place, other layouts are copied
first. Outputs are contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._autograd import forbid_double_backward

__all__ = ["gelu_mul", "gelu_mul_packed", "silu_mul", "silu_mul_packed"]

_ops = torch.ops.torch_wsl


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up`` in one fused pass (SwiGLU); gradients for gate and up in one pass.

    gate, up: the same shape and floating dtype, on the same device. Returns a
    contiguous tensor of that shape and dtype.
    """
    return _ops.silu_mul(gate, up)


def gelu_mul(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(gate, approximate=approximate) * up`` in one fused pass (GeGLU).

    approximate: ``"none"`` (the erf form) or ``"tanh"`` (Gemma's
    ``gelu_pytorch_tanh``). Shapes and dtypes as for :func:`silu_mul`.
    """
    return _ops.gelu_mul(gate, up, approximate)


def silu_mul_packed(gate_up: Tensor) -> Tensor:
    """``F.silu(gate) * up`` with ``gate, up = gate_up.chunk(2, dim=-1)``, read in place.

    gate_up: ``[..., 2*I]``, floating. Returns ``[..., I]``; the gradient is one ``[..., 2*I]`` tensor.
    """
    return _ops.silu_mul_packed(gate_up)


def gelu_mul_packed(gate_up: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(gate, approximate=approximate) * up`` with ``gate, up = gate_up.chunk(2, dim=-1)``."""
    return _ops.gelu_mul_packed(gate_up, approximate)


# ---------------------------------------------------------------- fake kernels
# Shapes and dtypes only, mirroring csrc/activation.cpp's checks (same order,
# same words, through _checks) and its allocation (contiguous outputs).


def _check_approximate(op: str, approximate: str) -> None:
    _checks.that(approximate in ("none", "tanh"), op, "approximate", "to be 'none' or 'tanh'", f"'{approximate}'")


def _check_pair(op: str, gate: Tensor, up: Tensor) -> None:
    _checks.floating(op, "gate", gate)
    _checks.like(op, "up", up, "gate", gate)


def _check_packed(op: str, gate_up: Tensor) -> list[int]:
    """Returns the output's shape: gate_up's with its last dimension halved."""
    _checks.floating(op, "gate_up", gate_up)
    _checks.dim_at_least(op, "gate_up", gate_up, 1)
    _checks.that(
        gate_up.shape[-1] % 2 == 0,
        op,
        "gate_up",
        "to have an even last dimension (the gate half, then the up half)",
        lambda: "shape " + _checks.shape_str(gate_up.shape),
    )
    return [*gate_up.shape[:-1], gate_up.shape[-1] // 2]


def _check_packed_grad(op: str, grad_output: Tensor, gate_up: Tensor) -> None:
    shape = _check_packed(op, gate_up)
    _checks.same_device(op, "grad_output", grad_output, "gate_up", gate_up)
    _checks.that(
        list(grad_output.shape) == shape,
        op,
        "grad_output",
        f"to have shape {_checks.shape_str(shape)} (gate_up's with its last dimension halved)",
        lambda: _checks.shape_str(grad_output.shape),
    )
    _checks.same_dtype(op, "grad_output", grad_output, "gate_up", gate_up)


@torch.library.register_fake("torch_wsl::silu_mul")
def _silu_mul_fake(gate, up):
    _check_pair("silu_mul", gate, up)
    return gate.new_empty(gate.shape)


@torch.library.register_fake("torch_wsl::gelu_mul")
def _gelu_mul_fake(gate, up, approximate="none"):
    _check_approximate("gelu_mul", approximate)
    _check_pair("gelu_mul", gate, up)
    return gate.new_empty(gate.shape)


@torch.library.register_fake("torch_wsl::silu_mul_packed")
def _silu_mul_packed_fake(gate_up):
    return gate_up.new_empty(_check_packed("silu_mul_packed", gate_up))


@torch.library.register_fake("torch_wsl::gelu_mul_packed")
def _gelu_mul_packed_fake(gate_up, approximate="none"):
    _check_approximate("gelu_mul_packed", approximate)
    return gate_up.new_empty(_check_packed("gelu_mul_packed", gate_up))


@torch.library.register_fake("torch_wsl::silu_mul_backward")
def _silu_mul_backward_fake(grad_output, gate, up):
    _check_pair("silu_mul_backward", gate, up)
    _checks.like("silu_mul_backward", "grad_output", grad_output, "gate", gate)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("torch_wsl::gelu_mul_backward")
def _gelu_mul_backward_fake(grad_output, gate, up, approximate="none"):
    _check_approximate("gelu_mul_backward", approximate)
    _check_pair("gelu_mul_backward", gate, up)
    _checks.like("gelu_mul_backward", "grad_output", grad_output, "gate", gate)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("torch_wsl::silu_mul_packed_backward")
def _silu_mul_packed_backward_fake(grad_output, gate_up):
    _check_packed_grad("silu_mul_packed_backward", grad_output, gate_up)
    return gate_up.new_empty(gate_up.shape)


@torch.library.register_fake("torch_wsl::gelu_mul_packed_backward")
def _gelu_mul_packed_backward_fake(grad_output, gate_up, approximate="none"):
    _check_approximate("gelu_mul_packed_backward", approximate)
    _check_packed_grad("gelu_mul_packed_backward", grad_output, gate_up)
    return gate_up.new_empty(gate_up.shape)


# -------------------------------------------------------------------- autograd
# Only the inputs are saved (eager's F.silu(gate) * up also keeps silu(gate)):
# the backward operator recomputes the activation and forms both gradients in
# one pass.


def _setup_pair(ctx, inputs, output):
    gate, up = inputs[0], inputs[1]
    ctx.approximate = inputs[2] if len(inputs) > 2 else "none"  # gelu_mul's; silu_mul has none
    ctx.save_for_backward(gate, up)


def _setup_packed(ctx, inputs, output):
    ctx.approximate = inputs[1] if len(inputs) > 1 else "none"
    ctx.save_for_backward(inputs[0])


def _pair_grads(ctx, grad_gate: Tensor, grad_up: Tensor) -> tuple:
    return (grad_gate if ctx.needs_input_grad[0] else None, grad_up if ctx.needs_input_grad[1] else None)


def _backward_silu_mul(ctx, grad):
    gate, up = ctx.saved_tensors
    return _pair_grads(ctx, *_ops.silu_mul_backward(grad, gate, up))


def _backward_gelu_mul(ctx, grad):
    gate, up = ctx.saved_tensors
    return (*_pair_grads(ctx, *_ops.gelu_mul_backward(grad, gate, up, ctx.approximate)), None)


def _backward_silu_mul_packed(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return _ops.silu_mul_packed_backward(grad, gate_up)


def _backward_gelu_mul_packed(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return _ops.gelu_mul_packed_backward(grad, gate_up, ctx.approximate), None


torch.library.register_autograd("torch_wsl::silu_mul", _backward_silu_mul, setup_context=_setup_pair)
torch.library.register_autograd("torch_wsl::gelu_mul", _backward_gelu_mul, setup_context=_setup_pair)
torch.library.register_autograd("torch_wsl::silu_mul_packed", _backward_silu_mul_packed, setup_context=_setup_packed)
torch.library.register_autograd("torch_wsl::gelu_mul_packed", _backward_gelu_mul_packed, setup_context=_setup_packed)
forbid_double_backward(
    "torch_wsl::silu_mul_backward",
    "torch_wsl::gelu_mul_backward",
    "torch_wsl::silu_mul_packed_backward",
    "torch_wsl::gelu_mul_packed_backward",
)
