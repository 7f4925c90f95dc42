"""Run a function in N spawned processes and collect each one's result: the dist benchmark's and the tests'.

``run_ranks(target, world_size, timeout_s=..., args=(...))`` calls
``target(rank, world_size, store_path, *args)`` in each process (``target``
at module level: spawned interpreters import it), where ``store_path`` is a
fresh file for ``init_method="file://..."``. It returns the results by rank
or raises RuntimeError with every failing rank's traceback. A process that
dies without a result, or a run past ``timeout_s``, fails it too, and after
the first failure the others get a few seconds (they may be waiting in a
collective) before they are killed: a hung collective never hangs the caller.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

__all__ = ["run_ranks"]

#: Seconds the other ranks get to report once one has failed.
AFTER_FAILURE_S = 5


def _rank_main(rank: int, world_size: int, store: str, target: Callable, args: tuple, threads: int,
               results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        # Plain pickle bytes: torch.multiprocessing would share tensors through file
        # descriptors that die with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(target(rank, world_size, store, *args))))
    except BaseException:  # noqa: BLE001  (sent to the parent, which raises it)
        results.put((rank, False, traceback.format_exc()))


def run_ranks(target: Callable, world_size: int, *, timeout_s: float, args: tuple = (), threads: int = 1,
              what: str = "distributed run") -> list:
    """``target(rank, world_size, store_path, *args)`` in ``world_size`` spawned processes; results by rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="twsl-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, world_size, store, target, args, threads, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        failures: list[str] = []
        reported_dead: set[int] = set()
        deadline = time.monotonic() + timeout_s
        try:
            while len(got) + len(failures) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    if not failures:
                        failures.append(f"timed out after {timeout_s:.0f} s (ranks done: {sorted(got)})")
                    break
                try:
                    rank, ok, out = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if p.exitcode not in (None, 0) and r not in got and r not in reported_dead]
                    if dead:  # killed or crashed: no traceback will come
                        reported_dead.update(dead)
                        failures.append(f"rank(s) {dead} exited with code {[procs[r].exitcode for r in dead]} "
                                        "without a result")
                        deadline = min(deadline, time.monotonic() + AFTER_FAILURE_S)
                    continue
                if ok:
                    got[rank] = pickle.loads(out)
                else:
                    failures.append(f"--- rank {rank} ---\n{out}")
                    deadline = min(deadline, time.monotonic() + AFTER_FAILURE_S)
        finally:
            for p in procs:
                p.join(timeout=5 if not failures else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        if failures:
            raise RuntimeError(f"{what} failed:\n" + "\n".join(failures))
        return [got[r] for r in range(world_size)]
