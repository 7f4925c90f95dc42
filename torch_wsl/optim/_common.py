"""What the fused optimizers share: input checks, device buckets, AMP scalars."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_param_and_grad(opt: str, p: Tensor, g: Tensor, sparse_hint: str = "") -> None:
    """Raise before any update if the fused kernels cannot take this parameter (no partial step)."""
    if g.layout != torch.strided:
        raise RuntimeError(f"{opt} does not support sparse gradients{sparse_hint}")
    if torch.is_complex(p):
        raise RuntimeError(
            f"{opt} does not support complex parameters (got {p.dtype}); optimize torch.view_as_real(param) instead"
        )
    if p.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"{opt} expects floating parameters (float32, float16, bfloat16, float64), got {p.dtype}")
    if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
        raise RuntimeError(
            f"{opt} expects each gradient to match its parameter's device, dtype and shape; got a "
            f"{p.dtype} parameter of shape {tuple(p.shape)} on {p.device} with a {g.dtype} gradient of shape "
            f"{tuple(g.shape)} on {g.device}"
        )


def grad_is_ok(p: Tensor, g: Tensor) -> bool:
    """The fast test of the step's hot loop; check_param_and_grad says what is wrong."""
    return (
        g.dtype is p.dtype
        and p.dtype in _FLOAT_DTYPES
        and g.layout is torch.strided
        and g.shape == p.shape
        and g.device == p.device
    )


def check_state(opt: str, p: Tensor, key: str, t: Tensor) -> None:
    if t.device != p.device or t.dtype != p.dtype or t.shape != p.shape:
        raise RuntimeError(
            f"{opt}: state '{key}' ({t.dtype}, shape {tuple(t.shape)}, {t.device}) does not match its parameter "
            f"({p.dtype}, shape {tuple(p.shape)}, {p.device})"
        )


def as_float(x, name: str) -> float:
    """Hyperparameters given as tensors (torch.optim allows some) as floats; a CUDA tensor syncs."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return float(x.item())
    return float(x)


def lr_arg(lr):
    """lr for the operators: a float, or a one-element tensor (used on its device without a sync)."""
    if isinstance(lr, Tensor):
        return lr if lr.dim() == 0 else lr.reshape(())
    return float(lr)


def by_device(params: list) -> dict:
    """Indices of `params` per device, in order of first appearance (one operator call per device)."""
    buckets: dict = {}
    for i, p in enumerate(params):
        buckets.setdefault(p.device, []).append(i)
    return buckets


class AmpScalars:
    """grad_scale / found_inf from GradScaler, moved once to each device that needs them."""

    def __init__(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        self.grad_scale = grad_scale
        self.found_inf = found_inf
        self._cache: dict = {}

    def on(self, device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if device not in self._cache:
            gs = self.grad_scale
            fi = self.found_inf
            if gs is not None and gs.device != device:
                gs = gs.to(device, non_blocking=True)
            if fi is not None and fi.device != device:
                fi = fi.to(device, non_blocking=True)
            if gs is not None and gs.dtype != torch.float32:
                gs = gs.float()
            if fi is not None and fi.dtype != torch.float32:
                fi = fi.float()
            self._cache[device] = (gs, fi)
        return self._cache[device]

    def step_is_skipped(self) -> bool:
        """Whether found_inf is set. Reads it on the host (a sync on a GPU): only called
        when new optimizer state would be created, normally on the first step alone."""
        return self.found_inf is not None and bool(self.found_inf.item() != 0)
