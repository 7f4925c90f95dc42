"""Command line: ``python -m torch_wsl doctor [--json] [--env] [--probe-gpu] [--gpu-timeout S]``.

``doctor`` prints one line per check (status, what was found, why it matters,
the exact fix); ``--json`` prints the same as JSON (schema:
``torch_wsl.env.REPORT_SCHEMA``); ``--env`` prints the ``export`` lines it
recommends, for ``eval "$(python -m torch_wsl doctor --env)"``. The exit
status is 1 when a check fails, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torch_wsl", description="torch_wsl command line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    doc = sub.add_parser(
        "doctor",
        help="check this machine for WSL/CUDA problems and print the fixes",
        description="Check this machine for WSL/CUDA problems: one line per check with the exact fix. "
        "Exit status 1 when a check fails.",
    )
    out = doc.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON (torch_wsl.env.REPORT_SCHEMA)")
    out.add_argument("--env", action="store_true", help="print the shell export lines the doctor recommends")
    doc.add_argument("--probe-gpu", action="store_true",
                     help="also measure the pinned-memory ceiling and test CUDA virtual memory (uses the GPU)")
    doc.add_argument("--gpu-timeout", type=float, default=None, metavar="S",
                     help="time bound in seconds for each GPU probe (default 60)")
    doc.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fixture tree, for tests
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "doctor":
        parser.print_help(sys.stderr)
        return 2
    from torch_wsl.env import Env, run_doctor
    from torch_wsl.env.gpu import GPU_PROBE_TIMEOUT_S

    report = run_doctor(
        Env(args.root),
        probe_gpu=args.probe_gpu,
        gpu_timeout=args.gpu_timeout if args.gpu_timeout is not None else GPU_PROBE_TIMEOUT_S,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif args.env:
        print(report.format_env())
    else:
        print(report.format_text())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
