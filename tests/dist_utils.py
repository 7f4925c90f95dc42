"""Run a test body in N real torch.distributed processes (spawned, gloo on the CPU by default).

    from dist_utils import run_workers

    def _body(rank, world_size, steps):      # module level: spawned workers import it
        ...
        return something_picklable

    def test_x():
        results = run_workers(_body, world_size=2, steps=3)   # one result per rank

Each worker joins a process group through a file store in a fresh temporary
directory and runs the body with one intra-op thread (two ranks share this
2-core machine); torch_wsl.distributed._spawn.run_ranks spawns them and
collects the results. A worker that fails fails the test with every rank's
traceback; a run past ``timeout_s`` is killed and fails the test, so a hung
collective never hangs the suite.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from conftest import HAS_CUDA_KERNELS
from torch_wsl.distributed._spawn import run_ranks

#: Seconds a whole multi-process run may take (imports included) before it is killed.
DEFAULT_TIMEOUT_S = 240

NCCL_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

#: NCCL runs one rank per GPU, on up to 2 GPUs. With one GPU (the device machine) it still runs, as a
#: single rank: the CUDA kernels on DTensor shards and NCCL's collectives run, the cross-rank checks are trivial.
NCCL_WORLD = min(2, NCCL_GPUS)

nccl_only = pytest.mark.skipif(
    not (NCCL_GPUS >= 1 and HAS_CUDA_KERNELS and dist.is_available() and dist.is_nccl_available()),
    reason="needs a CUDA GPU with NCCL and a build with CUDA kernels",
)

#: Parametrize a test over the backends: gloo on the CPU always, NCCL on the GPUs where present.
BACKENDS = [
    pytest.param("gloo", id="gloo"),
    pytest.param("nccl", id="nccl", marks=[pytest.mark.cuda, nccl_only]),
]


def device_for(backend: str, rank: int) -> torch.device:
    """The device a rank trains on with this backend."""
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _test_rank(rank: int, world_size: int, store_path: str, backend: str, body: Callable, kwargs: dict,
               init_group: bool) -> Any:
    import torch_wsl  # noqa: F401  (registers the operators in the spawned interpreter)

    if backend == "nccl":
        torch.cuda.set_device(rank)
    if not init_group:
        return body(rank, world_size, init_method=f"file://{store_path}", **kwargs)
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        return body(rank, world_size, **kwargs)
    finally:
        dist.destroy_process_group()


def world_size_for(backend: str) -> int:
    """The ranks a test runs with this backend: 2 with gloo, one per GPU (up to 2) with NCCL."""
    return NCCL_WORLD if backend == "nccl" else 2


def run_workers(body: Callable, world_size: int | None = None, *, backend: str = "gloo",
                timeout_s: float = DEFAULT_TIMEOUT_S, init_group: bool = True, **kwargs) -> list:
    """Run ``body(rank, world_size, **kwargs)`` in ``world_size`` processes; return the results by rank.

    ``world_size`` defaults to :func:`world_size_for` the backend (so an NCCL test on one GPU runs one rank).

    With ``init_group=False`` the body joins (and leaves) the process group itself:
    it is called as ``body(rank, world_size, init_method=..., **kwargs)``.
    """
    if world_size is None:
        world_size = world_size_for(backend)
    try:
        return run_ranks(_test_rank, world_size, timeout_s=timeout_s, args=(backend, body, kwargs, init_group))
    except RuntimeError as e:  # a failed test, with every rank's traceback
        raise AssertionError(str(e)) from None
