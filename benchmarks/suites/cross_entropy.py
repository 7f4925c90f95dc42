"""Cross-entropy and the chunked linear cross-entropy: torch_wsl vs eager vs torch.compile.

Sizes: ``NxC`` is cross_entropy over N rows of C logits (fwd, fwd+bwd);
``TxHxV`` is linear_cross_entropy of T tokens of hidden size H against a
V x H LM head (fwd+bwd only: the training step it exists for).

The linear cross-entropy's step is matmul-bound and takes seconds to minutes
on a small CPU (Llama 3's head at 4096 tokens: three [4096 x 2048 x 128256]
matmuls, ~6.4 TFLOP). Its cases therefore run --lce-rounds interleaved rounds
of one call per contender (default 2), whatever --rounds says, after one
untimed call. Peak memory is reported twice for them: the harness's figure
(storages returned by operators; an operator's internal scratch, such as
torch_wsl's chunk buffers, is invisible to it, and compiled code cannot run
under it) and the true one, every CPU tensor allocation counted by
torch_wsl.memory's allocator (``extra["true_peak_bytes"]``, also for compile).
Both are above the memory allocated before the call; the target compares
``true_peak - weight gradient bytes`` across contenders.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import harness
from ..harness import Case, Result, operator_contenders

# The default run fits a 24 GB machine in minutes. The sizes: --sizes 4096x128256 (with
# --allocator system below ~32 GB: the warm heap keeps each contender's freed 2 GiB logits) and
# 4096x2048x128256 (Llama 3's head: ~35 s a call in fp32 on 2 cores).
DEFAULTS = {"sizes": ["4096x32000", "1024x2048x32000"], "dtypes": ["fp32", "bf16"], "modes": ["fwd", "fwd+bwd"]}
QUICK_DEFAULTS = {"sizes": ["256x1024", "64x64x1024"]}  # --quick
OPS = ["cross_entropy", "linear_cross_entropy"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_args(p) -> None:
    p.add_argument("--lce-rounds", type=int, default=2,
                   help="cross_entropy suite: interleaved rounds (one call each) for linear_cross_entropy cases")


def _ce_case(n: int, c: int, dname: str, mode: str, device: str, with_compile: bool) -> Case:
    from torch_wsl.ops.cross_entropy import cross_entropy

    dtype = _DTYPES[dname]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=g) * 2).to(device=device, dtype=dtype)
    t = torch.randint(0, c, (n,), generator=g).to(device)
    t[::17] = -100
    train = mode != "fwd"
    x.requires_grad_(train)

    eager = lambda a, b: F.cross_entropy(a, b)  # noqa: E731
    contenders = operator_contenders(train, lambda: ((x, t), (x,), None), eager, lambda a, b: cross_entropy(a, b),
                                     with_compile)
    elem = x.element_size()
    # DRAM traffic at the minimum: the logits read once forward; read once more and their gradient written backward.
    bytes_moved = n * c * elem * (1 if mode == "fwd" else 3)
    return Case(suite="cross_entropy", op="cross_entropy", mode=mode, dtype=dname, shape=(n, c),
                bytes_moved=bytes_moved, contenders=contenders, device=device, baseline="eager")


def _lce_case(tokens: int, hidden: int, vocab: int, dname: str, device: str, with_compile: bool) -> Case:
    from torch_wsl.ops.cross_entropy import linear_cross_entropy

    dtype = _DTYPES[dname]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    t[::17] = -100

    eager = lambda a, b, c: F.cross_entropy(F.linear(a, b), c)  # noqa: E731
    contenders = operator_contenders(True, lambda: ((x, w, t), (x, w), None), eager,
                                     lambda a, b, c: linear_cross_entropy(a, b, c), with_compile)
    elem = x.element_size()
    # The least any contender moves: hidden states and weight read, their gradients written.
    bytes_moved = 2 * (tokens * hidden + vocab * hidden) * elem
    case = Case(suite="cross_entropy", op="linear_cross_entropy", mode="fwd+bwd", dtype=dname,
                shape=(tokens, hidden, vocab), bytes_moved=bytes_moved, contenders=contenders, device=device,
                baseline="eager")
    case.weight_grad_bytes = vocab * hidden * elem  # what every contender must hold at the end

    def clear_grads():
        x.grad = None
        w.grad = None

    case.clear_grads = clear_grads
    return case


def cases(args) -> Iterator[Case]:
    ops = args.ops or OPS
    for size in args.sizes:
        dims = [int(v) for v in size.split("x")]
        for dname in args.dtypes:
            if len(dims) == 2 and "cross_entropy" in ops:
                for mode in args.modes:
                    yield _ce_case(dims[0], dims[1], dname, mode, args.device, args.compile)
            elif len(dims) == 3 and "linear_cross_entropy" in ops and "fwd+bwd" in args.modes:
                yield _lce_case(*dims, dname, args.device, args.compile)


def _true_peaks(case: Case) -> dict[str, int]:
    """Peak bytes of one call above what was allocated before it (the inputs' gradients cleared first),
    every CPU tensor allocation counted: torch_wsl.memory's allocator, installed for this measurement only."""
    peaks = {}
    for c in case.contenders:
        c.fn()  # first call: compilation, lazy init
        case.clear_grads()
        peaks[c.name] = harness.cpu_true_peak(c.fn)
    case.clear_grads()
    return peaks


def run(args) -> list[Result]:
    results: list[Result] = []
    triad = None
    for case in cases(args):
        print(f"  {case.op} {case.mode} {case.dtype} {'x'.join(map(str, case.shape))}", flush=True)
        if case.op == "linear_cross_entropy":
            true_peaks = _true_peaks(case) if case.device == "cpu" else {}
            rounds = max(1, args.lce_rounds)
            rs = harness.run_case(case, None, warmup=0, reps=rounds, min_seconds=0.0, rounds=rounds, round_warmup=0)
            for r in rs:
                r.extra["weight_grad_bytes"] = case.weight_grad_bytes
                if r.contender in true_peaks:
                    r.extra["true_peak_bytes"] = true_peaks[r.contender]
        else:
            if triad is None:
                triad = harness.Triad(args.device, mib=args.triad_mib)
                triad.measure(min_seconds=0.1 if args.quick else 0.5)
            rs = harness.run_case(case, triad, args.warmup, args.reps, args.min_seconds, rounds=args.rounds,
                                  round_warmup=args.round_warmup)
        results.extend(rs)
    return results


def summary(results: list[Result]) -> dict:
    """The issue's targets: cross_entropy fwd+bwd >= 1.5x eager and >= 1.0x compile; linear_cross_entropy
    peak beyond the weight gradient <= 1/4 of eager's and of compile's, time <= 1.1x eager's."""
    out: dict = {}
    by: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by.setdefault((r.op, r.mode, r.dtype, tuple(r.shape)), {})[r.contender] = r
    for (op, mode, dtype, shape), group in by.items():
        ours = group.get("torch_wsl")
        if ours is None:
            continue
        key = f"{op}.{mode}.{dtype}.{'x'.join(map(str, shape))}"
        for other, r in group.items():
            if other == "torch_wsl":
                continue
            ratio = harness.round_ratios(r.round_ms, ours.round_ms)
            speed = ratio[1] if ratio else r.median_ms / ours.median_ms
            if op == "cross_entropy" and mode == "fwd+bwd":
                target = 1.5 if other == "eager" else 1.0
                out[f"{key}.speedup_vs_{other}"] = {"value": speed, "target": f">= {target}", "met": speed >= target}
            if op == "linear_cross_entropy":
                if other == "eager":
                    out[f"{key}.time_vs_eager"] = {"value": 1 / speed, "target": "<= 1.1", "met": 1 / speed <= 1.1}
                wg = ours.extra.get("weight_grad_bytes", 0)
                mine, theirs = ours.extra.get("true_peak_bytes"), r.extra.get("true_peak_bytes")
                if mine is not None and theirs is not None and theirs > wg:
                    frac = (mine - wg) / (theirs - wg)
                    out[f"{key}.peak_beyond_weight_grad_vs_{other}"] = {
                        "value": frac, "target": "<= 0.25", "met": frac <= 0.25,
                        "torch_wsl_MiB": (mine - wg) / 2**20, f"{other}_MiB": (theirs - wg) / 2**20}
    return out


def format_report(results: list[Result]) -> str:
    lines = ["", "cross_entropy suite (linear_cross_entropy: true peak = every CPU allocation, above the start)"]
    lines.append(" | ".join(harness.TABLE_HEADER + ["true peak MiB", "beyond weight grad MiB"]))
    rows = harness.format_table(results)
    by_key = {(r.op, r.mode, r.dtype, "x".join(map(str, r.shape)), r.contender): r for r in results}
    for row in rows:
        r = by_key.get((row[0], row[1], row[2], row[3], row[4]))
        true_peak = r.extra.get("true_peak_bytes") if r else None
        wg = r.extra.get("weight_grad_bytes", 0) if r else 0
        extra = ["", ""] if true_peak is None else [f"{true_peak / 2**20:.0f}", f"{(true_peak - wg) / 2**20:.0f}"]
        lines.append(" | ".join(row + extra))
    lines.append("")
    for k, v in summary(results).items():
        lines.append(f"{k}: {v['value']:.3f} (target {v['target']}, {'met' if v['met'] else 'NOT met'})")
    return "\n".join(lines)
