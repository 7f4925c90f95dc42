"""Python side of the torch.ops.torch_wsl operators: thin wrappers, fake kernels and autograd."""

from . import activation, cross_entropy, norm, optim, rope
from .activation import gelu_mul, gelu_mul_packed, silu_mul, silu_mul_packed
from .cross_entropy import linear_cross_entropy
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .rope import apply_rotary_pos_emb

__all__ = [
    "activation",
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary_pos_emb",
    "cross_entropy",
    "gelu_mul",
    "gelu_mul_packed",
    "layer_norm",
    "linear_cross_entropy",
    "norm",
    "optim",
    "rms_norm",
    "rope",
    "silu_mul",
    "silu_mul_packed",
]
