"""Markdown table of a harness run, and its pictures.

    python -m benchmarks.report [benchmarks/results/latest.json] [--plot] [--plot-dir DIR]

--plot also writes one PNG per suite in the file (matplotlib, Agg backend):
each case's speedup over its baseline per contender (median over rounds, the
25th-75th percentile as error bars) and its dispatched ops per call (per step
for the train suite), next to the JSON (``<name>.<suite>.png``) or into
--plot-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .harness import TABLE_HEADER, format_table, result_from_dict


def markdown(path: Path) -> str:
    doc = json.loads(path.read_text())
    results = [result_from_dict(r) for r in doc["results"]]
    roof = doc["roofline"]
    lines = [
        f"Roofline: {roof['best_gbps']:.1f} GB/s ({roof['kernel']}, {roof['threads']} threads); "
        f"allocator: {roof.get('allocator', 'system')}; machine: {doc['machine'].get('processor')}, "
        f"torch {doc['machine'].get('torch')}; command: `{' '.join(doc['command'])}`",
        "",
    ]
    rounds = doc.get("timing", {}).get("rounds")
    if rounds:
        in_round = roof.get("in_round_gbps")
        lines += [
            f"Contenders and the triad timed interleaved, {rounds} rounds per case; speedup vs baseline: median "
            "(25th-75th percentile) over rounds of baseline time / contender time in the same round; roofline: "
            "the same per-round ratio against the triad"
            + (f" (triad in the rounds: {in_round['min']:.1f} to {in_round['max']:.1f} GB/s)" if in_round else "")
            + ".",
            "",
        ]
    lines += [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in format_table(results)]
    from .suites import SUITES

    for name in dict.fromkeys(r.suite for r in results):  # suites with columns of their own add a table
        own = getattr(SUITES.get(name), "markdown", None)
        text = own(results) if own else ""
        if text:
            lines += ["", f"{name} suite:", "", text]
    return "\n".join(lines)


def plot(path: Path, out_dir: Optional[Path] = None) -> list[Path]:
    """One PNG per suite of the results in `path`: speedup vs baseline and ops per call, per contender
    and case. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    results = [result_from_dict(r) for r in doc["results"]]
    out_dir = out_dir or path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    by_suite: dict[str, list] = {}
    for r in results:
        by_suite.setdefault(r.suite, []).append(r)
    written = []
    for suite, rs in by_suite.items():
        cases: list[tuple] = []
        contenders: list[str] = []
        cell: dict[tuple, object] = {}
        for r in rs:
            key = (r.op, r.mode, r.dtype, "x".join(map(str, r.shape)))
            if key not in cases:
                cases.append(key)
            if r.contender not in contenders:
                contenders.append(r.contender)
            cell[(key, r.contender)] = r
        labels = [f"{op}\n{mode} {dtype}\n{shape}" for op, mode, dtype, shape in cases]
        width = 0.8 / max(1, len(contenders))
        fig, (ax_speed, ax_ops) = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(cases) + 2), 8), sharex=True)
        per_call = "step" if suite == "train" else "call"
        for i, name in enumerate(contenders):
            xs, speed, lo, hi, ops_x, ops = [], [], [], [], [], []
            for j, key in enumerate(cases):
                r = cell.get((key, name))
                if r is None:
                    continue
                x = j + (i - (len(contenders) - 1) / 2) * width
                if r.speedup_vs_baseline is not None:
                    xs.append(x)
                    speed.append(r.speedup_vs_baseline)
                    lo.append(r.speedup_vs_baseline - (r.speedup_p25 if r.speedup_p25 is not None else r.speedup_vs_baseline))
                    hi.append((r.speedup_p75 if r.speedup_p75 is not None else r.speedup_vs_baseline) - r.speedup_vs_baseline)
                if r.dispatched_ops is not None:
                    ops_x.append(x)
                    ops.append(r.dispatched_ops)
            ax_speed.bar(xs, speed, width, yerr=[lo, hi], capsize=2, label=name)
            ax_ops.bar(ops_x, ops, width, label=name)
        ax_speed.axhline(1.0, color="black", linewidth=0.8)
        ax_speed.set_ylabel("speedup vs baseline (x)")
        ax_speed.set_title(f"{suite}: speedup over the baseline (median over rounds, p25-p75)", fontsize="medium")
        ax_speed.legend(fontsize="small")
        ax_ops.set_ylabel(f"dispatched ops per {per_call}")
        ax_ops.set_title(f"{suite}: dispatched ops per {per_call} (launches; under WSL2 each crosses the VM bus)",
                         fontsize="medium")
        ax_ops.set_xticks(range(len(cases)))
        ax_ops.set_xticklabels(labels, fontsize="small")
        fig.tight_layout()
        target = out_dir / f"{path.stem}.{suite}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description="Markdown table of a benchmark run")
    p.add_argument("json", nargs="?", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    p.add_argument("--plot", action="store_true", help="also write a PNG per suite (speedup and ops per contender)")
    p.add_argument("--plot-dir", type=Path, default=None, help="where the PNGs go (default: next to the JSON)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(markdown(args.json))
    if args.plot or args.plot_dir is not None:
        for f in plot(args.json, args.plot_dir):
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
