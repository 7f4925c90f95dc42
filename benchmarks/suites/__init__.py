"""Benchmark suites: each module exposes `cases(args) -> Iterable[Case]` and `DEFAULTS`.

A suite may also define `add_args(parser)` (its own options), and `run(args)
-> list[Result]` with `format_report(results) -> str` when it measures
something other than per-call operator time (the allocator suite does).
"""

from . import activation, alloc, cross_entropy, dist, norm, optim, rope, train

SUITES = {"norm": norm, "activation": activation, "rope": rope, "cross_entropy": cross_entropy, "optim": optim, "alloc": alloc,
          "train": train, "dist": dist}
