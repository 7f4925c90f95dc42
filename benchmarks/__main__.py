"""python -m benchmarks [--suite norm] [--sizes 4096x4096,1024x4096] [--dtypes fp32,bf16] [--device cpu] [--rounds 10]

Runs torch_wsl against eager PyTorch and torch.compile, prints a table and
writes JSON (benchmarks/results/latest.json unless --out is given).

The contenders of a case, and the roofline triad, are timed interleaved in
--rounds rounds (see benchmarks/harness.py): speedups over the case's
baseline and roofline fractions are medians of per-round ratios, which the
machine's drifting memory bandwidth moves far less than it moves the times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

# Keep freed memory in glibc's heap instead of returning every large block to
# the kernel: otherwise each call's outputs are fresh mmap()s whose page faults
# cost more than the kernels being measured (about 10 GB/s for a 64 MiB add
# here), for every contender alike. This is what a caching allocator gives a
# training loop in its steady state. `--allocator system` measures without it.
_WARM_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(1 << 26)}
# numpy (imported by torch) starts OpenBLAS worker threads that nothing here
# uses; on a 2-core machine they only compete with the kernels measured.
_QUIET_THREADS = {"OPENBLAS_NUM_THREADS": "1"}
if __name__ == "__main__" and "--allocator=system" not in sys.argv and "TORCH_WSL_BENCH_REEXEC" not in os.environ:
    if not ("--allocator" in sys.argv and sys.argv[sys.argv.index("--allocator") + 1 :][:1] == ["system"]):
        os.environ.update(_WARM_HEAP, **_QUIET_THREADS, TORCH_WSL_BENCH_REEXEC="1")
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]])

import torch  # noqa: E402

from . import harness  # noqa: E402
from .suites import SUITES  # noqa: E402


#: Rounds per case under --quick.
QUICK_ROUNDS = 5
#: The triad's arrays (each; 3 of them), MiB: far larger than any CPU's last-level cache.
TRIAD_MIB, QUICK_TRIAD_MIB = 256, 64


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", type=_csv, default=list(SUITES), help=f"comma-separated; known: {', '.join(SUITES)}")
    p.add_argument("--ops", type=_csv, default=None, help="restrict to these operators")
    p.add_argument(
        "--sizes", type=_csv, default=None, help="ROWSxCOLS,... or model sizes (124M,10M) for optim (suite default if omitted)"
    )
    p.add_argument("--dtypes", type=_csv, default=None, help="fp32,bf16,fp16 (suite default if omitted)")
    p.add_argument("--modes", type=_csv, default=None, help="fwd,fwd+bwd (suite default if omitted)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile contender")
    p.add_argument("--reps", type=int, default=15, help="timed calls per contender (at least, over all rounds)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="minimum timed seconds per contender (over all rounds)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of every contender before the rounds")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"interleaved rounds per case: each runs every contender and the triad, in rotating order "
        f"(default {harness.ROUNDS}; {QUICK_ROUNDS} with --quick)",
    )
    p.add_argument(
        "--round-warmup",
        type=int,
        default=1,
        help="untimed calls at the start of each contender's burst in a round (none for calls of 20 ms or more)",
    )
    p.add_argument(
        "--triad-mib",
        type=int,
        default=None,
        help=f"size of each of the roofline triad's 3 arrays, MiB (default {TRIAD_MIB}; {QUICK_TRIAD_MIB} with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, few reps and rounds, a smaller triad: a smoke run")
    p.add_argument(
        "--allocator",
        choices=["warm-heap", "system"],
        default="warm-heap",
        help="warm-heap (default): glibc keeps freed memory (no page faults per call); system: glibc defaults",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    for suite in SUITES.values():  # suite-specific options
        if hasattr(suite, "add_args"):
            suite.add_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.min_seconds, args.warmup = 3, 0.0, 1
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else harness.ROUNDS
    if args.triad_mib is None:
        args.triad_mib = QUICK_TRIAD_MIB if args.quick else TRIAD_MIB
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def args_for_suite(args: argparse.Namespace, suite) -> argparse.Namespace:
    """A copy of the command line's arguments with what it left unset filled by the suite's own
    defaults (QUICK_DEFAULTS over DEFAULTS under --quick): one suite's sizes are not the next one's."""
    suite_args = argparse.Namespace(**vars(args))
    defaults = {**suite.DEFAULTS, **(getattr(suite, "QUICK_DEFAULTS", {}) if args.quick else {})}
    for key, value in defaults.items():
        if getattr(suite_args, key, None) is None:
            setattr(suite_args, key, value)
    return suite_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device is visible; run with --device cpu", file=sys.stderr)
        return 2
    try:
        from rich.console import Console
        from rich.progress import Progress
        from rich.table import Table
    except ImportError:  # plain output without rich
        Console = None  # type: ignore[assignment]

    load_start = _load_average()
    if load_start is not None and load_start > (os.cpu_count() or 1) - 0.5:
        print(
            f"warning: load average {load_start:.1f} on {os.cpu_count()} CPUs: other processes compete for the "
            "cores, and per-round ratios only cancel drift that every member of a round sees alike",
            file=sys.stderr,
        )
    # The triad's arrays stay allocated: each case runs it again in its rounds.
    triad = harness.Triad(args.device, mib=args.triad_mib)
    roofline = triad.measure(min_seconds=0.1 if args.quick else 0.5)
    roofline["allocator"] = args.allocator
    print(
        f"roofline ({roofline['kernel']}, {roofline['threads']} threads): "
        f"{roofline['best_gbps']:.1f} GB/s best, {roofline['median_gbps']:.1f} GB/s median"
    )
    all_cases = []
    custom = []  # suites that measure through their own run(args) and print their own report
    for name in args.suite:
        suite = SUITES[name]
        suite_args = args_for_suite(args, suite)
        if hasattr(suite, "run"):
            custom.append((suite, suite_args))
        else:
            all_cases.extend(suite.cases(suite_args))

    custom_results: list[harness.Result] = []
    for suite, suite_args in custom:
        suite_results = suite.run(suite_args)
        custom_results.extend(suite_results)
        print(suite.format_report(suite_results))

    results: list[harness.Result] = []

    def run(case):
        return harness.run_case(
            case, triad, args.warmup, args.reps, args.min_seconds, rounds=args.rounds, round_warmup=args.round_warmup
        )

    if not all_cases:
        pass
    elif Console is not None:
        with Progress(transient=True) as progress:
            task = progress.add_task("benchmarking", total=len(all_cases))
            for case in all_cases:
                progress.update(task, description=f"{case.op} {case.mode} {case.dtype} {case.shape}")
                results.extend(run(case))
                progress.advance(task)
        table = Table(title=f"torch_wsl benchmarks on {args.device}: {args.rounds} interleaved rounds per case; "
                      f"roofline = the triad in the same rounds ({roofline['best_gbps']:.1f} GB/s best at start)")
        for h in harness.TABLE_HEADER:
            table.add_column(h, justify="right" if h not in ("op", "mode", "contender") else "left")
        for row in harness.format_table(results):
            table.add_row(*row)
        Console(width=200).print(table)
    else:
        for i, case in enumerate(all_cases):
            print(f"[{i + 1}/{len(all_cases)}] {case.op} {case.mode} {case.dtype} {case.shape}", flush=True)
            results.extend(run(case))
        print(" | ".join(harness.TABLE_HEADER))
        for row in harness.format_table(results):
            print(" | ".join(row))

    in_round = [r.roofline_gbps for r in {(r.suite, r.op, r.mode, r.dtype, tuple(r.shape)): r for r in results}.values()
                if r.roofline_gbps]
    if in_round:
        roofline["in_round_gbps"] = {"cases": len(in_round), "min": min(in_round), "max": max(in_round),
                                     "median": statistics.median(in_round)}
        print(f"triad in the cases' rounds: {min(in_round):.1f} to {max(in_round):.1f} GB/s "
              f"(median {statistics.median(in_round):.1f}) over {len(in_round)} cases; "
              f"speedups vs baseline are medians of per-round ratios (p25-p75 in parentheses)")
    results.extend(custom_results)
    timing = {
        "rounds": args.rounds,
        "round_warmup": args.round_warmup,
        "warmup": args.warmup,
        "reps": args.reps,
        "min_seconds": args.min_seconds,
        "order": "round r: the contenders then the triad, rotated by r // 2, reversed on odd rounds",
    }
    machine = harness.machine_info(args.device)
    machine["load_average"] = {"start": load_start, "end": _load_average()}
    harness.write_json(args.out, machine, roofline, results, ["python", "-m", "benchmarks", *argv], timing)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
