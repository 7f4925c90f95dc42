"""Fused multi-tensor optimizer and gradient-clipping operators: wrappers and fake kernels.

The operators (schemas in csrc/optim.cpp) update whole tensor lists in place,
in one pass over memory (CPU) or one launch per ~70 tensors (CUDA):

- ``adam_`` / ``adamw_``: one Adam / AdamW step for all tensors; ``state_steps``
  (one-element float32 tensors on the params' device) are incremented by the
  operator. ``lr`` is a float or a one-element tensor (``.tensor_lr`` overload).
- ``sgd_``: one SGD step; ``is_first_step`` sets the momentum buffers from the gradients.
- ``total_norm``: the 1-, 2- or inf-norm of all tensors together, a 0-dim tensor.
- ``clip_grads_with_norm_``: ``grads *= min(max_norm / (total_norm + 1e-6), 1)``.

With ``grad_scale`` the gradients are divided by it and the unscaled values are
written back (as ``GradScaler.unscale_`` leaves them); with ``found_inf``
nonzero the step is skipped entirely, step counts included. Neither is read on
the host: a CUDA step never synchronizes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["adam_", "clip_grads_with_norm_", "sgd_", "total_norm"]

_ops = torch.ops.torch_wsl


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One Adam (AdamW with ``decoupled_weight_decay``) step over all tensors, in place.

    All tensors on one device; each ``grads[i]``/state tensor has ``params[i]``'s
    shape and dtype (float32, float16, bfloat16 or float64; math in float32).
    ``max_exp_avg_sqs`` may be empty unless ``amsgrad``.
    """
    if len(params) == 0:  # the dispatcher needs a tensor argument to choose a kernel; nothing to do
        return
    packet = _ops.adamw_ if decoupled_weight_decay else _ops.adam_
    op = packet.tensor_lr if isinstance(lr, Tensor) else packet.default
    op(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf,
    )


def sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    weight_decay: float,
    momentum: float,
    lr: Union[float, Tensor],
    dampening: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One SGD step over all tensors, in place; ``momentum_buffers`` may be empty when ``momentum == 0``."""
    if len(params) == 0:  # the dispatcher needs a tensor argument to choose a kernel; nothing to do
        return
    op = _ops.sgd_.tensor_lr if isinstance(lr, Tensor) else _ops.sgd_.default
    op(
        params, grads, momentum_buffers,
        weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov,
        maximize=maximize, is_first_step=is_first_step, grad_scale=grad_scale, found_inf=found_inf,
    )


def total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type`` (1, 2 or inf) norm of all tensors (one device) viewed as one vector.

    A 0-dim tensor of the tensors' promoted dtype on their device, computed in
    one multi-tensor reduction with float32 (float64 for float64) accumulation.
    """
    tensors = list(tensors)
    if not tensors:  # as torch: the norm of nothing is a float32 zero (no tensor to dispatch on)
        return torch.zeros(())
    return _ops.total_norm(tensors, float(norm_type))


def clip_grads_with_norm_(grads: Sequence[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """``grads *= min(max_norm / (total_norm + 1e-6), 1)`` in place, the coefficient computed on the device."""
    _ops.clip_grads_with_norm_(list(grads), float(max_norm), total_norm)


# ---------------------------------------------------------------- fake kernels
# The operators return nothing; the fakes check what tracing can check.


def _check_lengths(name: str, params, **lists) -> None:
    for list_name, tensors in lists.items():
        torch._check(
            len(tensors) == len(params),
            lambda: f"torch_wsl.{name}: expected {list_name} to hold {len(params)} tensors (one per param), "
            f"got {len(tensors)}",
        )


def _check_devices(name: str, first, **lists) -> None:
    if not first:
        return
    device = first[0].device
    for list_name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t is not None:
                torch._check(
                    t.device == device,
                    lambda: f"torch_wsl.{name}: expected {list_name}[{i}] to be on the device of params[0] "
                    f"({device}), got {t.device}; a call takes the tensors of one device",
                )


def _adam_fake(name: str):
    def fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
             weight_decay, eps, amsgrad, maximize, grad_scale=None, found_inf=None):
        _check_lengths(name, params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps)
        if amsgrad:
            _check_lengths(name, params, max_exp_avg_sqs=max_exp_avg_sqs)
        _check_devices(name, params, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                       max_exp_avg_sqs=max_exp_avg_sqs, state_steps=state_steps)
        return None

    return fake


for _name in ("adam_", "adamw_"):
    torch.library.register_fake(f"torch_wsl::{_name}")(_adam_fake(_name))
    torch.library.register_fake(f"torch_wsl::{_name}.tensor_lr")(_adam_fake(_name))


def _sgd_fake(params, grads, momentum_buffers, *, weight_decay, momentum, lr, dampening, nesterov, maximize,
              is_first_step, grad_scale=None, found_inf=None):
    _check_lengths("sgd_", params, grads=grads)
    if momentum != 0:
        _check_lengths("sgd_", params, momentum_buffers=momentum_buffers)
    _check_devices("sgd_", params, params=params, grads=grads, momentum_buffers=momentum_buffers)
    return None


torch.library.register_fake("torch_wsl::sgd_")(_sgd_fake)
torch.library.register_fake("torch_wsl::sgd_.tensor_lr")(_sgd_fake)


@torch.library.register_fake("torch_wsl::total_norm")
def _total_norm_fake(tensors, norm_type=2.0):
    if len(tensors) == 0:
        return torch.empty((), dtype=torch.float32)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tensors[0].new_empty((), dtype=dtype)


@torch.library.register_fake("torch_wsl::clip_grads_with_norm_")
def _clip_grads_with_norm_fake(grads, max_norm, total_norm):
    return None
