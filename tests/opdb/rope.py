"""Rotary position embeddings: rotate-half (Llama), interleaved (GPT-J), partial rotary (GPT-NeoX / Phi).

References are transformers' own: Llama's apply_rotary_pos_emb for rotate-half,
GPT-J's rotate_every_two for the interleaved layout, GPT-NeoX's
apply_rotary_pos_emb (which slices q[..., :rotary_dim]) for partial rotary.
"""

from __future__ import annotations

import torch
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.gptj import modeling_gptj as gptj
from transformers.models.llama import modeling_llama as llama

from torch_wsl.ops.rope import apply_rotary_pos_emb

from . import BadInput, OpInfo, Sample, make, register

# (batch, q heads, k heads, seq, head_dim, rotary_dim, layout, table batch): the head dims, odd
# sequence lengths, GQA, both q/k layouts, cos with batch 1, partial rotary.
#   layout "bhsd-view": q = x.view(b, s, h, d).transpose(1, 2), what the attention projections give
#   layout "bhsd": contiguous [b, h, s, d];  "bshd": [b, s, h, d] with unsqueeze_dim=2
CASES = [
    (2, 4, 2, 7, 64, 64, "bhsd-view", 2),
    (1, 3, 1, 5, 80, 80, "bhsd-view", 1),
    (2, 2, 2, 3, 96, 96, "bshd", 2),
    (1, 4, 1, 9, 128, 128, "bhsd", 1),
    (1, 2, 2, 1, 256, 256, "bhsd-view", 1),
    (2, 6, 2, 13, 32, 32, "bhsd-view", 2),
    (1, 2, 1, 5, 10, 10, "bhsd", 1),  # rotate-half halves of 5: scalar tails only
]
PARTIAL_CASES = [
    (2, 4, 2, 7, 64, 16, "bhsd-view", 2),  # GPT-NeoX: rotary_pct 0.25
    (1, 3, 1, 5, 80, 32, "bhsd-view", 1),  # Phi-2: head_dim 80, partial_rotary_factor 0.4
    (1, 2, 2, 6, 96, 24, "bshd", 1),
    (1, 2, 1, 3, 128, 64, "bhsd", 1),
    (1, 2, 1, 3, 14, 0, "bhsd", 1),  # no rotary dimension: a copy
]


def _heads(b, h, s, d, layout, dtype, device, requires_grad, g):
    if layout == "bhsd-view":
        t = make((b, s, h, d), dtype, device, generator=g).transpose(1, 2)
    elif layout == "bhsd":
        t = make((b, h, s, d), dtype, device, generator=g)
    else:
        t = make((b, s, h, d), dtype, device, generator=g)
    return t.requires_grad_(requires_grad)


def _tables(tb, s, rotary, dtype, device, g, interleaved, scale=1.0):
    """cos/sin of real angles [tb, s, rotary], in the element-wise form the layout uses (not differentiated)."""
    ang = torch.empty(tb, s, rotary // 2, dtype=torch.float64).uniform_(-4.0, 4.0, generator=g)
    emb = ang.repeat_interleave(2, -1) if interleaved else torch.cat([ang, ang], -1)
    return (emb.cos() * scale).to(device=device, dtype=dtype), (emb.sin() * scale).to(device=device, dtype=dtype)


def _rope_samples(cases, interleaved):
    partial = any(r < d for (_, _, _, _, d, r, _, _) in cases)

    def samples(device, dtype, requires_grad):
        g = torch.Generator().manual_seed(0)
        for i, (b, hq, hk, s, d, r, layout, tb) in enumerate(cases):
            q = _heads(b, hq, s, d, layout, dtype, device, requires_grad, g)
            k = _heads(b, hk, s, d, layout, dtype, device, requires_grad, g)
            # One case with YaRN-like scaled tables (cos^2 + sin^2 != 1): the backward is the exact transpose.
            cos, sin = _tables(tb, s, r, dtype, device, g, interleaved, scale=1.25 if i == 2 else 1.0)
            kwargs = {"unsqueeze_dim": 2} if layout == "bshd" else {}
            name = f"b{b}-h{hq}/{hk}-s{s}-d{d}-r{r}-{layout}-cosb{tb}"
            yield Sample((q, k, cos, sin), kwargs, name=name, opcheck=i in (0, 2, 4))
        # A strided head dimension (copied once by the operator).
        q = make((1, 2, 3, 16), dtype, device, noncontiguous=True, generator=g).requires_grad_(requires_grad)
        k = make((1, 1, 3, 16), dtype, device, noncontiguous=True, generator=g).requires_grad_(requires_grad)
        cos, sin = _tables(1, 3, 8 if partial else 16, dtype, device, g, interleaved)
        yield Sample((q, k, cos, sin), name="strided-head-dim")
        # Tables [seq, rotary] unsqueezed at 0 ([1, seq, rotary] broadcasts over batch and heads).
        q = _heads(2, 2, 5, 16, "bhsd-view", dtype, device, requires_grad, g)
        k = _heads(2, 1, 5, 16, "bhsd-view", dtype, device, requires_grad, g)
        cos, sin = _tables(1, 5, 16, dtype, device, g, interleaved)
        yield Sample((q, k, cos[0], sin[0]), {"unsqueeze_dim": 0}, name="tables-2d-unsqueeze0", opcheck=True)
        # Empty: no sequence; and an empty k next to a non-empty q.
        q = _heads(2, 4, 0, 64, "bhsd-view", dtype, device, requires_grad, g)
        k = _heads(2, 2, 0, 64, "bhsd-view", dtype, device, requires_grad, g)
        cos, sin = _tables(2, 0, 64, dtype, device, g, interleaved)
        yield Sample((q, k, cos, sin), name="empty-seq", opcheck=True)
        q = _heads(1, 2, 3, 16, "bhsd", dtype, device, requires_grad, g)
        k = _heads(1, 0, 3, 16, "bhsd", dtype, device, requires_grad, g)
        cos, sin = _tables(1, 3, 16, dtype, device, g, interleaved)
        yield Sample((q, k, cos, sin), name="empty-k")

    return samples


def _ref_llama(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _ref_neox(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return neox.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _gptj_rotate(x, cos, sin, unsqueeze_dim):
    """GPT-J's rotation of the first rotary_dim elements (its attention slices and concatenates the rest)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    # rotate_every_two indexes x[:, :, :, ::2]: 4-D inputs only, which every sample is.
    out = x_rot * cos.unsqueeze(unsqueeze_dim) + gptj.rotate_every_two(x_rot) * sin.unsqueeze(unsqueeze_dim)
    return torch.cat([out, x_pass], dim=-1)


def _ref_interleaved(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return _gptj_rotate(q, cos, sin, unsqueeze_dim), _gptj_rotate(k, cos, sin, unsqueeze_dim)


def _interleaved(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim, interleaved=True)


def _bad_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 64, generator=g)
    k = torch.randn(2, 2, 7, 64, generator=g)
    cos, sin = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    op = r"torch_wsl\.apply_rotary_pos_emb: expected "
    yield BadInput((q, k, cos[:, :5], sin[:, :5]), match=op + r"cos unsqueezed at dim 1 to broadcast to the shape of "
                   r"q \[2, 4, 7, 64\] in all but the last dimension, got shape \[2, 5, 64\] \(\[2, 1, 5, 64\] "
                   r"unsqueezed\)", name="cos-seq")
    yield BadInput((q, k, torch.randn(3, 7, 64), torch.randn(3, 7, 64)), match=op + r"cos unsqueezed at dim 1 to "
                   r"broadcast to the shape of q", name="cos-batch")
    yield BadInput((q, k, cos, sin), {"unsqueeze_dim": 2}, match=op + r"cos unsqueezed at dim 2 to broadcast",
                   name="wrong-unsqueeze-dim")
    yield BadInput((q, torch.randn(3, 2, 7, 64), cos, sin), match=op + r"cos unsqueezed at dim 1 to broadcast "
                   r"to the shape of k \[3, 2, 7, 64\]", name="k-batch")
    yield BadInput((q, k, cos, sin[..., :32]), match=op + r"sin to have the last dimension of cos unsqueezed \(64\), "
                   r"got shape \[2, 7, 32\]", name="sin-rotary-dim")
    yield BadInput((q, k, cos[..., :63], sin[..., :63]), match=op + r"cos to have an even last dimension",
                   name="odd-rotary-dim")
    yield BadInput((q, k, torch.randn(2, 7, 66), torch.randn(2, 7, 66)), match=op + r"cos to have a last dimension "
                   r"\(the rotary dimension\) of at most the head dimension of q \(64\), got shape \[2, 7, 66\]",
                   name="rotary-dim-too-big")
    yield BadInput((q, k, cos, sin), {"unsqueeze_dim": 4}, match=op + r"unsqueeze_dim to be in \[-4, 3\]",
                   name="unsqueeze-dim-range")
    yield BadInput((q[0], k[0], cos[:1], sin[:1]), {"unsqueeze_dim": 0}, match=op + r"cos unsqueezed at dim 0 to "
                   r"broadcast to the shape of q \[4, 7, 64\]", name="table-adds-a-dim")
    yield BadInput((q.bfloat16(), k.bfloat16(), cos, sin), match=op + r"cos to have the dtype of q \(bfloat16\), "
                   r"got float32", name="cos-dtype")
    yield BadInput((q, k.half(), cos, sin), match=op + r"k to have the dtype of q \(float32\), got float16",
                   name="k-dtype")
    yield BadInput((q.long(), k.long(), cos.long(), sin.long()), match=op + r"q to have a floating dtype.*got int64",
                   name="int-q")
    yield BadInput((q, k, cos[0, 0, 0], sin[0, 0, 0]), match=op + r"cos to have at least 1 dimensions",
                   name="scalar-cos")
    yield BadInput((q.view(1, 1, 1, 1, 2, 4, 7, 64), k, cos, sin), match=op + r"q to have 1 to 7 dimensions",
                   name="rank")
    yield BadInput((q, k, cos, sin, 2), match=op + r"position_ids to be None or a tensor.*pass unsqueeze_dim by "
                   r"keyword\), got int", name="position-ids-int")
    yield BadInput((q, k, cos.clone().requires_grad_(), sin), match=op + r"cos not to require grad",
                   name="cos-requires-grad")


register(
    OpInfo("apply_rotary_pos_emb", apply_rotary_pos_emb, _ref_llama, _rope_samples(CASES, False), _bad_inputs),
    OpInfo("apply_rotary_pos_emb-interleaved", _interleaved, _ref_interleaved,
           _rope_samples(CASES + PARTIAL_CASES, True)),
    OpInfo("apply_rotary_pos_emb-partial", apply_rotary_pos_emb, _ref_neox, _rope_samples(PARTIAL_CASES, False)),
)
