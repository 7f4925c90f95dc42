"""Run a test body in N real torch.distributed processes (spawned, gloo on the CPU by default).

    from dist_utils import run_workers

    def _body(rank, world_size, steps):      # module level: spawned workers import it
        ...
        return something_picklable

    def test_x():
        results = run_workers(_body, world_size=2, steps=3)   # one result per rank

Each worker joins a process group through a file store in a fresh temporary
directory, runs the body with one intra-op thread (two ranks share this 2-core
machine), and sends back the body's return value or its traceback. A worker
that fails fails the test with that traceback; a run past ``timeout_s`` is
killed and fails the test, so a hung collective never hangs the suite.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import HAS_CUDA_KERNELS

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


def _worker(rank: int, world_size: int, backend: str, store_path: str, body: Callable, kwargs: dict,
            results: Any, init_group: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        import torch_wsl  # noqa: F401  (registers the operators in the spawned interpreter)

        if backend == "nccl":
            torch.cuda.set_device(rank)
        if not init_group:
            out = body(rank, world_size, init_method=f"file://{store_path}", **kwargs)
        else:
            dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size)
            try:
                out = body(rank, world_size, **kwargs)
            finally:
                dist.destroy_process_group()
        # Plain pickle bytes: torch.multiprocessing would share tensors through file
        # descriptors that die with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001  (sent to the parent, which fails the test with it)
        results.put((rank, False, traceback.format_exc()))


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
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="twsl-dist-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, backend, store, body, kwargs, results, init_group))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        failures: list[str] = []
        try:
            deadline = time.monotonic() + timeout_s
            while len(got) + len(failures) < world_size:
                left = deadline - time.monotonic()
                if left <= 0 and failures:
                    break
                if left <= 0:
                    raise AssertionError(f"distributed run timed out after {timeout_s:.0f} s (ranks done: "
                                         f"{sorted(got)}; failures: {len(failures)})\n" + "\n".join(failures))
                try:
                    rank, ok, out = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    if failures:
                        if time.monotonic() >= deadline:
                            break
                        continue
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
                    if dead:
                        # a worker died without reporting (segfault, OOM kill): do not wait for the timeout
                        raise AssertionError(f"rank(s) {dead} exited with code "
                                             f"{[procs[r].exitcode for r in dead]} without a result")
                    continue
                if ok:
                    got[rank] = pickle.loads(out)
                else:
                    failures.append(f"--- rank {rank} ---\n{out}")
                    # The other ranks may now wait forever in a collective: collect what
                    # they report within a few seconds, then stop them.
                    deadline = min(deadline, time.monotonic() + 5)
        finally:
            for p in procs:
                p.join(timeout=5 if not failures else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        if failures:
            raise AssertionError("distributed worker failed:\n" + "\n".join(failures))
        return [got[r] for r in range(world_size)]
