"""Drop-in modules: subclasses of torch.nn's with the same constructor, parameters
and state_dict keys (a checkpoint loads either way), running torch_wsl's kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as F

__all__ = ["LayerNorm", "RMSNorm", "swap_norms"]


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on torch_wsl's fused kernels.

    ``forward(input)`` matches torch's; ``forward(input, residual)`` returns
    ``(norm(input + residual), input + residual)`` from one fused pass.
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):  # type: ignore[override]
        if residual is None:
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on torch_wsl's fused kernels.

    ``forward(input)`` matches torch's; ``forward(input, residual)`` returns
    ``(norm(input + residual), input + residual)`` from one fused pass.
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):  # type: ignore[override]
        if residual is None:
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps)


_SWAPS = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm}


def swap_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` in ``model`` to torch_wsl's kernels, in place.

    Only modules whose class is exactly torch's are switched (subclasses may
    override ``forward``). Parameters, buffers, hooks and ``state_dict`` keys
    stay as they are: the modules only change class. Returns ``model``.
    """
    for module in model.modules():
        swapped = _SWAPS.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
    return model
