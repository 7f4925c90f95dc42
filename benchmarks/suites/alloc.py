"""The caching allocator: traces of real CPU training steps replayed in C++, and CPU training step time.

1. Replay. The allocations and frees of GPT-2 and ResNet-50 training steps
   (random weights, small batch; benchmarks/suites/alloc_models.py) are
   recorded with torch_wsl.memory.record_trace() and replayed inside C++
   through "no caching" (every request goes to the backend, as with bare
   cudaMalloc/cudaFree) and through torch_wsl's allocator, both on the
   simulated paravirtualized backend. Reported: backend calls per
   steady-state step, fragmentation (peak reserved / peak requested), host
   nanoseconds per malloc+free (median over warm steps, backend cost 0), and
   the step's host time with every backend call costing --sim-call-us
   microseconds -- the simulated driver time saved.
2. Training steps. The same steps timed in a subprocess per allocator:
   PyTorch's default (glibc malloc with its default settings), jemalloc and
   tcmalloc (LD_PRELOAD, Debian's libjemalloc2 / libtcmalloc-minimal4; a
   missing one is skipped), torch_wsl.memory.enable("cpu"), and the last two
   together (tensors from torch_wsl, every other malloc from tcmalloc). Contenders are
   interleaved over --alloc-rounds rounds; each reports the median of its
   timed steps, and the figure is the best round's median (noise from other
   processes only ever slows a round down).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from ..harness import Case, Result

DEFAULTS: dict = {}

#: Simulated cost of one backend call (cudaMalloc or cudaFree) in microseconds.
#: No published figure gives the per-call cost under WSL2 (see DESIGN.md), so
#: this is an assumption for the projection, not a measurement: measure
#: yours with torch_wsl.memory.measure_driver_cost() and pass --sim-call-us.
SIM_CALL_US = 50.0

ROOT = Path(__file__).resolve().parents[2]
PRELOADS = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}
#: "torch_wsl+tcmalloc": torch_wsl's allocator for tensors, tcmalloc for every other malloc
#: (C++ objects, oneDNN's own buffers), which a tensor allocator cannot reach.
CONTENDERS = ["default", "jemalloc", "tcmalloc", "torch_wsl", "torch_wsl+tcmalloc"]
MODELS = ["gpt2", "resnet50"]
TRACE_STEPS = 5  # recorded training steps: 2 of warm-up, 3 steady
WARMUP_STEPS = 2  # the optimizer's state appears in step 1: step 2 is the first steady one

TARGETS = {
    "backend_calls_per_steady_step": 0,
    "fragmentation": 1.15,
    "ns_per_malloc_free": 150,
    "speedup_vs_default": 1.1,
    "speedup_vs_jemalloc": 1.0,
    "speedup_vs_tcmalloc": 1.0,
}


def add_args(p) -> None:
    g = p.add_argument_group("alloc suite")
    g.add_argument("--alloc-models", type=lambda s: [v for v in s.split(",") if v], default=MODELS)
    g.add_argument("--alloc-contenders", type=lambda s: [v for v in s.split(",") if v], default=CONTENDERS)
    g.add_argument("--alloc-rounds", type=int, default=2, help="interleaved rounds of training-step timing")
    g.add_argument("--alloc-steps", type=int, default=6, help="timed training steps per subprocess")
    g.add_argument("--alloc-warmup", type=int, default=3, help="untimed training steps per subprocess")
    g.add_argument("--sim-call-us", type=float, default=SIM_CALL_US,
                   help="simulated cost of one backend call, microseconds (measure: torch_wsl.memory.measure_driver_cost())")
    g.add_argument("--no-train", dest="alloc_train", action="store_false", help="replay only")


def cases(args) -> Iterator[Case]:
    return iter(())  # this suite measures through run()


# ---------------------------------------------------------------- replay

def _record(model: str):
    import torch_wsl.memory as twm

    from .alloc_models import make_step

    step = make_step(model)
    with twm.record_trace() as trace:
        for _ in range(TRACE_STEPS):
            step()
            trace.step()
    return trace


def _replay_rows(model: str, trace, call_us: float) -> list[Result]:
    import torch_wsl.memory as twm

    rows = []
    for name, make in (("no caching", twm.NoCachingAllocator), ("torch_wsl", twm.CachingAllocator)):
        # Host cost of the allocator itself: backend calls are free here.
        fast = twm.replay(trace, make(twm.SimulatedBackend()), passes=3, warmup_steps=WARMUP_STEPS)
        # The same steps with every backend call costing call_us (busy-waited, like a driver call).
        slow = twm.replay(trace, make(twm.SimulatedBackend(malloc_cost_us=call_us, free_cost_us=call_us)),
                          passes=1, warmup_steps=WARMUP_STEPS)
        steady_ms = [s["ns"] / 1e6 for s in slow["steps"] if WARMUP_STEPS <= s["step"] < trace.num_steps]
        q = statistics.quantiles(steady_ms, n=4) if len(steady_ms) > 1 else steady_ms * 3
        steady = [s for s in fast["steps"] if s["pass"] == 0 and WARMUP_STEPS <= s["step"] < trace.num_steps]
        rows.append(Result(
            suite="alloc", op=f"replay {model}", mode="steady step", dtype="-", shape=[len(trace)], device="sim",
            contender=name, median_ms=statistics.median(steady_ms), p25_ms=q[0], p75_ms=q[2], gbps=0.0,
            roofline_fraction=0.0, dispatched_ops=None, peak_memory_bytes=fast["peak_reserved"], reps=len(steady_ms),
            extra={
                "backend_calls_per_steady_step": fast["backend_calls_per_steady_step"],
                "mallocs_per_step": statistics.mean(s["mallocs"] for s in steady),
                "fragmentation": fast["fragmentation"],
                "peak_requested_bytes": fast["peak_requested"],
                "peak_reserved_bytes": fast["peak_reserved"],
                "ns_per_malloc_free": fast["ns_per_malloc_free"],
                "sim_call_us": call_us,
                "warmup_backend_calls": sum(s["device_allocs"] + s["device_frees"] for s in fast["steps"]
                                            if s["pass"] == 0 and s["step"] < WARMUP_STEPS),
            }))
    return rows


# ---------------------------------------------------------------- training steps

def _contender_env(name: str) -> dict[str, str] | None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "TORCH_WSL_BENCH_REEXEC")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    preload = PRELOADS.get(name.split("+")[-1])
    if preload:
        if not Path(preload).exists():
            return None
        env["LD_PRELOAD"] = preload
    return env


def _run_worker(name: str, model: str, steps: int, warmup: int, env: dict) -> list[float]:
    cmd = [sys.executable, "-m", "benchmarks.suites.alloc_models", "--model", model,
           "--steps", str(steps), "--warmup", str(warmup)]
    if name.startswith("torch_wsl"):
        cmd.append("--torch-wsl")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {model} worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]


def _train_rows(args) -> list[Result]:
    from .alloc_models import GPT2, RESNET50

    contenders = [c for c in args.alloc_contenders if c in CONTENDERS]
    envs = {c: _contender_env(c) for c in contenders}
    for c in [c for c in contenders if envs[c] is None]:
        lib = c.split("+")[-1]
        print(f"alloc suite: {c} skipped ({PRELOADS[lib]} not found; Debian package "
              f"{'libjemalloc2' if lib == 'jemalloc' else 'libtcmalloc-minimal4'})", flush=True)
    contenders = [c for c in contenders if envs[c] is not None]
    rounds: dict[tuple[str, str], list[list[float]]] = {}
    for r in range(args.alloc_rounds):
        for model in args.alloc_models:
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]  # rotate
            for c in order:
                t0 = time.perf_counter()
                times = _run_worker(c, model, args.alloc_steps, args.alloc_warmup, envs[c])
                rounds.setdefault((model, c), []).append(times)
                print(f"  train {model} {c} round {r + 1}: median {1e3 * statistics.median(times):.1f} ms "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
    rows = []
    for (model, c), per_round in rounds.items():
        medians = [statistics.median(t) for t in per_round]
        pooled = [x for t in per_round for x in t]
        q = statistics.quantiles(pooled, n=4) if len(pooled) > 1 else pooled * 3
        shape = [GPT2["batch"], GPT2["seq"]] if model == "gpt2" else [RESNET50["batch"], RESNET50["resolution"]]
        rows.append(Result(
            suite="alloc", op=f"train {model}", mode="fwd+bwd+opt", dtype="fp32", shape=shape, device="cpu",
            contender=c, median_ms=1e3 * min(medians), p25_ms=1e3 * q[0], p75_ms=1e3 * q[2], gbps=0.0,
            roofline_fraction=0.0, dispatched_ops=None, peak_memory_bytes=None, reps=len(pooled),
            extra={"round_medians_ms": [1e3 * m for m in medians]}))
    return rows


def run(args) -> list[Result]:
    if args.quick:
        args.alloc_rounds, args.alloc_steps, args.alloc_warmup = 1, 3, 2
    results: list[Result] = []
    for model in args.alloc_models:
        t0 = time.perf_counter()
        trace = _record(model)
        results += _replay_rows(model, trace, args.sim_call_us)
        print(f"  replay {model}: {len(trace)} events, {time.perf_counter() - t0:.1f} s", flush=True)
    if args.alloc_train:
        results += _train_rows(args)
    return results


def summary(results: list[Result]) -> dict:
    """The issue's figures, each with its target and whether it is met."""
    out: dict = {}
    by = {(r.op, r.contender): r for r in results}
    for op, contender in by:
        r = by[(op, contender)]
        if op.startswith("replay") and contender == "torch_wsl":
            model = op.split()[1]
            none = by.get((op, "no caching"))
            for key in ("backend_calls_per_steady_step", "fragmentation", "ns_per_malloc_free"):
                v = r.extra[key]
                ok = v <= TARGETS[key]
                out[f"{model}.{key}"] = {"value": v, "target": f"<= {TARGETS[key]}", "met": ok}
            if none:
                out[f"{model}.sim_driver_ms_saved_per_step"] = {
                    "value": none.median_ms - r.median_ms, "target": f"at {r.extra['sim_call_us']} us per call",
                    "met": None}
                out[f"{model}.no_caching_backend_calls_per_step"] = {
                    "value": none.extra["backend_calls_per_steady_step"], "target": "-", "met": None}
        if op.startswith("train") and contender == "torch_wsl":
            model = op.split()[1]
            for other in ("default", "jemalloc", "tcmalloc"):
                o = by.get((op, other))
                if o:
                    key = f"speedup_vs_{other}"
                    v = o.median_ms / r.median_ms
                    out[f"{model}.{key}"] = {"value": v, "target": f">= {TARGETS[key]}", "met": v >= TARGETS[key]}
    return out


def format_report(results: list[Result]) -> str:
    lines = ["", "alloc suite: replayed traces (simulated paravirtualized backend)",
             f"{'trace':16}{'allocator':12}{'calls/step':>11}{'mallocs/step':>13}{'frag':>7}{'ns/malloc+free':>16}"
             f"{'step ms @call cost':>20}{'peak reserved MiB':>19}"]
    for r in results:
        if r.op.startswith("replay"):
            e = r.extra
            lines.append(f"{r.op[7:]:16}{r.contender:12}{e['backend_calls_per_steady_step']:>11.1f}"
                         f"{e['mallocs_per_step']:>13.0f}{e['fragmentation']:>7.3f}{e['ns_per_malloc_free']:>16.0f}"
                         f"{r.median_ms:>20.2f}{e['peak_reserved_bytes'] / 2**20:>19.0f}")
    train = [r for r in results if r.op.startswith("train")]
    if train:
        lines += ["", "alloc suite: CPU training step (best round's median, ms; torch_wsl's speedup)"]
        for r in train:
            ours = next((x for x in train if x.op == r.op and x.contender == "torch_wsl"), None)
            sp = f"{r.median_ms / ours.median_ms:.2f}x" if ours and r is not ours else ""
            rounds = ", ".join(f"{m:.1f}" for m in r.extra["round_medians_ms"])
            lines.append(f"{r.op[6:]:10}{r.contender:20}{r.median_ms:>9.1f}   rounds [{rounds}]  {sp}")
    lines += ["", "targets:"]
    for key, v in summary(results).items():
        mark = "" if v["met"] is None else ("met" if v["met"] else "NOT met")
        val = f"{v['value']:.3f}" if isinstance(v["value"], float) else str(v["value"])
        lines.append(f"  {key:45}{val:>12}  {v['target']:>22}  {mark}")
    return "\n".join(lines)
