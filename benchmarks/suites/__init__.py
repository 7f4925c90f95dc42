"""Benchmark suites: each module exposes `cases(args) -> Iterable[Case]` and `DEFAULTS`."""

from . import norm

SUITES = {"norm": norm}
