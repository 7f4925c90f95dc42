"""Python side of the torch.ops.torch_wsl operators: thin wrappers, fake kernels and autograd."""

from . import norm, optim
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "norm", "optim", "rms_norm"]
