"""Benchmark suites: each module exposes `cases(args) -> Iterable[Case]` and `DEFAULTS`."""

from . import norm, optim

SUITES = {"norm": norm, "optim": optim}
