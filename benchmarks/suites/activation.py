"""Gated MLP activations (SwiGLU, GeGLU; the packed Phi-3 layout): eager vs torch.compile vs torch_wsl.

Sizes are tokens x intermediate size: 11008 is Llama-2-7B's MLP, 14336
Llama-3-8B's and Mistral-7B's. The eager contender is the models' own code:
``F.silu(gate) * up`` (LlamaMLP), ``F.gelu(gate, approximate="tanh") * up``
(Gemma), ``F.gelu(gate) * up`` (the GeGLU paper's erf GELU), and for the packed
layout Phi3MLP's ``gate, up = gate_up.chunk(2, -1); up * F.silu(gate)``.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..harness import Case, operator_contenders

# The default run: Llama-2-7B's MLP width; the other size is --sizes 4096x14336.
DEFAULTS = {"sizes": ["4096x11008"], "dtypes": ["fp32", "bf16"], "modes": ["fwd", "fwd+bwd"]}
QUICK_DEFAULTS = {"sizes": ["256x1024"]}  # --quick
OPS = ["swiglu", "geglu_tanh", "geglu", "swiglu_packed"]


def _eager(op: str) -> Callable:
    if op == "swiglu":
        return lambda gate, up: F.silu(gate) * up
    if op == "geglu_tanh":
        return lambda gate, up: F.gelu(gate, approximate="tanh") * up
    if op == "geglu":
        return lambda gate, up: F.gelu(gate) * up

    def phi3(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return up * F.silu(gate)

    return phi3


def _ours(op: str) -> Callable:
    from torch_wsl.ops import activation as act

    return {
        "swiglu": act.silu_mul,
        "geglu_tanh": lambda gate, up: act.gelu_mul(gate, up, approximate="tanh"),
        "geglu": act.gelu_mul,
        "swiglu_packed": act.silu_mul_packed,
    }[op]


def _bytes(mode: str, numel: int, elem: int) -> int:
    """Minimum DRAM traffic: gate and up read, the output written; backward: dy, gate, up read,
    both gradients written."""
    fwd = 3 * numel * elem
    bwd = 5 * numel * elem
    return fwd if mode == "fwd" else fwd + bwd


def cases(args) -> Iterator[Case]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for op in args.ops or OPS:
        for size in args.sizes:
            m, n = (int(v) for v in size.split("x"))
            for dname in args.dtypes:
                for mode in args.modes:
                    yield _case(op, m, n, dname, dtypes[dname], mode, args.device, args.compile)


class _Inputs:
    """The tensors of the case being timed, made on its first call; making another case's frees
    them first. The harness builds every case before running them one at a time, and a case's
    inputs reach 0.7 GB (4096 x 14336 fp32 gate, up, dy): made up front, all cases' together
    would not fit this machine's memory."""

    key: tuple | None = None
    tensors: tuple = ()

    @classmethod
    def get(cls, key: tuple, make: Callable[[], tuple]) -> tuple:
        if cls.key != key:
            cls.key, cls.tensors = None, ()  # the previous case's tensors go before the new ones come
            cls.tensors, cls.key = make(), key
        return cls.tensors


def _case(op, m, n, dname, dtype, mode, device, with_compile) -> Case:
    packed = op.endswith("_packed")
    train = mode != "fwd"
    key = (op, m, n, dname, mode, device)

    def make() -> tuple:
        g = torch.Generator(device="cpu").manual_seed(0)
        rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        leaves = [rand(m, 2 * n)] if packed else [rand(m, n), rand(m, n)]
        for t in leaves:
            t.requires_grad_(train)
        return leaves, rand(m, n)

    def inputs() -> tuple:
        leaves, dy = _Inputs.get(key, make)
        return leaves, leaves, dy

    contenders = operator_contenders(train, inputs, _eager(op), _ours(op), with_compile)
    return Case(
        suite="activation",
        op=op,
        mode=mode,
        dtype=dname,
        shape=(m, n),
        bytes_moved=_bytes(mode, m * n, torch.finfo(dtype).bits // 8),
        contenders=contenders,
        device=device,
        baseline="eager",
    )
