"""Drop-in modules and functional operators backed by torch_wsl's fused kernels."""

from . import functional, utils
from .modules import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "functional", "utils"]
