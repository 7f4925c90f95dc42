"""Optimizer steps and gradient clipping: torch_wsl.optim vs torch.optim (foreach=True, fused=True).

Parameter sets are GPT-shaped: "124M" is GPT-2 small (148 tensors: wte 50257x768,
wpe 1024x768, 12 blocks of LayerNorms, attention and MLP weights and biases,
ln_f), "10M" a narrower GPT (d=256, 8 blocks, vocab 16384; 100 tensors). Any
"<N>M" size is accepted and built the same way at a width that gives about N
million parameters. One case is one optimizer step (or one clip_grad_norm_) over
all tensors, as one parameter group.

bytes_moved is the minimum traffic of a step, the same for every contender:
Adam/AdamW read param, grad, exp_avg, exp_avg_sq and write param, exp_avg,
exp_avg_sq (7 tensors of the parameters' dtype per element); SGD with momentum
5 (param, grad, buffer in; param, buffer out); clip_grad_norm_ 3 (one read for
the norm, one read and one write to scale).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from ..harness import Case, Contender

DEFAULTS = {"sizes": ["124M", "10M"], "dtypes": ["fp32"], "modes": ["step"]}
OPS = ["adamw", "adam", "sgd", "clip_grad_norm"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TRAFFIC = {"adamw": 7, "adam": 7, "sgd": 5, "clip_grad_norm": 3}


def gpt_shapes(vocab: int, ctx: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2-style model (weights stored as in HF's Conv1D)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def model_shapes(size: str) -> list[tuple[int, ...]]:
    if size == "124M":
        return gpt_shapes(50257, 1024, 768, 12)
    if size == "10M":
        return gpt_shapes(16384, 1024, 256, 8)
    millions = float(size[:-1])
    d = 64
    while sum(torch.Size(s).numel() for s in gpt_shapes(16384, 1024, d + 64, 8)) <= millions * 1e6:
        d += 64
    return gpt_shapes(16384, 1024, d, 8)


def _sizes(args) -> list[str]:
    """The model sizes asked for; other suites' sizes (e.g. 4096x4096) are not ours."""
    sizes = [s for s in (args.sizes or []) if re.fullmatch(r"\d+(\.\d+)?M", s)]
    if sizes:
        return sizes
    return ["2M"] if getattr(args, "quick", False) else DEFAULTS["sizes"]


# At most one case's optimizers hold state at a time: a 124M-parameter Adam
# keeps 1 GB of state per contender, and the harness builds every case first.
_LIVE: dict = {"case": None, "objects": []}


def _lazy(case_key: str, build: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    holder: dict = {}

    def call():
        if "step" not in holder:
            if _LIVE["case"] != case_key:
                for h in _LIVE["objects"]:
                    h.clear()
                _LIVE["objects"] = []
                _LIVE["case"] = case_key
            holder["step"] = build()
            _LIVE["objects"].append(holder)
        return holder["step"]()

    return call


def _optimizer_contenders(op: str, key: str, params: list) -> list[Contender]:
    import torch_wsl

    lr = 1e-3
    if op == "sgd":
        make = {
            "torch_wsl": lambda: torch_wsl.optim.SGD(params, lr=lr, momentum=0.9),
            "torch foreach": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True),
            "torch fused": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True),
        }
    else:
        ours, theirs = {"adamw": (torch_wsl.optim.AdamW, torch.optim.AdamW), "adam": (torch_wsl.optim.Adam, torch.optim.Adam)}[op]
        make = {
            "torch_wsl": lambda: ours(params, lr=lr),
            "torch foreach": lambda: theirs(params, lr=lr, foreach=True),
            "torch fused": lambda: theirs(params, lr=lr, fused=True),
        }
    return [Contender(name, _lazy(key, lambda m=m: m().step)) for name, m in make.items()]


def _clip_contenders(params: list) -> list[Contender]:
    import torch_wsl

    # max_norm far above the norm: the gradients are scaled by exactly 1 and stay the same every call.
    return [
        Contender("torch_wsl", lambda: torch_wsl.nn.utils.clip_grad_norm_(params, 1e9)),
        Contender("torch foreach", lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)),
    ]


def cases(args) -> Iterator[Case]:
    device = args.device
    for size in _sizes(args):
        shapes = model_shapes(size)
        numel = sum(torch.Size(s).numel() for s in shapes)
        for dname in [d for d in args.dtypes if d in _DTYPES] or ["fp32"]:
            dtype = _DTYPES[dname]
            g = torch.Generator().manual_seed(0)
            params = []
            for s in shapes:
                p = torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_()
                p.grad = (torch.randn(s, generator=g) * 1e-3).to(device=device, dtype=dtype)
                params.append(p)
            for op in args.ops or OPS:
                if op not in _TRAFFIC:
                    continue
                key = f"{op}-{size}-{dname}"
                contenders = _clip_contenders(params) if op == "clip_grad_norm" else _optimizer_contenders(op, key, params)
                yield Case(
                    suite="optim",
                    op=op,
                    mode="step",
                    dtype=dname,
                    shape=(numel, len(shapes)),
                    bytes_moved=_TRAFFIC[op] * numel * params[0].element_size(),
                    contenders=contenders,
                    device=device,
                    # torch.optim's default on CUDA (on CPU its default is a per-tensor loop, not timed here).
                    baseline="torch foreach",
                )
