"""torch_wsl's caching allocator: CUDA device memory, pinned host memory and CPU tensors.

Under WSL2 every allocation and free crosses the VM bus to the Windows
driver, ``cudaFree`` synchronizes, pinned memory has a low ceiling and
oversized allocations silently spill into system memory. This allocator
keeps driver calls out of a training loop's steady state (memory stays
cached; it goes back only on :func:`empty_cache` or under pressure), caps
reserved memory with a budget so a job fails fast with an out-of-memory
error carrying the statistics, and falls back from pinned to pageable
memory with one warning instead of crashing.

Typical use::

    import torch_wsl.memory as twm
    twm.enable("cuda")                  # first thing, before CUDA is used
    twm.enable("pinned")                # DataLoader(pin_memory=True) now pins from the pool
    twm.enable("cpu")                   # CPU tensors from the caching allocator
    print(twm.memory_summary("cuda"))

Policy (keyword arguments, or ``TORCH_WSL_ALLOC_CONF``; see
:mod:`torch_wsl.memory._conf`): ``budget`` (bytes, ``"8G"``, or a fraction
of free memory at start such as ``0.9``/``"90%"``), ``min_block_size``,
``small_size``, ``small_segment_size``, ``large_segment_size``,
``min_large_alloc``, ``large_round``, ``roundup_power2_divisions``,
``max_split_size``, ``large_split_min``, ``trace_capacity``; for ``cpu`` also
``alignment`` and ``huge_pages``. Defaults for ``cuda`` and ``pinned`` budgets
come from :func:`torch_wsl.env.recommended_settings`.
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .. import _C
from ._conf import ALLOC_CONF_ENV, parse_alloc_conf, parse_size, resolve_policy

__all__ = [
    "ALLOC_CONF_ENV",
    "CachingAllocator",
    "HostBackend",
    "NoCachingAllocator",
    "PinnedPool",
    "SimulatedBackend",
    "Trace",
    "disable",
    "empty_cache",
    "enable",
    "is_enabled",
    "measure_driver_cost",
    "memory_snapshot",
    "memory_summary",
    "parse_alloc_conf",
    "pin",
    "pinned_empty",
    "record_trace",
    "replay",
    "set_budget",
    "stats",
]

_A = _C._alloc
HAS_CUDA_ALLOCATOR: bool = bool(_A.has_cuda)

#: A simulated paravirtualized device: ``SimulatedBackend(capacity=16 << 30,
#: malloc_cost_us=0.0, free_cost_us=0.0, alignment=512)``. Each backend call
#: busy-waits ``malloc_cost_us`` / ``free_cost_us`` (measure yours with
#: :func:`measure_driver_cost`); ``fail_nth_alloc(n)`` makes the nth next
#: allocate fail; ``submit_work(stream)`` / ``complete_work(stream)`` drive
#: its events; ``counters()`` counts calls. Addresses are fake: never dereference them.
SimulatedBackend = _A.SimulatedBackend

#: CPU memory: ``HostBackend(alignment=64, huge_pages=False)``; with
#: ``huge_pages`` regions of 2 MiB or more are mmap'ed, 2 MiB-aligned, with MADV_HUGEPAGE.
HostBackend = _A.HostBackend

_Backend = _A.Backend


def _make_backend(backend: Union[str, Any]) -> Any:
    if isinstance(backend, _Backend):
        return backend
    if backend == "simulated":
        return SimulatedBackend()
    if backend == "host":
        return HostBackend()
    if backend in ("cuda_pinned", "pinned"):
        _require_cuda_build("the cuda_pinned backend")
        from ..env import recommended_settings

        return _A.PinnedHostBackend(recommended_settings().pinned_budget_bytes)
    raise ValueError(f"backend must be 'simulated', 'host', 'cuda_pinned' or a backend object, not {backend!r}")


def _require_cuda_build(what: str) -> None:
    if not HAS_CUDA_ALLOCATOR:
        raise RuntimeError(f"{what}: this build of torch_wsl has no CUDA backends (built without CUDA)")


class CachingAllocator:
    """A standalone caching allocator, for tests and benchmarks.

    ``backend``: ``"simulated"`` (default), ``"host"``, ``"cuda_pinned"``
    (pinned memory only: past its budget it raises ``torch.OutOfMemoryError``;
    :class:`PinnedPool` adds the pageable fallback), or a backend object
    (:data:`SimulatedBackend`, :data:`HostBackend`, ``PinnedHostBackend``).
    ``policy``: the fields listed in the module doc (``budget`` included).
    Pointers are ints.
    """

    def __init__(self, backend: Union[str, Any] = "simulated", **policy: Any) -> None:
        core, _ = resolve_policy("standalone", policy)
        self.backend = _make_backend(backend)
        self._impl = _A.CachingAllocator(self.backend, core)
        self._pinned = HAS_CUDA_ALLOCATOR and isinstance(self.backend, _A.PinnedHostBackend)

    def malloc(self, nbytes: int, stream: int = 0) -> int:
        """Allocate ``nbytes`` on ``stream`` (a cudaStream_t value; 0 is the default stream)."""
        if self._pinned and stream == 0:
            stream = _A.HOST_STREAM
        return self._impl.malloc(nbytes, stream)

    def free(self, ptr: int) -> None:
        self._impl.free(ptr)

    def record_stream(self, ptr: int, stream: int, device: int = -1) -> None:
        """The block is also used on ``stream`` (of ``device``; -1: the backend's own): after free() it is
        reused only once that stream's work is done."""
        self._impl.record_stream(ptr, stream, device)

    def stats(self) -> dict[str, int]:
        """Statistics with the keys of ``torch.cuda.memory_stats()`` plus ``num_device_alloc``/``num_device_free``."""
        return self._impl.stats()

    def snapshot(self) -> list[dict]:
        """Segments (address order) with their blocks, like ``torch.cuda.memory_snapshot()``."""
        return self._impl.snapshot()

    def trace(self) -> list[dict]:
        """The newest ``trace_capacity`` allocator events (alloc, free, segment alloc/free, oom)."""
        return self._impl.trace()

    def empty_cache(self) -> None:
        """Return every fully free cached segment to the backend."""
        self._impl.empty_cache()

    def set_budget(self, bytes: Optional[int] = None, fraction: Optional[float] = None) -> int:  # noqa: A002
        """Cap reserved bytes (the smaller of the two; None/0 drops a cap). Returns the budget in bytes (0: none)."""
        return self._impl.set_budget(bytes, fraction)

    @property
    def budget(self) -> int:
        return self._impl.budget

    @property
    def policy(self) -> dict[str, Any]:
        return self._impl.policy

    def set_memory_fraction(self, fraction: float) -> int:
        """Cap reserved bytes at ``fraction`` of the backend's total memory (as
        ``torch.cuda.set_per_process_memory_fraction`` does), alongside the budget. Returns the budget."""
        return self._impl.set_memory_fraction(fraction)

    def reset_peak_stats(self) -> None:
        self._impl.reset_peak_stats()


class PinnedPool:
    """Pinned host memory with a pageable fallback kept apart (what ``enable("pinned")`` installs).

    Requests come from a pool of ``cudaHostAlloc`` segments while they fit
    ``budget`` bytes and the driver agrees; otherwise from a separate pool of
    pageable memory, with one ``RuntimeWarning``. A pageable block returns to
    its own pool, so it is never handed out as pinned later. Needs a build
    with CUDA; the pageable fallback works without a GPU.
    """

    def __init__(self, budget: Union[int, str], **policy: Any) -> None:
        _require_cuda_build("PinnedPool")
        core, _ = resolve_policy("standalone", policy)
        self._impl = _A.PinnedPool(core, parse_size(budget))

    def malloc(self, nbytes: int) -> int:
        ptr = self._impl.malloc(nbytes)
        message = self._impl.take_warning()
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return ptr

    def free(self, ptr: int) -> None:
        self._impl.free(ptr)

    def empty_cache(self) -> None:
        self._impl.empty_cache()

    def stats(self) -> dict[str, int]:
        """The pinned pool's statistics plus ``pageable_fallback.*`` (the fallback pool's current counts)."""
        return _pinned_stats(self._impl)

    def counters(self) -> dict[str, int]:
        """The pinned backend's counters: pinned segments and bytes, budget and driver refusals."""
        return self._impl.backend.counters()


def _pinned_stats(pool: Any) -> dict[str, int]:
    s = dict(pool.pinned.stats())
    fallback = pool.pageable.stats()
    for key in ("allocation", "reserved_bytes", "allocated_bytes", "segment"):
        s[f"pageable_fallback.{key}"] = fallback[f"{key}.all.current"]
    return s


class NoCachingAllocator:
    """The baseline: every malloc and free goes to the backend (no caching)."""

    def __init__(self, backend: Union[str, Any] = "simulated", min_block_size: int = 512) -> None:
        self.backend = _make_backend(backend)
        self._impl = _A.NoCachingAllocator(self.backend, min_block_size)

    def malloc(self, nbytes: int, stream: int = 0) -> int:
        return self._impl.malloc(nbytes, stream)

    def free(self, ptr: int) -> None:
        self._impl.free(ptr)

    def stats(self) -> dict[str, int]:
        return self._impl.stats()


# ---------------------------------------------------------------- process-wide allocators

_ALREADY_INITIALIZED = (
    "torch_wsl.memory.enable('cuda') must run before CUDA is initialized, but CUDA is already initialized in "
    "this process{held}. PyTorch cannot swap its CUDA allocator once it has been initialized. Call "
    "torch_wsl.memory.enable('cuda') first thing in your script (right after importing torch_wsl), before "
    "any tensor is moved to the GPU and before torch.cuda calls that start CUDA; policy can also come from "
    "the TORCH_WSL_ALLOC_CONF environment variable."
)

_enabled: dict[str, bool] = {"cpu": False, "cuda": False, "pinned": False}


def _device_kind(device: Union[str, torch.device, None]) -> tuple[str, int]:
    if device is None:
        return "cuda", 0
    d = str(device)
    if d in ("cpu", "pinned"):
        return d, 0
    if d == "cuda" or d.startswith("cuda:"):
        index = int(d.split(":", 1)[1]) if ":" in d else (torch.cuda.current_device() if _enabled["cuda"] and torch.cuda.is_initialized() else 0)
        return "cuda", index
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'pinned', not {device!r}")


def enable(device: str = "cuda", **policy: Any) -> None:
    """Install torch_wsl's caching allocator for ``device``.

    * ``"cuda"``: all CUDA tensors, through ``torch.cuda.memory.CUDAPluggableAllocator``.
      Must run before CUDA is initialized (else RuntimeError saying so). The
      budget defaults to ``recommended_settings().vram_budget_fraction`` of the
      free memory each device reports when first used. CUDA virtual memory
      (``expandable_segments``) is never used: it fails on some WSL drivers.
      ``torch.cuda.memory_stats()`` and friends, cuDNN's benchmark mode,
      ``set_per_process_memory_fraction`` and CUDA graph capture work
      unchanged; ``torch._inductor.config.triton.cudagraph_trees`` is set to
      False, because CUDA graph trees need the native allocator's internal
      state: ``torch.compile(mode="reduce-overhead")`` then captures one plain
      CUDA graph per compiled graph.
    * ``"pinned"``: PyTorch's CUDA host allocator, so ``tensor.pin_memory()``,
      ``torch.empty(..., pin_memory=True)`` and ``DataLoader(pin_memory=True)``
      pin from the pool; ``budget`` (default ``recommended_settings().pinned_budget_bytes``)
      is where it switches to pageable memory, with one warning; so does a
      driver refusal. ``probe_ceiling`` (default: on WSL2 with a GPU and no
      explicit budget) first measures the pinned ceiling in a subprocess
      (:func:`torch_wsl.env.probe_pinned_ceiling`, a few seconds) and budgets
      75% of it.
    * ``"cpu"``: CPU tensors (``c10::SetCPUAllocator``). Tensors allocated
      before keep being freed by the allocator that made them.

    Policy comes from keyword arguments over ``TORCH_WSL_ALLOC_CONF`` over the defaults.
    """
    kind, _ = _device_kind(device)
    if kind == "cpu":
        core, extras = resolve_policy("cpu", policy)
        _A.cpu_enable(core, int(extras.get("alignment", 64)), bool(extras.get("huge_pages", False)))
        _enabled["cpu"] = True
        return
    if not HAS_CUDA_ALLOCATOR:
        raise RuntimeError(f"enable({device!r}): this build of torch_wsl has no CUDA backends (built without CUDA)")
    from ..env import recommended_settings

    settings = recommended_settings()
    if kind == "pinned":
        if _A.pinned_pool_if_created() is not None and _enabled["pinned"]:
            return
        probe = policy.pop("probe_ceiling", None)
        if probe is None:  # WSL2's ceiling is low and driver-dependent: measure it there
            probe = settings.platform == "wsl2" and torch.cuda.is_available() and "budget" not in policy
        if probe:
            from ..env import probe_pinned_ceiling

            settings = recommended_settings(pinned=probe_pinned_ceiling())
        core, extras = resolve_policy("pinned", policy, defaults={"budget": settings.pinned_budget_bytes})
        extras.pop("probe_ceiling", None)
        _A.pinned_pool(core, extras["pinned_budget_bytes"])
        _A.pinned_install()
        _enabled["pinned"] = True
        return
    core, extras = resolve_policy("cuda", policy, defaults={"budget": settings.vram_budget_fraction})
    if extras.get("expandable_segments"):
        raise ValueError(
            "expandable_segments (CUDA virtual memory) is not implemented by torch_wsl's allocator: it fails on "
            "some WSL drivers (pytorch/pytorch#192330); cached plain segments already keep driver calls out of "
            "the steady state"
        )
    if _enabled["cuda"]:
        _A.cuda_set_device_policy(core)  # applies to devices first used from now on
        return
    if torch.cuda.is_initialized():
        held = ""
        with contextlib.suppress(Exception):
            held = f", and PyTorch's allocator holds {torch.cuda.memory_reserved()} bytes"
        raise RuntimeError(_ALREADY_INITIALIZED.format(held=held))
    _A.cuda_set_device_policy(core)
    # A subclass of torch's CUDAPluggableAllocator (csrc/cuda/alloc_cuda.cpp): it also answers
    # torch.cuda.memory_stats() & co., cuDNN's cacheInfo, and CUDA graph capture's private pools.
    _A.cuda_install()
    _enabled["cuda"] = True
    _plain_cudagraphs_for_inductor()


def _plain_cudagraphs_for_inductor() -> None:
    # torch.compile(mode="reduce-overhead") uses "CUDA graph trees" by default,
    # which checkpoint the native allocator's internal pool state: no
    # pluggable allocator can answer that. Its plain CUDA-graph mode uses
    # torch.cuda.graph, which torch_wsl's private pools serve.
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # noqa: BLE001 - no inductor in this torch: nothing to adjust
        return
    # Documented in enable(); no warning, so that every run of a script is not told again.
    inductor_config.triton.cudagraph_trees = False


def disable(device: str = "cpu") -> bool:
    """Put back the CPU allocator that was there before :func:`enable` ("cpu" only: PyTorch cannot swap
    its CUDA allocators back once used). Cached memory is returned; live tensors stay valid. Returns
    whether it was enabled."""
    if str(device) != "cpu":
        raise ValueError("only the CPU allocator can be disabled; CUDA allocators stay for the process")
    _enabled["cpu"] = False
    return bool(_A.cpu_disable())


def is_enabled(device: str = "cuda") -> bool:
    kind, _ = _device_kind(device)
    return _enabled[kind]


def _allocator(device: Union[str, torch.device, None]) -> Any:
    kind, index = _device_kind(device)
    if kind == "cpu":
        a = _A.cpu_current()
    elif not HAS_CUDA_ALLOCATOR:
        a = None
    elif kind == "pinned":
        pool = _A.pinned_pool_if_created()
        a = pool.pinned if pool is not None else None
    else:
        a = _A.cuda_device_allocator(index, False) if _enabled["cuda"] else None
    if a is None:
        raise RuntimeError(
            f"torch_wsl's allocator is not in use for {device!r}: call torch_wsl.memory.enable({kind!r}) first"
            + (" (and allocate on that device)" if kind == "cuda" and _enabled["cuda"] else "")
        )
    return a


def stats(device: Union[str, torch.device, None] = "cuda") -> dict[str, int]:
    """Statistics of the process-wide allocator for ``device`` ("cpu", "cuda", "cuda:N", "pinned"),
    with the keys of ``torch.cuda.memory_stats()`` plus ``num_device_alloc`` / ``num_device_free``
    (backend calls) and ``budget_bytes``."""
    kind, _ = _device_kind(device)
    if kind == "pinned":
        _allocator(device)  # the error if not enabled
        return _pinned_stats(_A.pinned_pool_if_created())
    s = dict(_allocator(device).stats())
    if kind == "cuda":
        s["num_deleter_errors"] = int(_A.cuda_deleter_errors())
    return s


def memory_snapshot(device: Union[str, torch.device, None] = "cuda") -> list[dict]:
    """Segments and their blocks (address, size, requested_size, state)."""
    return _allocator(device).snapshot()


def empty_cache(device: Union[str, torch.device, None] = "cuda") -> None:
    """Return every fully free cached segment of ``device``'s allocator to the backend."""
    kind, _ = _device_kind(device)
    if kind == "pinned":
        _allocator(device)
        _A.pinned_pool_if_created().empty_cache()
        return
    _allocator(device).empty_cache()


def set_budget(device: Union[str, torch.device, None] = "cuda", bytes: Optional[Union[int, str]] = None,  # noqa: A002
               fraction: Optional[float] = None) -> int:
    """Cap ``device``'s reserved memory at ``bytes`` and/or ``fraction`` of its free memory now (the
    smaller wins; neither removes the cap). Returns the budget in bytes."""
    return _allocator(device).set_budget(None if bytes is None else parse_size(bytes), fraction)


def memory_summary(device: Union[str, torch.device, None] = "cuda") -> str:
    """A human-readable table of :func:`stats`."""
    return format_summary(stats(device), title=f"torch_wsl allocator: {device}")


def format_summary(s: dict[str, int], title: str = "torch_wsl allocator") -> str:
    def size(n: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or unit == "TiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
            n /= 1024
        return str(n)

    rows = [("Allocated memory", "allocated_bytes", size), ("Requested memory", "requested_bytes", size),
            ("Active memory", "active_bytes", size), ("Reserved memory", "reserved_bytes", size),
            ("Inactive split memory", "inactive_split_bytes", size), ("Allocations", "allocation", str),
            ("Active allocations", "active", str), ("Segments", "segment", str),
            ("Inactive split blocks", "inactive_split", str)]
    lines = [title, f"{'':24}{'current':>14}{'peak':>14}{'allocated':>14}{'freed':>14}"]
    for label, key, fmt in rows:
        for pool, name in (("all", label), ("small_pool", "  small pool"), ("large_pool", "  large pool")):
            vals = [s.get(f"{key}.{pool}.{m}", 0) for m in ("current", "peak", "allocated", "freed")]
            lines.append(f"{name:24}" + "".join(f"{fmt(v):>14}" for v in vals))
    budget = s.get("budget_bytes", 0)
    lines.append(
        f"backend calls: {s.get('num_device_alloc', 0)} allocs ({s.get('num_device_alloc_failed', 0)} refused), "
        f"{s.get('num_device_free', 0)} frees; retries after releasing the cache: {s.get('num_alloc_retries', 0)}; "
        f"out-of-memory errors: {s.get('num_ooms', 0)}; budget: {size(budget) if budget else 'none'}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- pinned memory

_warned_no_cuda = False


def pinned_empty(*size: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized tensor in pinned host memory from torch_wsl's pinned pool.

    Without a CUDA device (or past the pinned budget) it is pageable memory
    instead, with one warning: copies from it are correct, only synchronous.
    """
    global _warned_no_cuda
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    if not (HAS_CUDA_ALLOCATOR and torch.cuda.is_available()):
        if not _warned_no_cuda:
            _warned_no_cuda = True
            warnings.warn("torch_wsl.memory.pinned_empty: no CUDA device, returning pageable memory",
                          RuntimeWarning, stacklevel=2)
        return torch.empty(shape, dtype=dtype)
    if not _enabled["pinned"]:
        enable("pinned")
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def pin(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of CPU ``tensor`` in the pinned pool (see :func:`pinned_empty`)."""
    out = pinned_empty(tensor.shape, dtype=tensor.dtype)
    out.copy_(tensor)
    return out


def measure_driver_cost(device: int = 0, nbytes: int = 2 << 20, reps: int = 50) -> dict[str, float]:
    """Median microseconds of one ``cudaMalloc`` and one ``cudaFree`` of ``nbytes`` on this machine:
    the values to give :data:`SimulatedBackend` (``malloc_cost_us``, ``free_cost_us``). Needs a GPU."""
    if not (HAS_CUDA_ALLOCATOR and torch.cuda.is_available()):
        raise RuntimeError("measure_driver_cost needs a CUDA device and a torch_wsl build with CUDA")
    return _A.cuda_measure_driver_cost(device, int(nbytes), int(reps))


# ---------------------------------------------------------------- traces

class Trace:
    """The allocations and frees of CPU tensors recorded by :func:`record_trace`, with step marks."""

    def __init__(self, impl: Any = None) -> None:
        self._impl = impl if impl is not None else _A.AllocTrace()

    def step(self) -> None:
        """Mark the end of a training step (replay reports per step)."""
        self._impl.mark_step()

    def __len__(self) -> int:
        return len(self._impl)

    @property
    def num_steps(self) -> int:
        return self._impl.num_steps

    def events(self) -> list[tuple[str, int, int]]:
        """``("alloc", id, nbytes)``, ``("free", id, 0)`` and ``("step", 0, 0)`` in order."""
        return self._impl.events()

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_bytes(self._impl.to_bytes())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Trace":
        return cls(_A.AllocTrace.from_bytes(Path(path).read_bytes()))

    @classmethod
    def from_events(cls, events: list[tuple[str, int, int]]) -> "Trace":
        """A synthetic trace: ``("alloc", id, nbytes)`` (ids must be new and increasing), ``("free", id, 0)``, ``("step", 0, 0)``."""
        t = _A.AllocTrace()
        ids: dict[int, int] = {}
        for op, ident, n in events:
            if op == "alloc":
                ids[ident] = t.record_alloc(n)
            elif op == "free":
                t.record_free(ids[ident])
            elif op == "step":
                t.mark_step()
            else:
                raise ValueError(f"unknown trace event {op!r}")
        t.stop()
        return cls(t)


@contextlib.contextmanager
def record_trace() -> Iterator[Trace]:
    """Record the allocation and free events of CPU tensors inside the block::

        with torch_wsl.memory.record_trace() as trace:
            for _ in range(3):
                train_step()
                trace.step()
        torch_wsl.memory.replay(trace, torch_wsl.memory.CachingAllocator("simulated"))
    """
    impl = _A.cpu_trace_start()
    try:
        yield Trace(impl)
    finally:
        _A.cpu_trace_stop(impl)


def replay(trace: Trace, allocator: Union[CachingAllocator, NoCachingAllocator], passes: int = 1,
           warmup_steps: int = 2) -> dict[str, Any]:
    """Replay ``trace`` through ``allocator`` in C++, ``passes`` times in a row (the allocator stays warm).

    Returns the raw per-step rows (``steps``: pass, step, mallocs, frees,
    device_allocs, device_frees, ns), ``peak_requested`` and
    ``peak_reserved``, and derived figures: ``backend_calls_per_steady_step``
    (first pass, complete steps after the first ``warmup_steps``: a training
    loop reaches its steady peak in its second step, once the optimizer's
    state exists), ``fragmentation`` (peak reserved / peak requested) and
    ``ns_per_malloc_free`` (median over warm steps of host nanoseconds per
    malloc+free pair; warm = later passes, or steps after the warm-up when passes == 1).
    """
    n_steps = trace.num_steps
    if n_steps <= warmup_steps:
        raise ValueError(f"the trace has {n_steps} steps; steady-state figures need more than warmup_steps={warmup_steps}")
    r = dict(_A.replay(trace._impl, allocator._impl, passes))
    steady = [s for s in r["steps"] if s["pass"] == 0 and warmup_steps <= s["step"] < n_steps]
    r["backend_calls_per_steady_step"] = (
        sum(s["device_allocs"] + s["device_frees"] for s in steady) / len(steady) if steady else float("nan")
    )
    warm = [s for s in r["steps"]
            if (s["pass"] >= 1 if passes > 1 else s["step"] >= warmup_steps) and s["mallocs"] + s["frees"]]
    r["ns_per_malloc_free"] = (
        statistics.median(2 * s["ns"] / (s["mallocs"] + s["frees"]) for s in warm) if warm else float("nan")
    )
    r["fragmentation"] = r["peak_reserved"] / r["peak_requested"] if r["peak_requested"] else float("nan")
    return r
