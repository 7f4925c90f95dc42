"""Drop-in modules and functional operators backed by torch_wsl's fused kernels."""

from . import functional, utils
from .loss import CrossEntropyLoss
from .modules import LayerNorm, RMSNorm, swap_norms

__all__ = ["CrossEntropyLoss", "LayerNorm", "RMSNorm", "functional", "swap_norms", "utils"]
