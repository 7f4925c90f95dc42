"""The benchmark harness's interleaved timing: round order, per-round ratios, the in-round
roofline, the JSON and table, and a smoke run of `python -m benchmarks`. CPU only, fast."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness, report
from benchmarks.harness import Case, Contender

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """Seconds that move only when a fake contender says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Scripted:
    """Fake members whose call takes schedule[name][round] milliseconds of the fake clock.

    Calls outside the rounds (first call, warm-up) take before[name] ms (default 1). Every
    call is logged with the round it ran in (-1: before the rounds)."""

    def __init__(self, schedule: dict[str, list[float]], before: dict[str, float] | None = None) -> None:
        self.schedule = schedule
        self.before = before or {}
        self.clock = FakeClock()
        self.round = -1
        self.log: list[tuple[int, str]] = []
        self.orders: list[list[str]] = []

    def on_round(self, r: int, names: list[str]) -> None:
        self.round = r
        self.orders.append(names)

    def fn(self, name: str):
        def call():
            self.log.append((self.round, name))
            ms = self.schedule[name][self.round] if self.round >= 0 else self.before.get(name, 1.0)
            self.clock.t += ms / 1e3

        return call


class FakeTriad:
    """Stands in for harness.Triad: a member with bytes_moved that runs on a call."""

    def __init__(self, script: Scripted, bytes_moved: int) -> None:
        self.bytes_moved = bytes_moved
        self._call = script.fn("(triad)")

    def __call__(self) -> None:
        self._call()


def _case(script: Scripted, names: list[str], baseline: str | None = None, bytes_moved: int = 10**6) -> Case:
    # launches= and dispatch_mode_ok=False keep the untimed measurements from calling the fakes again.
    contenders = [Contender(n, script.fn(n), launches=lambda: 0, dispatch_mode_ok=False) for n in names]
    return Case("t", "op", "fwd", "fp32", (1,), bytes_moved, contenders, baseline=baseline)


def _run(case: Case, script: Scripted, roofline=None, rounds: int = 5, **kw) -> dict[str, harness.Result]:
    kw.setdefault("warmup", 2)
    results = harness.run_case(
        case, roofline, reps=rounds, min_seconds=0.0, rounds=rounds, clock=script.clock, on_round=script.on_round, **kw
    )
    return {r.contender: r for r in results}


def test_round_order_rotates_and_alternates():
    members = ["a", "b", "c", "t"]
    orders = [harness.round_order(members, r) for r in range(2 * len(members))]
    for o in orders:
        assert sorted(o) == sorted(members)
    assert orders[0] == ["a", "b", "c", "t"] and orders[1] == ["t", "c", "b", "a"]
    # Over 2n rounds each member runs first twice and last twice; no two rounds in a row share their first.
    assert {m: sum(o[0] == m for o in orders) for m in members} == dict.fromkeys(members, 2)
    assert {m: sum(o[-1] == m for o in orders) for m in members} == dict.fromkeys(members, 2)
    assert all(orders[i][0] != orders[i + 1][0] for i in range(len(orders) - 1))
    # Each member runs right before each of its neighbours and right after it.
    pairs = {(o[i], o[i + 1]) for o in orders for i in range(len(o) - 1)}
    assert ("a", "b") in pairs and ("b", "a") in pairs
    assert harness.round_order(["x", "y"], 0) == ["x", "y"] and harness.round_order(["x", "y"], 1) == ["y", "x"]


def test_run_case_interleaves_rounds_after_warming_every_contender():
    rounds = 6
    names = ["wsl", "eager", "compile"]
    script = Scripted({n: [1.0] * rounds for n in [*names, "(triad)"]})
    _run(_case(script, names), script, FakeTriad(script, 10**6), rounds=rounds, warmup=2, round_warmup=1)
    before = [name for r, name in script.log if r < 0]
    # Untimed: each contender's first call, then 2 warm-up calls of every contender and 1 of the triad.
    assert before == names + ["wsl", "wsl", "eager", "eager", "compile", "compile", "(triad)"]
    assert script.orders == [harness.round_order([*names, "(triad)"], r) for r in range(rounds)]
    assert len({o[0] for o in script.orders}) == 4  # every member leads some round
    for r in range(rounds):
        calls = [name for rr, name in script.log if rr == r]
        # Each contender: 1 untimed lead call then 1 timed call (reps = rounds), back to back; the triad: 1 call.
        expected = [n for n in script.orders[r] for _ in range(1 if n == "(triad)" else 2)]
        assert calls == expected


def test_slow_contenders_get_no_lead_calls():
    rounds = 4
    script = Scripted({"fast": [1.0] * rounds, "slow": [30.0] * rounds}, before={"slow": 30.0})
    _run(_case(script, ["fast", "slow"]), script, rounds=rounds, warmup=1, round_warmup=2)
    for r in range(rounds):
        calls = [name for rr, name in script.log if rr == r]
        assert calls.count("fast") == 3 and calls.count("slow") == 1  # 2 lead calls + 1 timed; 1 timed


def test_speedup_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    base = [1.0, 10.0, 100.0, 4.0, 8.0]
    fast = [1.0, 5.0, 200.0, 2.0, 8.0]  # per round: 1, 2, 0.5, 2, 1
    triad = [2.0, 20.0, 50.0, 4.0, 16.0]
    script = Scripted({"base": base, "fast": fast, "(triad)": triad})
    out = _run(_case(script, ["fast", "base"], baseline="base", bytes_moved=10**6), script, FakeTriad(script, 3 * 10**6))
    ratios = [b / f for b, f in zip(base, fast)]
    q = statistics.quantiles(ratios, n=4)
    r = out["fast"]
    assert r.baseline == "base" and r.rounds == 5 and r.reps == 5
    assert r.round_ms == pytest.approx(fast)
    assert r.speedup_vs_baseline == pytest.approx(statistics.median(ratios)) == pytest.approx(1.0)
    assert (r.speedup_p25, r.speedup_p75) == (pytest.approx(q[0]), pytest.approx(q[2]))
    assert statistics.median(base) / statistics.median(fast) == pytest.approx(1.6)  # what timing blocks apart gave
    assert out["base"].speedup_vs_baseline == out["base"].speedup_p25 == out["base"].speedup_p75 == 1.0
    assert r.median_ms == pytest.approx(5.0) and r.p25_ms <= r.median_ms <= r.p75_ms
    # Roofline: per round (1 MB / fast ms) / (3 MB / triad ms), median; the case's triad from its median call.
    fractions = [t / (3 * f) for t, f in zip(triad, fast)]
    assert r.roofline_fraction == pytest.approx(statistics.median(fractions))
    assert r.roofline_gbps == pytest.approx(3e6 / (statistics.median(triad) / 1e3) / 1e9)
    assert r.extra["triad_round_gbps"] == pytest.approx([3e6 / (t / 1e3) / 1e9 for t in triad])
    assert r.gbps == pytest.approx(1e6 / 5e-3 / 1e9)


def test_fixed_or_no_roofline_and_bursts_fill_the_round_time():
    script = Scripted({"a": [2.0] * 4, "b": [4.0] * 4})
    out = _run(_case(script, ["a", "b"]), script, roofline=1.0, rounds=4)
    assert out["a"].baseline == "a"  # the first contender by default
    assert out["b"].speedup_vs_baseline == pytest.approx(0.5)
    assert out["a"].roofline_gbps == 1.0 and out["a"].roofline_fraction == pytest.approx(out["a"].gbps / 1.0)
    assert not [n for _, n in script.log if n == "(triad)"]
    # min_seconds is split over the rounds: 0.04 s / 4 rounds = 10 ms per burst -> 5 calls of 2 ms, 3 of 4 ms.
    script = Scripted({"a": [2.0] * 4, "b": [4.0] * 4})
    out = harness.run_case(_case(script, ["a", "b"]), None, warmup=0, reps=4, min_seconds=0.04, rounds=4,
                           clock=script.clock, on_round=script.on_round)
    assert [r.reps for r in out] == [4 * 5, 4 * 3]
    assert out[0].roofline_fraction == 0.0 and out[0].roofline_gbps is None


def test_case_baseline_is_checked():
    f = lambda: None  # noqa: E731
    assert Case("s", "op", "fwd", "fp32", (1,), 1, [Contender("x", f), Contender("y", f)]).baseline == "x"
    with pytest.raises(ValueError, match="baseline"):
        Case("s", "op", "fwd", "fp32", (1,), 1, [Contender("x", f)], baseline="eager")
    with pytest.raises(ValueError, match="repeat"):
        Case("s", "op", "fwd", "fp32", (1,), 1, [Contender("x", f), Contender("x", f)])


def test_suites_name_plain_pytorch_as_their_baseline():
    from benchmarks.suites import norm, optim

    args = argparse.Namespace(ops=None, sizes=["8x16"], dtypes=["fp32"], modes=["fwd"], device="cpu", compile=False)
    norm_cases = list(norm.cases(args))
    assert norm_cases and all(c.baseline == "eager" for c in norm_cases)
    args = argparse.Namespace(ops=["sgd", "clip_grad_norm"], sizes=["1M"], dtypes=["fp32"], device="cpu", quick=True)
    optim_cases = list(optim.cases(args))
    assert len(optim_cases) == 2 and all(c.baseline == "torch foreach" for c in optim_cases)


def test_real_contenders_keep_ops_and_peak_memory(tmp_path):
    x = torch.ones(1024)
    case = Case("t", "add", "fwd", "fp32", (1024,), 3 * 4096,
                [Contender("mul", lambda: x * 2), Contender("add", lambda: torch.add(torch.mul(x, 2), 1))])
    results = harness.run_case(case, harness.Triad("cpu", mib=1), warmup=1, reps=3, min_seconds=0.0, rounds=3)
    by = {r.contender: r for r in results}
    assert by["mul"].dispatched_ops == 1 and by["add"].dispatched_ops == 2
    assert by["mul"].peak_memory_bytes == 4096
    assert all(r.rounds == 3 and len(r.round_ms) == 3 and r.roofline_gbps > 0 for r in results)
    assert by["add"].baseline == "mul" and by["add"].speedup_vs_baseline > 0

    path = tmp_path / "out.json"
    harness.write_json(path, {"processor": "test"}, {"best_gbps": 1.0, "kernel": "k", "threads": 1}, results,
                       ["python", "-m", "benchmarks"], {"rounds": 3})
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == harness.SCHEMA_VERSION == 2 and doc["timing"]["rounds"] == 3
    for r in doc["results"]:
        for key in ("baseline", "speedup_vs_baseline", "speedup_p25", "speedup_p75", "rounds", "round_ms",
                    "roofline_gbps", "dispatched_ops", "peak_memory_bytes"):
            assert key in r
    assert [harness.result_from_dict(r) for r in doc["results"]] == results

    rows = {row[4]: row for row in harness.format_table(results)}
    header = harness.TABLE_HEADER
    assert rows["mul"][header.index("vs baseline (p25-p75)")] == "baseline"
    assert rows["add"][header.index("vs baseline (p25-p75)")].endswith(")")
    md = report.markdown(path)
    assert "3 rounds per case" in md and "| vs baseline (p25-p75) |" in md


def test_report_reads_schema_1_results(tmp_path):
    old = {"suite": "norm", "op": "rms_norm", "mode": "fwd", "dtype": "fp32", "shape": [2, 2], "device": "cpu",
           "median_ms": 1.0, "p25_ms": 1.0, "p75_ms": 1.0, "gbps": 1.0, "roofline_fraction": 0.5,
           "dispatched_ops": 1, "peak_memory_bytes": 0, "reps": 3, "extra": {}, "some_future_key": 1}
    doc = {"schema_version": 1, "command": ["python"], "machine": {},
           "roofline": {"best_gbps": 2.0, "kernel": "k", "threads": 1},
           "results": [dict(old, contender="torch_wsl"), dict(old, contender="eager", median_ms=2.0)]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    md = report.markdown(path)
    assert "2.00x" in md  # torch_wsl's speedup from the medians when there are no rounds


def test_cli_quick_norm_run(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_WSL_BENCH_REEXEC"}
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--suite", "norm", "--no-compile", "--ops", "rms_norm",
           "--dtypes", "fp32", "--modes", "fwd", "--rounds", "3", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "vs baseline" in p.stdout and "baseline" in p.stdout and "triad in the cases' rounds" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 2 and doc["timing"]["rounds"] == 3 and doc["roofline"]["array_mib"] == 64
    assert doc["roofline"]["in_round_gbps"]["cases"] == 1 and "start" in doc["machine"]["load_average"]
    by = {r["contender"]: r for r in doc["results"]}
    assert set(by) == {"torch_wsl", "eager"}
    assert by["eager"]["speedup_vs_baseline"] == 1.0 and by["torch_wsl"]["baseline"] == "eager"
    assert by["torch_wsl"]["rounds"] == 3 and len(by["torch_wsl"]["round_ms"]) == 3
    assert by["torch_wsl"]["speedup_p25"] <= by["torch_wsl"]["speedup_vs_baseline"] <= by["torch_wsl"]["speedup_p75"]
    assert by["torch_wsl"]["dispatched_ops"] == 1 and by["torch_wsl"]["roofline_gbps"] > 0


def test_cli_help_lists_rounds():
    from benchmarks.__main__ import parse_args

    assert parse_args(["--quick"]).rounds == 5 and parse_args(["--quick"]).triad_mib == 64
    assert parse_args([]).triad_mib == 256
    assert parse_args([]).rounds == harness.ROUNDS == 10
    assert parse_args(["--rounds", "12"]).rounds == 12
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


def test_each_suite_gets_its_own_defaults():
    """The default run (every suite): one suite's default sizes must not reach the next (rope's sizes have
    another format than norm's); --quick takes each suite's QUICK_DEFAULTS; the command line wins."""
    from benchmarks.__main__ import args_for_suite, parse_args
    from benchmarks.suites import SUITES

    args = parse_args([])
    seen = {name: args_for_suite(args, suite).sizes for name, suite in SUITES.items()}
    assert seen["norm"] == SUITES["norm"].DEFAULTS["sizes"]
    assert seen["rope"] == SUITES["rope"].DEFAULTS["sizes"] and seen["rope"] != seen["norm"]
    assert args.sizes is None  # the shared namespace is untouched
    quick = parse_args(["--quick"])
    assert args_for_suite(quick, SUITES["rope"]).sizes == SUITES["rope"].QUICK_DEFAULTS["sizes"]
    assert args_for_suite(parse_args(["--sizes", "8x8"]), SUITES["norm"]).sizes == ["8x8"]
    # Every operator suite's cases can be built from its own defaults.
    for name in ("norm", "activation", "rope", "cross_entropy"):
        suite_args = args_for_suite(parse_args(["--quick", "--no-compile"]), SUITES[name])
        assert next(iter(SUITES[name].cases(suite_args))).suite == name
