"""The cost of one operator launch on this machine: what every dispatched op of a training step pays.

Under WSL2 each CUDA kernel launch crosses the VM bus to the Windows driver, so
the per-launch cost there is several times a native Linux machine's; a training
step pays it once per dispatched operator. ``python -m torch_wsl launch-cost``
measures it, and ``python -m benchmarks --suite train --launch-us US`` projects
a step's launch overhead (ops per step x US) with the figure a user measured.

What is timed: ``torch.add(a, b, out=c)`` on 1-element tensors, called from
Python in a loop, ``launches`` times per batch, under ``torch.no_grad()``.
On CUDA that is one (nearly empty) kernel launch per call, the device
synchronized before and after each batch, so the figure is the host's launch
rate (a kernel this small finishes faster than the host can queue the next).
On CPU there is no launch: it is the dispatcher's per-operator overhead (Python
binding, dispatch, a 1-element kernel). The reported figure is the median
over batches; ``min_us`` is the best batch.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

__all__ = ["measure_launch_cost"]


def measure_launch_cost(device: str = "cpu", launches: int = 2000, batches: int = 7, warmup: int = 200) -> dict[str, Any]:
    """Microseconds per operator launch on ``device`` ("cpu", "cuda" or "cuda:N").

    Returns ``{"device", "us_per_launch" (median over batches), "min_us", "max_us", "launches",
    "batches", "op"}``. Raises RuntimeError for a CUDA device that is not available.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"measure_launch_cost({device!r}): no CUDA device is visible")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"measure_launch_cost: device must be cpu or cuda, got {device!r}")
    if launches < 1 or batches < 1:
        raise ValueError("measure_launch_cost: launches and batches must be at least 1")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    per_batch: list[float] = []
    with torch.no_grad():
        a = torch.ones(1, device=dev)
        b = torch.ones(1, device=dev)
        c = torch.empty(1, device=dev)
        add = torch.add
        for _ in range(warmup):
            add(a, b, out=c)
        sync()
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(launches):
                add(a, b, out=c)
            sync()
            per_batch.append((time.perf_counter() - t0) / launches * 1e6)
    return {
        "device": str(dev),
        "us_per_launch": statistics.median(per_batch),
        "min_us": min(per_batch),
        "max_us": max(per_batch),
        "launches": launches,
        "batches": batches,
        "op": "torch.add(out=) on 1-element tensors, from Python"
        + (" (one kernel launch each)" if dev.type == "cuda" else " (the dispatcher's per-operator overhead)"),
    }
