"""Drop-in modules: subclasses of torch.nn's with the same constructor, parameters
and state_dict keys (a checkpoint loads either way), running torch_wsl's kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as F

__all__ = ["LayerNorm", "RMSNorm"]


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
