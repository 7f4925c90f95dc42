"""Measurement machinery shared by every suite.

For each case and contender the harness reports: median time and spread
(25th-75th percentile), achieved GB/s from the case's minimum memory traffic
(the same byte count for every contender) against a roofline it measures
itself (a STREAM-like triad), operators dispatched per call (the kernel
launches a GPU would see; under WSL2 each one crosses the VM bus), and the
peak memory allocated during one call.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SCHEMA_VERSION = 1


@dataclass
class Contender:
    """One way of running a case. `fn` runs one call; `launches` overrides dispatch counting
    (for compiled code, whose fused kernels the dispatcher does not see)."""

    name: str
    fn: Callable[[], object]
    launches: Optional[Callable[[], int]] = None
    # Peak memory is tracked with a TorchDispatchMode, under which
    # torch.compile will not run compiled code: compiled contenders report
    # no CPU peak (CUDA's allocator statistics work for every contender).
    dispatch_mode_ok: bool = True


@dataclass
class Case:
    suite: str
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    dtype: str
    shape: tuple
    bytes_moved: int  # minimum DRAM traffic of one call, the same for every contender
    contenders: list  # list[Contender]
    device: str = "cpu"


@dataclass
class Result:
    suite: str
    op: str
    mode: str
    dtype: str
    shape: list
    device: str
    contender: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    gbps: float
    roofline_fraction: float
    dispatched_ops: Optional[int]
    peak_memory_bytes: Optional[int]
    reps: int
    extra: dict = field(default_factory=dict)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, warmup: int, reps: int, min_seconds: float) -> list[float]:
    """Per-call wall times in seconds: at least `reps` calls and `min_seconds` in total."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all) < min_seconds:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 20 * reps:
            break
    return times


class _CountOps(TorchDispatchMode):
    """Counts operators that reach a kernel (below autograd, after decomposition into kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Metadata-only ops launch nothing.
        if func not in _NO_LAUNCH:
            self.count += 1
            key = str(func.overloadpacket)
            self.names[key] = self.names.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


_NO_LAUNCH = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.t.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.select.int,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default,
    torch.ops.aten.as_strided.default,
    # torch.optim's step() opens a profiler range: a marker, no kernel.
    torch.ops.profiler._record_function_enter_new.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
}


def count_dispatched_ops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    with _CountOps() as counter:
        fn()
    return counter.count, counter.names


class _TrackMemory(TorchDispatchMode):
    """Live bytes of the storages that operators allocate, and their peak.

    A storage counts from the operator that returned it until its last
    reference dies (checked through weak references at every operator).
    Scratch memory inside one kernel is not seen; the same rule applies to
    every contender.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[object, int]] = {}
        self.current = 0
        self.peak = 0

    def _expire(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        self._expire()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak bytes allocated above the starting point during one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _TrackMemory() as tracker:
        fn()
    return tracker.peak


def measure_triad(device: str, mib: int = 256, reps: int = 10) -> dict:
    """STREAM-like triad a = b + s*c over arrays far larger than the caches: the bandwidth roofline.

    Counts 3 arrays of traffic per element (2 reads, 1 write), as STREAM does.
    On CPU it runs twice: torch.add(out=) (plain stores, what most kernels get)
    and torch_wsl's triad with non-temporal stores (the best a kernel can get);
    the roofline is the faster of the two.
    """
    n = mib * (1 << 20) // 4
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)
    a = torch.empty_like(b)
    bytes_moved = 3 * n * 4
    variants = {"torch.add(out=)": lambda: torch.add(b, c, alpha=3.0, out=a)}
    if device == "cpu":
        try:
            from torch_wsl import _C

            variants["non-temporal stores"] = lambda: _C._stream_triad(
                a.data_ptr(), b.data_ptr(), c.data_ptr(), 3.0, n, True
            )
        except (ImportError, RuntimeError):
            pass
    measured = {}
    for name, fn in variants.items():
        try:
            times = time_calls(fn, device, warmup=2, reps=reps, min_seconds=0.5)
        except RuntimeError:  # e.g. no AVX2 for the streaming variant
            continue
        measured[name] = {
            "best_gbps": bytes_moved / min(times) / 1e9,
            "median_gbps": bytes_moved / statistics.median(times) / 1e9,
        }
    best_name = max(measured, key=lambda k: measured[k]["best_gbps"])
    return {
        "kernel": f"triad a = b + s*c, float32, {best_name}",
        "array_mib": mib,
        "threads": torch.get_num_threads(),
        "best_gbps": measured[best_name]["best_gbps"],
        "median_gbps": measured[best_name]["median_gbps"],
        "variants": measured,
    }


def run_case(case: Case, roofline_gbps: float, warmup: int, reps: int, min_seconds: float) -> list[Result]:
    results = []
    for c in case.contenders:
        c.fn()  # first call: compilation, lazy init
        synchronize(case.device)
        if c.launches is not None:
            ops, names = c.launches(), {}
        else:
            ops, names = count_dispatched_ops(c.fn)
        mem = peak_memory(c.fn, case.device) if (c.dispatch_mode_ok or case.device != "cpu") else None
        times = time_calls(c.fn, case.device, warmup, reps, min_seconds)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        med = statistics.median(times)
        gbps = case.bytes_moved / med / 1e9
        results.append(
            Result(
                suite=case.suite,
                op=case.op,
                mode=case.mode,
                dtype=case.dtype,
                shape=list(case.shape),
                device=case.device,
                contender=c.name,
                median_ms=med * 1e3,
                p25_ms=q[0] * 1e3,
                p75_ms=q[2] * 1e3,
                gbps=gbps,
                roofline_fraction=gbps / roofline_gbps if roofline_gbps else 0.0,
                dispatched_ops=ops,
                peak_memory_bytes=mem,
                reps=len(times),
                extra={"ops": names} if names else {},
            )
        )
    return results


def machine_info(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import torch_wsl

        info["torch_wsl"] = torch_wsl.build_info()
    except ImportError as e:  # the harness still runs the baselines
        info["torch_wsl"] = f"unavailable: {e}"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: Path, machine: dict, roofline: dict, results: list[Result], argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": argv,
        "machine": machine,
        "roofline": roofline,
        "results": [dataclasses.asdict(r) for r in results],
    }
    path.write_text(json.dumps(doc, indent=2))


def format_table(results: list[Result]) -> list[list[str]]:
    """Rows with speedups of torch_wsl over each other contender of the same case."""
    rows = []
    by_case: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault((r.suite, r.op, r.mode, r.dtype, tuple(r.shape), r.device), {})[r.contender] = r
    for key, group in by_case.items():
        ours = group.get("torch_wsl")
        for name, r in group.items():
            speedup = f"{r.median_ms / ours.median_ms:.2f}x" if ours and name != "torch_wsl" else ""
            rows.append(
                [
                    r.op,
                    r.mode,
                    r.dtype,
                    "x".join(map(str, r.shape)),
                    name,
                    f"{r.median_ms:.3f}",
                    f"{r.p25_ms:.3f}-{r.p75_ms:.3f}",
                    f"{r.gbps:.1f}",
                    f"{100 * r.roofline_fraction:.0f}%",
                    "" if r.dispatched_ops is None else str(r.dispatched_ops),
                    "" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
                    speedup,
                ]
            )
    return rows


TABLE_HEADER = [
    "op", "mode", "dtype", "shape", "contender", "median ms", "p25-p75 ms", "GB/s", "roofline",
    "ops/call", "peak MiB", "torch_wsl speedup",
]
