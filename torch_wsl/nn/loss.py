"""Drop-in loss modules: subclasses of torch.nn's with the same constructor, attributes and
state_dict, running torch_wsl's kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.cross_entropy import cross_entropy

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on torch_wsl's fused cross-entropy, plus ``softcap``.

    Same arguments (``weight`` is a registered buffer, as in torch), plus the
    keyword ``softcap``: Gemma 2's ``final_logit_softcapping``, applied to the
    logits as ``softcap * tanh(logits / softcap)`` before the loss. Targets are
    class indices (int64 or int32); class-probability targets raise (see
    :func:`torch_wsl.ops.cross_entropy.cross_entropy`).
    """

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        softcap: Optional[float] = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}" if self.softcap is not None else ""
