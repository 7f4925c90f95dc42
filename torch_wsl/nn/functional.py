"""Fused functional operators, drop-in for their ``torch.nn.functional`` namesakes.

``layer_norm`` and ``rms_norm`` take the same arguments and return the same
results as torch's; ``add_layer_norm`` and ``add_rms_norm`` fuse the residual
add of a pre-norm transformer block into the normalization.
"""

from ..ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm"]
