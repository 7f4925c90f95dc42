"""LayerNorm / RMSNorm, plain and with the fused residual add: torch_wsl vs eager vs torch.compile."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..harness import Case, operator_contenders

DEFAULTS = {"sizes": ["4096x4096", "1024x4096"], "dtypes": ["fp32", "bf16"], "modes": ["fwd", "fwd+bwd"]}
QUICK_DEFAULTS = {"sizes": ["256x1024"]}  # --quick
OPS = ["add_rms_norm", "add_layer_norm", "rms_norm", "layer_norm"]


def _eager(op: str, n: int) -> Callable:
    if op == "rms_norm":
        return lambda x, r, w, b: F.rms_norm(x, (n,), w)
    if op == "layer_norm":
        return lambda x, r, w, b: F.layer_norm(x, (n,), w, b)
    if op == "add_rms_norm":

        def add_rms(x, r, w, b):
            s = x + r
            return F.rms_norm(s, (n,), w), s

        return add_rms

    def add_ln(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (n,), w, b), s

    return add_ln


def _ours(op: str, n: int) -> Callable:
    import torch_wsl.nn.functional as TF

    return {
        "rms_norm": lambda x, r, w, b: TF.rms_norm(x, (n,), w),
        "layer_norm": lambda x, r, w, b: TF.layer_norm(x, (n,), w, b),
        "add_rms_norm": lambda x, r, w, b: TF.add_rms_norm(x, r, (n,), w),
        "add_layer_norm": lambda x, r, w, b: TF.add_layer_norm(x, r, (n,), w, b),
    }[op]


def _bytes(op: str, mode: str, numel: int, elem: int) -> int:
    """Minimum DRAM traffic: each tensor the math needs read once, each result written once."""
    fused = op.startswith("add_")
    fwd = (4 if fused else 2) * numel * elem  # x (+r) in; y (+residual_out) out
    bwd = (4 if fused else 3) * numel * elem  # dy (+d residual_out), saved x in; dx out (shared by x and r)
    return fwd if mode == "fwd" else fwd + bwd


def cases(args) -> Iterator[Case]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    device = args.device
    for op in args.ops or OPS:
        for size in args.sizes:
            m, n = (int(v) for v in size.split("x"))
            for dname in args.dtypes:
                dtype = dtypes[dname]
                for mode in args.modes:
                    yield _case(op, m, n, dname, dtype, mode, device, args.compile)


def _case(op, m, n, dname, dtype, mode, device, with_compile) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, r, dy, dr = make(m, n), make(m, n), make(m, n), make(m, n)
    w, b = make(n) + 1, make(n)
    fused = op.startswith("add_")
    train = mode != "fwd"
    leaves = [x, r, w, b] if fused else [x, w, b]
    for t in leaves:
        t.requires_grad_(train)

    grads = [dy, dr] if fused else dy
    contenders = operator_contenders(train, lambda: ((x, r, w, b), leaves, grads), _eager(op, n), _ours(op, n),
                                     with_compile)
    return Case(
        suite="norm",
        op=op,
        mode=mode,
        dtype=dname,
        shape=(m, n),
        bytes_moved=_bytes(op, mode, m * n, x.element_size()),
        contenders=contenders,
        device=device,
        baseline="eager",
    )
