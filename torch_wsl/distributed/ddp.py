"""DDP communication under WSL2: fewer, larger all-reduces, bf16 gradient compression, and a way to count them.

Under WSL2 NCCL has neither peer-to-peer nor its shared-memory transport (see
:func:`torch_wsl.distributed.recommended_env`): every all-reduce stages
through host memory and pays a fixed cost per call plus a cost per byte.
:func:`ddp_options` makes the calls fewer (bigger buckets),
:func:`compress_gradients` halves the bytes (torch's own bf16/fp16 hooks), and
:func:`count_collectives` / :func:`record_collectives` measure both.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..env import Env, recommended_settings
from ..env.settings import ddp_bucket_cap_mb

__all__ = ["CollectiveCounter", "CollectiveCounts", "bf16_hook_supported", "compress_gradients", "compression_hook",
           "count_collectives", "ddp_options", "record_collectives"]

_PLATFORMS = ("linux", "wsl2", "wsl1", "unknown")


def ddp_options(env: Env | None = None, *, platform: str | None = None) -> dict[str, Any]:
    """The DistributedDataParallel keyword arguments torch_wsl recommends: ``DDP(model, **ddp_options())``.

    ``gradient_as_bucket_view=True`` everywhere: gradients live in DDP's
    communication buckets, so there is no copy between them each step and no
    second copy of the gradients in memory (torch's DDP documentation). Under
    WSL2 also ``bucket_cap_mb`` = :data:`torch_wsl.env.settings.DDP_BUCKET_CAP_MB_WSL2`
    (152 MiB instead of 25: fewer all-reduces, each of which stages through
    host memory there; the reason is in ``recommended_settings().reasons``).
    ``platform`` ("linux", "wsl2", ...) asks for another platform's options
    instead of this machine's; ``env`` points the probes at another root.
    """
    if platform is None:
        cap = recommended_settings(env).ddp_bucket_cap_mb
    elif platform in _PLATFORMS:
        cap, _ = ddp_bucket_cap_mb(platform)
    else:
        raise ValueError(f"ddp_options: platform must be one of {', '.join(_PLATFORMS)} or None, got {platform!r}")
    options: dict[str, Any] = {"gradient_as_bucket_view": True}
    if cap is not None:
        options["bucket_cap_mb"] = cap
    return options


def _require_ddp(model: Any, caller: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"{caller}: ddp_model must be a torch.nn.parallel.DistributedDataParallel, "
                        f"got {type(model).__name__}")


def compress_gradients(ddp_model: Any, dtype: torch.dtype = torch.bfloat16, process_group: Any = None) -> Callable:
    """Register torch's gradient-compression hook on ``ddp_model``: all-reduce in ``dtype``, then back.

    ``torch.bfloat16`` uses ``bf16_compress_hook`` (float32's exponent range, 8
    bits of precision; DDP accepts it only where :func:`bf16_hook_supported`: a CUDA build
    of torch with NCCL 2.10+), ``torch.float16`` uses
    ``fp16_compress_hook``; both from
    ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks``. Each bucket is
    cast, divided by the world size, all-reduced (half the bytes of float32)
    and written back into the gradients in their own dtype. DDP accepts one
    communication hook per model: to count what this one sends, call
    ``count_collectives(ddp_model, hook=compression_hook(dtype))`` instead.
    Returns the hook registered.
    """
    _require_ddp(ddp_model, "compress_gradients")
    hook = compression_hook(dtype)
    ddp_model.register_comm_hook(process_group, hook)
    return hook


def bf16_hook_supported() -> bool:
    """Whether torch's DDP accepts ``bf16_compress_hook`` here.

    DistributedDataParallel refuses it (TypeError, in ``_check_comm_hook``)
    unless torch is a CUDA (or ROCm) build with NCCL 2.10+, or has XPU with
    XCCL, whatever the process group's backend; ``fp16_compress_hook`` has no
    such condition. This mirrors that check.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return False
    gpu_build = torch.version.cuda is not None or torch.version.hip is not None
    if gpu_build and dist.is_nccl_available() and torch.cuda.nccl.version() >= (2, 10):
        return True
    xccl = getattr(dist, "is_xccl_available", lambda: False)
    return bool(xccl() and torch.xpu.is_available())


def compression_hook(dtype: torch.dtype) -> Callable:
    """torch's compression hook for ``dtype`` (bf16_compress_hook or fp16_compress_hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {torch.bfloat16: default_hooks.bf16_compress_hook, torch.float16: default_hooks.fp16_compress_hook}
    if dtype not in hooks:
        raise ValueError(f"gradient compression: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return hooks[dtype]


@dataclass(frozen=True)
class CollectiveCounts:
    """Collectives seen since the last :meth:`CollectiveCounter.take`.

    ``all_reduces`` and ``all_reduce_bytes``: the all-reduce calls and the
    bytes of the tensors they reduced, in the dtype actually sent (a bf16
    bucket counts 2 bytes per gradient), on this rank. ``buckets``: the
    communication hook's calls (one per DDP bucket per step; 0 outside DDP).
    ``ops``: every collective by c10d operator name (``allreduce_``,
    ``_allgather_base_``, ``_reduce_scatter_base_``, ``broadcast_``...), with
    ``[calls, bytes]``, bytes being the full (unsharded) tensors each one
    covers. ``dtypes``: the dtypes all-reduced.
    """

    all_reduces: int = 0
    all_reduce_bytes: int = 0
    buckets: int = 0
    ops: dict[str, list[int]] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ()


def _nbytes(arg: Any) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


def _dtypes(arg: Any) -> list[str]:
    if isinstance(arg, torch.Tensor):
        return [str(arg.dtype).replace("torch.", "")]
    if isinstance(arg, (list, tuple)):
        return [d for a in arg for d in _dtypes(a)]
    return []


class CollectiveCounter:
    """Counts the collectives launched through c10d (see :class:`CollectiveCounts`); thread-safe.

    Filled by :func:`count_collectives` (inside a DDP communication hook) or by
    :func:`record_collectives` (around any code). :meth:`take` returns what was
    counted since the previous call and starts again: call it once per step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._buckets = 0
        self._ops: dict[str, list[int]] = {}
        self._dtypes: dict[str, None] = {}

    def _record(self, op: str, tensors: Any) -> None:
        with self._lock:
            calls_bytes = self._ops.setdefault(op, [0, 0])
            calls_bytes[0] += 1
            calls_bytes[1] += _nbytes(tensors)
            if _is_all_reduce(op):
                self._dtypes.update(dict.fromkeys(_dtypes(tensors)))

    def _bucket(self) -> None:
        with self._lock:
            self._buckets += 1

    def _snapshot(self) -> CollectiveCounts:
        ops = {k: list(v) for k, v in self._ops.items()}
        reduces = [v for k, v in ops.items() if _is_all_reduce(k)]
        return CollectiveCounts(sum(v[0] for v in reduces), sum(v[1] for v in reduces), self._buckets, ops,
                                tuple(self._dtypes))

    def peek(self) -> CollectiveCounts:
        """What was counted since the last :meth:`take`, without resetting."""
        with self._lock:
            return self._snapshot()

    def take(self) -> CollectiveCounts:
        """What was counted since the last call (one step, if called once per step), and reset."""
        with self._lock:
            counts = self._snapshot()
            self._reset()
        return counts


#: c10d's ProcessGroup operators (dist.all_reduce, DDP, FSDP2) and the functional collectives (torch.compile, DTensor).
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")


def _is_all_reduce(op: str) -> bool:
    return op.replace("_", "").startswith("allreduce")


class _RecordCollectives(TorchDispatchMode):
    """Records every c10d collective dispatched while active (the tensors passed: their bytes and dtypes)."""

    def __init__(self, counter: CollectiveCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace in _COLLECTIVE_NAMESPACES and name != "wait_tensor" and args:
            # c10d's schemas put the output (or in-place) tensors first and, for gathers and
            # scatters, the inputs second: the larger of the two is the full tensor covered.
            tensors = max(args[:2], key=_nbytes) if len(args) > 1 else args[0]
            self.counter._record(name, tensors)
        return func(*args, **(kwargs or {}))


class record_collectives:
    """``with record_collectives() as counter: step()`` counts the collectives launched on this thread.

    For code without a DDP hook (FSDP2's all-gathers and reduce-scatters,
    explicit ``dist.all_reduce`` calls). Collectives launched inside a tensor
    subclass's own dispatch (DTensor's redistributions) are not seen. Adds a
    Python call per operator: count in an untimed step.
    """

    def __init__(self, counter: CollectiveCounter | None = None) -> None:
        self.counter = counter or CollectiveCounter()
        self._mode = _RecordCollectives(self.counter)

    def __enter__(self) -> CollectiveCounter:
        self._mode.__enter__()
        return self.counter

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def count_collectives(ddp_model: Any, hook: Callable | None = None, state: Any = None) -> CollectiveCounter:
    """Register ``hook`` (default: torch's ``allreduce_hook``, what DDP does without one) wrapped in a counter.

    Every bucket DDP hands the hook is counted, and so is every collective the
    hook launches, with the bytes of the tensors it passes (so bf16
    compression shows half the bytes of float32). ``state`` is the hook's
    state (for torch's hooks the process group; None: the default group).
    DDP accepts one communication hook per model, so this replaces
    :func:`compress_gradients`: pass ``hook=compression_hook(torch.bfloat16)``.
    Returns the counter; call its ``take()`` after each step.
    """
    _require_ddp(ddp_model, "count_collectives")
    if hook is None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.allreduce_hook
    if not callable(hook):
        raise TypeError(f"count_collectives: hook must be a callable (state, bucket) -> Future, got {hook!r}")
    counter = CollectiveCounter()
    inner = hook

    # The wrapper keeps the hook's name: DDP checks some hooks by name (bf16 needs NCCL 2.10+).
    @functools.wraps(inner)
    def counted(hook_state, bucket):
        counter._bucket()
        with _RecordCollectives(counter):
            return inner(hook_state, bucket)

    ddp_model.register_comm_hook(state, counted)
    return counter
