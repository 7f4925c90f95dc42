"""Measurement machinery shared by every suite.

For each case and contender the harness reports: median time and spread
(25th-75th percentile), achieved GB/s from the case's minimum memory traffic
(the same byte count for every contender) against a roofline it measures
itself (a STREAM-like triad), operators dispatched per call (the kernel
launches a GPU would see; under WSL2 each one crosses the VM bus), and the
peak memory allocated during one call.

The contenders of a case are timed interleaved, in rounds: every round runs a
short burst of each contender and of the triad, in an order that rotates and
alternates from round to round. The machine's memory bandwidth drifts (the
same triad has measured 37 to 101 GB/s on different runs of one VM), but within
a round every member sees about the same machine, so the ratios are taken per
round and their median reported: each contender's speedup over the case's
baseline contender, and its fraction of the triad measured in the same round.
Dispatched operators and peak memory are measured before the rounds, untimed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: 2: per-round timing (rounds, round_ms), speedup_vs_baseline with its spread, the in-round roofline.
SCHEMA_VERSION = 2

T = TypeVar("T")

#: Default number of interleaved rounds per case (--rounds).
ROUNDS = 10
#: The triad's name among a round's members (no contender may take it).
_TRIAD = "(triad)"
#: A contender whose last warm-up call took at least this long gets no untimed lead calls in
#: its bursts: refilling the caches the previous member evicted is a negligible part of such a call.
LEAD_CALL_MAX_S = 0.02


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


def compiled_kernel_counter() -> tuple[Callable[[], None], Callable[[], Optional[int]]]:
    """(reset, count) of the kernels Inductor generates: the compiled contender's launch count."""
    try:
        from torch._inductor import metrics
    except ImportError:  # pragma: no cover
        return (lambda: None), (lambda: None)
    return metrics.reset, (lambda: metrics.generated_kernel_count)


def compile_contender(call: Callable[[], object], name: str = "compile",
                      extra_launches: Optional[Callable[[], int]] = None) -> Contender:
    """A torch.compile'd contender: its first call (the compilation) records how many kernels
    Inductor generated (``contender.state["kernels"]``), which stand for its launches, plus
    ``extra_launches()`` when given (what the compiled call dispatches outside those kernels)."""
    reset, count = compiled_kernel_counter()
    state: dict = {"kernels": None}

    def first_then_call():
        if state["kernels"] is None:
            reset()
            call()
            state["kernels"] = count()
            return None
        return call()

    def launches():
        if extra_launches is None or state["kernels"] is None:
            return state["kernels"]
        return state["kernels"] + extra_launches()

    contender = Contender(name, first_then_call, launches=launches, dispatch_mode_ok=False)
    contender.state = state
    return contender


def step(train: bool, fn: Callable, inputs: Callable[[], tuple]) -> Callable[[], object]:
    """One timed call of `fn` as a suite's mode asks: the forward under no_grad, or forward and
    backward. `inputs()` gives (args, leaves, grads): fn's arguments, the leaves whose .grad is
    cleared before each call (so no contender pays for accumulation), and the gradients fed to
    fn's outputs (None for a scalar loss). A callable, so a suite may make its tensors lazily."""
    if not train:

        def fwd():
            args, _, _ = inputs()
            with torch.no_grad():
                return fn(*args)

        return fwd

    def fwd_bwd():
        args, leaves, grads = inputs()
        for t in leaves:
            t.grad = None
        out = fn(*args)
        torch.autograd.backward(out if isinstance(out, torch.Tensor) else list(out), grads)

    return fwd_bwd


def operator_contenders(
    train: bool, inputs: Callable[[], tuple], eager: Callable, ours: Callable, with_compile: bool
) -> list[Contender]:
    """An operator suite's contenders, each timed as `step` runs it: plain PyTorch ("eager", the
    models' own code and the baseline), torch.compile of that same function, and torch_wsl."""
    contenders = [Contender("eager", step(train, eager, inputs))]
    if with_compile:
        contenders.append(compile_contender(step(train, torch.compile(eager, fullgraph=True, dynamic=False), inputs)))
    contenders.append(Contender("torch_wsl", step(train, ours, inputs)))
    return contenders


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
    #: Name of the contender every speedup is measured against; None: the first contender.
    #: The suites name plain PyTorch (norm: "eager", optim: "torch foreach").
    baseline: Optional[str] = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.contenders]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.op}: contender names repeat: {names}")
        if self.baseline is None and names:
            self.baseline = names[0]
        if names and self.baseline not in names:
            raise ValueError(f"{self.op}: baseline {self.baseline!r} is not a contender ({', '.join(names)})")


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
    # Interleaved timing (schema 2; the alloc suite's rows and schema-1 files leave these at their defaults).
    #: Interleaved rounds the contender was timed in, and its per-call time in each (median of the round's burst).
    rounds: int = 0
    round_ms: list = field(default_factory=list)
    #: The contender the speedup is against, and the median over rounds of
    #: baseline_ms / this_ms in the same round (> 1: faster than the baseline) with its 25th-75th percentile.
    baseline: Optional[str] = None
    speedup_vs_baseline: Optional[float] = None
    speedup_p25: Optional[float] = None
    speedup_p75: Optional[float] = None
    #: The roofline roofline_fraction is against: the triad measured in this case's rounds
    #: (GB/s of its median call; roofline_fraction is the median over rounds of this round's
    #: GB/s / this round's triad GB/s), or the fixed figure run_case was given.
    roofline_gbps: Optional[float] = None


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


def cpu_true_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of one call above what was allocated before it, every CPU tensor allocation
    counted (operators' scratch and compiled code included, which `peak_memory`'s dispatch mode
    cannot see): torch_wsl.memory's CPU allocator, installed for this call only."""
    import torch_wsl.memory as twm

    twm.enable("cpu")
    try:
        alloc = twm._allocator("cpu")
        base = alloc.stats()["allocated_bytes.all.current"]
        alloc.reset_peak_stats()
        fn()
        return alloc.stats()["allocated_bytes.all.peak"] - base
    finally:
        twm.disable("cpu")


class Triad:
    """STREAM-like triad a = b + s*c over arrays far larger than the caches: the bandwidth roofline.

    Counts 3 arrays of traffic per element (2 reads, 1 write), as STREAM does.
    On CPU there are two variants: torch.add(out=) (plain stores, what most
    kernels get) and torch_wsl's triad with non-temporal stores (the best a
    kernel can get); measure() times both and keeps the faster one, which is
    what a call runs from then on (run_case runs it inside each case's rounds).
    The arrays live as long as the object (3 x `mib` MiB).
    """

    def __init__(self, device: str, mib: int = 256) -> None:
        self.device = device
        self.mib = mib
        n = mib * (1 << 20) // 4
        self._b = torch.rand(n, device=device)
        self._c = torch.rand(n, device=device)
        self._a = torch.empty_like(self._b)
        self.bytes_moved = 3 * n * 4
        a, b, c = self._a, self._b, self._c
        self.variants: dict[str, Callable[[], object]] = {"torch.add(out=)": lambda: torch.add(b, c, alpha=3.0, out=a)}
        if device == "cpu":
            try:
                from torch_wsl import _C

                self.variants["non-temporal stores"] = lambda: _C._stream_triad(
                    a.data_ptr(), b.data_ptr(), c.data_ptr(), 3.0, n, True
                )
            except (ImportError, RuntimeError, AttributeError):
                pass
        self.variant = "torch.add(out=)"

    def __call__(self) -> object:
        return self.variants[self.variant]()

    def measure(self, reps: int = 10, min_seconds: float = 0.5) -> dict:
        measured = {}
        for name, fn in self.variants.items():
            try:
                times = time_calls(fn, self.device, warmup=2, reps=reps, min_seconds=min_seconds)
            except RuntimeError:  # e.g. no AVX2 for the streaming variant
                continue
            measured[name] = {
                "best_gbps": self.bytes_moved / min(times) / 1e9,
                "median_gbps": self.bytes_moved / statistics.median(times) / 1e9,
            }
        self.variant = max(measured, key=lambda k: measured[k]["best_gbps"])
        return {
            "kernel": f"triad a = b + s*c, float32, {self.variant}",
            "array_mib": self.mib,
            "threads": torch.get_num_threads(),
            "best_gbps": measured[self.variant]["best_gbps"],
            "median_gbps": measured[self.variant]["median_gbps"],
            "variants": measured,
        }


def measure_triad(device: str, mib: int = 256, reps: int = 10) -> dict:
    """The triad (see Triad) measured once: its best and median GB/s."""
    return Triad(device, mib).measure(reps)


def round_order(members: Sequence[T], r: int) -> list[T]:
    """The order of round r: the members rotated by r // 2, reversed on odd rounds.

    Over 2 * len(members) rounds every member runs first, and last, equally
    often, and each one runs both right before and right after its neighbours.
    """
    k = (r // 2) % len(members) if members else 0
    order = list(members[k:]) + list(members[:k])
    return order[::-1] if r % 2 else order


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def round_ratios(num_ms: Sequence[float], den_ms: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """(p25, median, p75) over rounds of num_ms[r] / den_ms[r]; None without matching rounds."""
    if not num_ms or len(num_ms) != len(den_ms) or any(d <= 0 for d in den_ms):
        return None
    return _quartiles([n / d for n, d in zip(num_ms, den_ms)])


def _burst(
    fn: Callable[[], object], device: str, calls: int, max_calls: int, seconds: float, lead: int, clock: Callable[[], float]
) -> list[float]:
    """One member's turn in a round: `lead` untimed calls (the caches the previous member
    evicted), then per-call times of at least `calls` calls and `seconds`, at most `max_calls`."""
    for _ in range(lead):
        fn()
    synchronize(device)
    times: list[float] = []
    start = clock()
    while len(times) < calls or (clock() - start) < seconds:
        t0 = clock()
        fn()
        synchronize(device)
        times.append(clock() - t0)
        if len(times) >= max_calls:
            break
    return times


def run_case(
    case: Case,
    roofline: Union[Triad, float, None],
    warmup: int,
    reps: int,
    min_seconds: float,
    rounds: int = ROUNDS,
    round_warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    on_round: Optional[Callable[[int, list[str]], None]] = None,
) -> list[Result]:
    """Time a case's contenders interleaved in `rounds` rounds.

    First, per contender, untimed: one call (compilation, lazy init), the
    operators it dispatches, its peak memory. Then `warmup` calls of every
    contender, then the rounds: each runs every contender, and the triad when
    `roofline` is one (anything with `bytes_moved` that runs on a call), in
    round_order(). A contender's burst is `round_warmup` untimed calls (none if
    its last warm-up call took LEAD_CALL_MAX_S or more), then at
    least reps / rounds calls and min_seconds / rounds seconds (at most
    20 * reps / rounds calls): over all rounds, at least `reps` calls and
    `min_seconds`, as a contender timed alone would get. A number for `roofline`
    is a fixed roofline in GB/s; None, no roofline.

    `clock` gives seconds (tests feed a fake one); `on_round(r, names)` is told
    each round's order before it runs.
    """
    rounds = max(1, rounds)
    calls = max(1, math.ceil(reps / rounds))
    max_calls = max(calls, math.ceil(20 * reps / rounds))
    seconds = min_seconds / rounds
    triad = roofline if (roofline is not None and not isinstance(roofline, (int, float))) else None
    fixed_gbps = float(roofline) if isinstance(roofline, (int, float)) and roofline else None

    if triad is not None and _TRIAD in (c.name for c in case.contenders):
        raise ValueError(f"{case.op}: {_TRIAD!r} is the triad's name in the rounds")
    untimed = {}
    for c in case.contenders:
        c.fn()  # first call: compilation, lazy init
        synchronize(case.device)
        if c.launches is not None:
            ops, names = c.launches(), {}
        else:
            ops, names = count_dispatched_ops(c.fn)
        mem = peak_memory(c.fn, case.device) if (c.dispatch_mode_ok or case.device != "cpu") else None
        untimed[c.name] = (ops, names, mem)

    members: list[tuple[str, Callable[[], object], int]] = []
    for c in case.contenders:
        took = 0.0
        for _ in range(warmup):
            t0 = clock()
            c.fn()
            synchronize(case.device)
            took = clock() - t0
        members.append((c.name, c.fn, round_warmup if took < LEAD_CALL_MAX_S else 0))
    if triad is not None:
        # Its arrays dwarf any cache: no untimed lead calls.
        members.append((_TRIAD, triad, 0))
        triad()
        synchronize(case.device)

    per_round: dict[str, list[list[float]]] = {name: [] for name, _, _ in members}
    for r in range(rounds):
        order = round_order(members, r)
        if on_round is not None:
            on_round(r, [name for name, _, _ in order])
        for name, fn, lead in order:
            per_round[name].append(_burst(fn, case.device, calls, max_calls, seconds, lead, clock))

    def round_ms(name: str) -> list[float]:
        return [statistics.median(t) * 1e3 for t in per_round[name]]

    base_ms = round_ms(case.baseline)
    triad_ms = round_ms(_TRIAD) if triad is not None else []
    triad_gbps = None
    if triad is not None:
        triad_gbps = triad.bytes_moved / statistics.median([x for t in per_round[_TRIAD] for x in t]) / 1e9

    results = []
    for c in case.contenders:
        ops, names, mem = untimed[c.name]
        times = [x for t in per_round[c.name] for x in t]
        p25, med, p75 = _quartiles(times)
        gbps = case.bytes_moved / med / 1e9
        mine = round_ms(c.name)
        sp = round_ratios(base_ms, mine)
        if triad is not None:
            # Per round: (bytes / my time) / (triad bytes / triad time).
            frac = round_ratios([t * case.bytes_moved for t in triad_ms], [m * triad.bytes_moved for m in mine])
            fraction = frac[1] if frac else 0.0
        else:
            fraction = gbps / fixed_gbps if fixed_gbps else 0.0
        extra: dict = {"ops": names} if names else {}
        if triad is not None:
            extra["triad_round_gbps"] = [triad.bytes_moved / t / 1e6 for t in triad_ms]
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
                p25_ms=p25 * 1e3,
                p75_ms=p75 * 1e3,
                gbps=gbps,
                roofline_fraction=fraction,
                dispatched_ops=ops,
                peak_memory_bytes=mem,
                reps=len(times),
                extra=extra,
                rounds=rounds,
                round_ms=mine,
                baseline=case.baseline,
                speedup_vs_baseline=sp[1] if sp else None,
                speedup_p25=sp[0] if sp else None,
                speedup_p75=sp[2] if sp else None,
                roofline_gbps=triad_gbps if triad is not None else fixed_gbps,
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


def write_json(
    path: Path, machine: dict, roofline: dict, results: list[Result], argv: list[str], timing: Optional[dict] = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": argv,
        "machine": machine,
        "roofline": roofline,
        "timing": timing or {},
        "results": [dataclasses.asdict(r) for r in results],
    }
    path.write_text(json.dumps(doc, indent=2))


def result_from_dict(d: dict) -> Result:
    """A Result from its JSON form (any schema version: unknown keys are dropped, missing ones defaulted)."""
    known = {f.name for f in dataclasses.fields(Result)}
    return Result(**{k: v for k, v in d.items() if k in known})


def _speedup_cell(r: Result) -> str:
    if r.speedup_vs_baseline is None:
        return ""
    if r.contender == r.baseline:
        return "baseline"
    return f"{r.speedup_vs_baseline:.2f}x ({r.speedup_p25:.2f}-{r.speedup_p75:.2f})"


def format_table(results: list[Result]) -> list[list[str]]:
    """One row per contender: its speedup over the case's baseline (median over rounds and
    25th-75th percentile) and torch_wsl's speedup over it (median over rounds of the
    per-round ratio; the ratio of the medians for rows without rounds)."""
    rows = []
    by_case: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault((r.suite, r.op, r.mode, r.dtype, tuple(r.shape), r.device), {})[r.contender] = r
    for key, group in by_case.items():
        ours = group.get("torch_wsl")
        for name, r in group.items():
            speedup = ""
            if ours and name != "torch_wsl":
                ratio = round_ratios(r.round_ms, ours.round_ms)
                speedup = f"{ratio[1] if ratio else r.median_ms / ours.median_ms:.2f}x"
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
                    "" if r.roofline_gbps is None else f"{r.roofline_gbps:.1f}",
                    "" if r.dispatched_ops is None else str(r.dispatched_ops),
                    "" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
                    _speedup_cell(r),
                    speedup,
                ]
            )
    return rows


TABLE_HEADER = [
    "op", "mode", "dtype", "shape", "contender", "median ms", "p25-p75 ms", "GB/s", "roofline", "triad GB/s",
    "ops/call", "peak MiB", "vs baseline (p25-p75)", "torch_wsl speedup",
]
