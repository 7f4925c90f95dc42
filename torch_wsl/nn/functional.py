"""Fused functional operators, drop-in for their ``torch.nn.functional`` (or transformers) namesakes.

``layer_norm`` and ``rms_norm`` take the same arguments and return the same
results as torch's (``rms_norm`` also takes the ``offset`` and ``casting_mode``
of the Hugging Face families); ``add_layer_norm`` and ``add_rms_norm`` fuse the
residual add of a pre-norm transformer block into the normalization.
``apply_rotary_pos_emb`` is transformers' (Llama's) function, q and k in one
kernel, with the interleaved (GPT-J) layout and partial rotary as well.
``silu_mul`` / ``gelu_mul`` are the gated MLP activations (SwiGLU, GeGLU),
``act(gate) * up`` in one pass each way; the ``_packed`` siblings take Phi-3's
fused ``[..., 2 * I]`` gate_up tensor (gate first). ``cross_entropy`` is
``F.cross_entropy`` for class-index targets plus Gemma 2's ``softcap``;
``linear_cross_entropy`` is ``cross_entropy(F.linear(input, weight, bias), ...)``
in token chunks, never holding the full logits.
"""

from ..ops.activation import gelu_mul, gelu_mul_packed, silu_mul, silu_mul_packed
from ..ops.cross_entropy import cross_entropy, linear_cross_entropy
from ..ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from ..ops.rope import apply_rotary_pos_emb

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary_pos_emb",
    "cross_entropy",
    "gelu_mul",
    "gelu_mul_packed",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
    "silu_mul",
    "silu_mul_packed",
]
