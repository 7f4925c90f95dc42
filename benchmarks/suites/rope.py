"""Rotary position embeddings of q and k: transformers' eager function (the baseline) vs torch.compile of it vs torch_wsl.

Sizes are BATCHxSEQxHEADSxKV_HEADSxHEAD_DIM (the issue's: 4x2048x32x8x128). q and k
come as the attention projections give them, ``x.view(b, s, h, d).transpose(1, 2)``
of a [b, s, h * d] leaf, the tables as LlamaRotaryEmbedding gives them
([b, s, d] in the dtype), and the gradients arriving at q_embed/k_embed are laid
out as CPU scaled_dot_product_attention's backward produces them ([b, s, h, d]
in memory).

Ops: rotate_half (Llama's apply_rotary_pos_emb), interleaved (GPT-J's
rotate_every_two, as Cohere/GLM), partial (GPT-NeoX's slicing, a quarter of the
head rotated).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..harness import Case, operator_contenders

DEFAULTS = {"sizes": ["4x2048x32x8x128"], "dtypes": ["fp32", "bf16"], "modes": ["fwd", "fwd+bwd"]}
QUICK_DEFAULTS = {"sizes": ["1x128x8x2x64"]}  # --quick
OPS = ["rotate_half", "interleaved", "partial"]
DEFAULT_OPS = ["rotate_half"]


def _eager(op: str) -> Callable:
    """transformers' own function for the layout (imported lazily: the suite list loads without transformers)."""
    if op == "rotate_half":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb
    if op == "partial":
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

        return apply_rotary_pos_emb
    from transformers.models.gptj.modeling_gptj import rotate_every_two

    def interleaved(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_every_two(q) * sin, k * cos + rotate_every_two(k) * sin

    return interleaved


def _ours(op: str) -> Callable:
    from torch_wsl.ops.rope import apply_rotary_pos_emb

    interleaved = op == "interleaved"
    return lambda q, k, cos, sin: apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)


def _bytes(mode: str, nq: int, nk: int, ntable: int, elem: int) -> int:
    """Minimum DRAM traffic: q and k read, q_embed and k_embed written, cos and sin read (per direction)."""
    one_way = (2 * (nq + nk) + 2 * ntable) * elem
    return one_way if mode == "fwd" else 2 * one_way


def _parse(size: str) -> tuple[int, int, int, int, int]:
    parts = [int(v) for v in size.split("x")]
    if len(parts) != 5:
        raise SystemExit(f"rope sizes are BATCHxSEQxHEADSxKV_HEADSxHEAD_DIM, got {size!r}")
    return tuple(parts)  # type: ignore[return-value]


def cases(args) -> Iterator[Case]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for op in args.ops or DEFAULT_OPS:
        if op not in OPS:
            raise SystemExit(f"rope ops are {', '.join(OPS)}, got {op!r}")
        for size in args.sizes:
            for dname in args.dtypes:
                for mode in args.modes:
                    yield _case(op, _parse(size), dname, dtypes[dname], mode, args.device, args.compile)


def _case(op, size, dname, dtype, mode, device, with_compile) -> Case:
    b, s, hq, hk, d = size
    rotary = d // 4 if op == "partial" else d
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    xq, xk = make(b, s, hq * d), make(b, s, hk * d)  # the projections' outputs
    ang = torch.rand(b, s, rotary // 2, generator=g) * 100
    emb = ang.repeat_interleave(2, -1) if op == "interleaved" else torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)
    # Gradients as SDPA's backward hands them over: [b, s, h, d] in memory.
    dq = make(b, s, hq, d).transpose(1, 2)
    dk = make(b, s, hk, d).transpose(1, 2)
    train = mode != "fwd"
    for t in (xq, xk):
        t.requires_grad_(train)

    def inputs() -> tuple:
        # q and k as the attention projections give them, viewed afresh each call.
        q = xq.view(b, s, hq, d).transpose(1, 2)
        k = xk.view(b, s, hk, d).transpose(1, 2)
        return (q, k, cos, sin), (xq, xk), [dq, dk]

    contenders = operator_contenders(train, inputs, _eager(op), _ours(op), with_compile)
    return Case(
        suite="rope",
        op=op,
        mode=mode,
        dtype=dname,
        shape=size,
        bytes_moved=_bytes(mode, xq.numel(), xk.numel(), cos.numel(), xq.element_size()),
        contenders=contenders,
        device=device,
        baseline="eager",
    )
