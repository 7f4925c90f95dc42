"""Markdown table of a harness run: python -m benchmarks.report [benchmarks/results/latest.json]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .harness import TABLE_HEADER, Result, format_table


def markdown(path: Path) -> str:
    doc = json.loads(path.read_text())
    results = [Result(**r) for r in doc["results"]]
    roof = doc["roofline"]
    lines = [
        f"Roofline: {roof['best_gbps']:.1f} GB/s ({roof['kernel']}, {roof['threads']} threads); "
        f"allocator: {roof.get('allocator', 'system')}; machine: {doc['machine'].get('processor')}, "
        f"torch {doc['machine'].get('torch')}; command: `{' '.join(doc['command'])}`",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in format_table(results)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json")))
