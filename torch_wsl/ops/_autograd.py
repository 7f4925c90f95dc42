"""Autograd helpers shared by the operator families."""

from __future__ import annotations

import torch


def forbid_double_backward(*qualnames: str) -> None:
    """Backward operators compute first-order gradients only: differentiating them again
    (create_graph=True and a second backward) raises instead of silently giving zeros."""
    for qualname in qualnames:
        name = qualname.split("::")[-1]

        def backward(ctx, *grads, _name=name):
            raise RuntimeError(f"torch_wsl.{_name}: double backward is not supported (its gradient is not defined)")

        torch.library.register_autograd(qualname, backward)
