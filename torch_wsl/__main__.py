"""Command line: ``python -m torch_wsl doctor [--json] [--env] [--probe-gpu] [--gpu-timeout S]`` and
``python -m torch_wsl launch-cost [--device cuda] [--json]``.

``doctor`` prints one line per check (status, what was found, why it matters,
the exact fix); ``--json`` prints the same as JSON (schema:
``torch_wsl.env.REPORT_SCHEMA``); ``--env`` prints the ``export`` lines it
recommends, for ``eval "$(python -m torch_wsl doctor --env)"``. The exit
status is 1 when a check fails, else 0.

``launch-cost`` measures the cost of one operator launch on this machine
(microseconds; see ``torch_wsl.env.launch_cost``): under WSL2 every CUDA kernel
launch crosses the VM bus, and a training step pays that once per dispatched
operator. Give the figure to ``python -m benchmarks --suite train --launch-us``.
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
    cost = sub.add_parser(
        "launch-cost",
        help="measure the cost of one operator (kernel) launch on this machine, in microseconds",
        description="Measure the cost of one operator launch: torch.add(out=) on 1-element tensors timed over many "
        "calls (CUDA: one kernel launch each, the host's launch rate; CPU: the dispatcher's per-op overhead). "
        "Under WSL2 each CUDA launch crosses the VM bus; pass the printed figure to "
        "`python -m benchmarks --suite train --launch-us US` for the projection of a training step's launch overhead.",
    )
    cost.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    cost.add_argument("--launches", type=int, default=2000, help="launches per timed batch (default 2000)")
    cost.add_argument("--batches", type=int, default=7, help="timed batches; the median is reported (default 7)")
    cost.add_argument("--json", action="store_true", help="print the measurement as JSON")
    return parser


def _launch_cost(args: argparse.Namespace) -> int:
    import torch

    from torch_wsl.env.launch_cost import measure_launch_cost

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        m = measure_launch_cost(device, launches=args.launches, batches=args.batches)
    except (RuntimeError, ValueError) as e:
        print(f"launch-cost: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(f"{m['us_per_launch']:.2f} us per launch on {m['device']} (median of {m['batches']} batches of "
              f"{m['launches']}; best {m['min_us']:.2f} us): {m['op']}")
        if m["device"].startswith("cuda"):
            print(f"project a training step's launch overhead with it: "
                  f"python -m benchmarks --suite train --launch-us {m['us_per_launch']:.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "launch-cost":
        return _launch_cost(args)
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
