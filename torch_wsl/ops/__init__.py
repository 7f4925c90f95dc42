"""Python side of the torch.ops.torch_wsl operators: thin wrappers, fake kernels and autograd."""

from . import norm, optim, rope
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .rope import apply_rotary_pos_emb

__all__ = ["add_layer_norm", "add_rms_norm", "apply_rotary_pos_emb", "layer_norm", "norm", "optim", "rms_norm", "rope"]
