"""Drop-in modules and functional operators backed by torch_wsl's fused kernels."""

from . import functional, utils
from .modules import LayerNorm, RMSNorm, swap_norms

__all__ = ["LayerNorm", "RMSNorm", "functional", "swap_norms", "utils"]
