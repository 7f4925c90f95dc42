"""``torch_wsl.optimize(model)``: an existing model on torch_wsl's fused kernels, by patching the
instance (see ``_core`` for the mechanism). Each rule module registers the classes it knows."""

from . import lm_loss, mlp, norms, residual, rope  # noqa: F401  (register their rules)
from ._core import KINDS, Report, optimize, register, restore

__all__ = ["KINDS", "Report", "optimize", "register", "restore"]
