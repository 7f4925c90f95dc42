"""Markdown table of a harness run: python -m benchmarks.report [benchmarks/results/latest.json]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json")))
