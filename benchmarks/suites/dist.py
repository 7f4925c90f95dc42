"""A data-parallel training step in 2 processes: DDP with torch's defaults, with torch_wsl's bucket
options, with bf16 gradient compression, and FSDP2.

Each of the --dist-world processes (2) builds the same random-weight Llama
(the train suite's builder: "issue" is hidden 256, 4 layers, vocab 8192, batch
4 x 128 per rank; "quick", the --quick default, hidden 64, 2 layers, vocab
4096, batch 2 x 32), puts it on torch_wsl's fused operators
(``torch_wsl.optimize``) and joins a gloo process group through
``torch_wsl.distributed.init_process_group``. One step: forward with labels
(each rank its own tokens), backward with DDP's gradient all-reduce,
``torch_wsl.nn.utils.clip_grad_norm_(1.0)``, ``torch_wsl.optim.AdamW.step``,
``zero_grad``. Contenders, each with its own copy of the model:

- "ddp": ``DistributedDataParallel(model)``, torch's defaults (25 MiB buckets,
  a 1 MiB first one): the baseline;
- "ddp+buckets": ``DDP(model, **torch_wsl.distributed.ddp_options(platform="wsl2"))``:
  the WSL2 bucket (DDP_BUCKET_CAP_MB_WSL2, or --dist-bucket-mb) and
  ``gradient_as_bucket_view=True``;
- "ddp+buckets+bf16": the same plus ``compress_gradients(model)``, torch's
  bf16_compress_hook ("+fp16" and fp16_compress_hook where torch's DDP refuses
  the bf16 hook: CPU builds of torch);
- "fsdp2": ``fully_shard`` per decoder layer and the root, with
  ``torch_wsl.optim.AdamW`` and ``torch_wsl.nn.utils.clip_grad_norm_`` on the
  DTensor parameters;
- "fsdp2+torch.optim": the same with ``torch.optim.AdamW(fused=True)`` and
  ``torch.nn.utils.clip_grad_norm_``: the optimizer and clipping side by side.

Timed with the harness's interleaved rounds (every rank runs the same calls
in the same order, so the collectives stay in step; rank 0's times are
reported, each rank's median is in the extra). Per contender, counted in 3
more steps of a separate, identical copy (the third step: DDP assigns its
buckets by gradient order during the first backward): all-reduce calls and
bytes per step and rank (``torch_wsl.distributed.count_collectives``, the
dtype actually reduced), DDP's own account of its buckets
(``_get_ddp_logging_data``) beside it, and for FSDP2 every collective with
``record_collectives`` (all-gathers and reduce-scatters, the full tensor's
bytes). Also, once: one all-reduce's time in this group, for 1 element (the
fixed cost of a call) and for the whole gradient in float32 and bf16. Measured
on the CPU with gloo only: --device cuda is not run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Iterator, Optional

import torch

from .. import harness
from ..harness import Case, Contender, Result
from . import train

DEFAULTS: dict = {}

CONTENDERS = ["ddp", "ddp+buckets", "ddp+buckets+bf16", "fsdp2", "fsdp2+torch.optim"]
BASELINE = "ddp"
ROUNDS, QUICK_ROUNDS = 10, 2
WORLD = 2
#: Steps each counting copy runs; the counts are the last one's (DDP's buckets are final after the first).
COUNT_STEPS = 3
#: Seconds the whole multi-process measurement may take before it is stopped.
TIMEOUT_S = 1800

#: "issue": the train suite's issue-10 shape; "quick": small enough for a test, big enough that torch's
#: default buckets (1 MiB, then 25 MiB) split the 2.3 MiB of gradients in two.
SHAPES = {
    "issue": train.SHAPES["issue"],
    "quick": train.Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, gated_intermediate=128,
                         vocab=4096, batch=2, seq=32, image=32, patch=16),
}


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def add_args(p) -> None:
    g = p.add_argument_group("dist suite (python -m benchmarks --suite dist)")
    g.add_argument("--dist-contenders", type=_csv, default=None, help=f"default {','.join(CONTENDERS)}")
    g.add_argument("--dist-shape", choices=sorted(SHAPES), default=None,
                   help="issue: hidden 256, 4 layers, vocab 8192, batch 4x128 per rank (default); "
                   "quick: hidden 64, 2 layers, vocab 4096, batch 2x32 (default with --quick)")
    g.add_argument("--dist-rounds", type=int, default=None,
                   help=f"interleaved rounds, one step per contender each "
                   f"(default {ROUNDS}; {QUICK_ROUNDS} with --quick)")
    g.add_argument("--dist-warmup", type=int, default=1, help="untimed steps per contender before the rounds")
    g.add_argument("--dist-bucket-mb", type=int, default=None,
                   help="bucket_cap_mb of the ddp+buckets contenders (default: torch_wsl's WSL2 value, "
                   "torch_wsl.env.settings.DDP_BUCKET_CAP_MB_WSL2)")
    g.add_argument("--dist-threads", type=int, default=None,
                   help=f"intra-op threads per process (default: the CPU count / {WORLD}, at least 1)")


def cases(args) -> Iterator[Case]:
    return iter(())  # this suite measures through run()


# ---------------------------------------------------------------- inside each process

def _loss(model, batch) -> torch.Tensor:
    return model(**batch).loss


def _step(model, opt, batch, clip: Callable, update_ms: Optional[list] = None) -> Callable[[], None]:
    """One training step; with ``update_ms``, the time of its optimizer step is appended there (not the
    clipping's: its all-reduce would add the wait for the slower rank)."""
    def step() -> None:
        _loss(model, batch).backward()
        clip(model.parameters(), 1.0)
        t0 = time.perf_counter()
        opt.step()
        if update_ms is not None:
            update_ms.append((time.perf_counter() - t0) * 1e3)
        opt.zero_grad(set_to_none=True)

    return step


def _compress_dtype() -> torch.dtype:
    import torch_wsl.distributed as twd

    return torch.bfloat16 if twd.bf16_hook_supported() else torch.float16


def is_fsdp2(name: str) -> bool:
    return name.startswith("fsdp2")


def contender_name(name: str) -> str:
    """The name a contender is reported under ("ddp+buckets+bf16" becomes "+fp16" where bf16 is refused)."""
    if name == "ddp+buckets+bf16" and _compress_dtype() != torch.bfloat16:
        return "ddp+buckets+fp16"
    return name


def _build(name: str, base: torch.nn.Module, batch: dict, bucket_mb: int, counted: bool,
           update_ms: Optional[list] = None):
    """One contender's model and step; with ``counted``, its collective counter too."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import torch_wsl
    import torch_wsl.distributed as twd

    model = copy.deepcopy(base)
    torch_wsl.optimize(model)
    info: dict[str, Any] = {}
    counter = None
    if is_fsdp2(name):
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if name == "fsdp2":
            opt = torch_wsl.optim.AdamW(model.parameters(), lr=1e-4)
            clip = torch_wsl.nn.utils.clip_grad_norm_
            info.update(optimizer="torch_wsl.optim.AdamW", clip="torch_wsl.nn.utils.clip_grad_norm_")
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            clip = torch.nn.utils.clip_grad_norm_
            info.update(optimizer="torch.optim.AdamW(fused=True)", clip="torch.nn.utils.clip_grad_norm_")
        return model, _step(model, opt, batch, clip, update_ms), info, counter
    options: dict[str, Any] = {}
    hook = None
    if name != "ddp":
        options = twd.ddp_options(platform="wsl2")
        options["bucket_cap_mb"] = bucket_mb
    if name == "ddp+buckets+bf16":
        hook = twd.compression_hook(_compress_dtype())
    ddp = DDP(model, **options)
    if counted:
        counter = twd.count_collectives(ddp, hook=hook)
    elif hook is not None:
        twd.compress_gradients(ddp, dtype=_compress_dtype())
    opt = torch_wsl.optim.AdamW(ddp.parameters(), lr=1e-4)
    info.update(ddp_options=options, hook=None if hook is None else hook.__name__,
                optimizer="torch_wsl.optim.AdamW", clip="torch_wsl.nn.utils.clip_grad_norm_")
    return ddp, _step(ddp, opt, batch, torch_wsl.nn.utils.clip_grad_norm_, update_ms), info, counter


def _ddp_buckets(ddp) -> Optional[list[int]]:
    """DDP's own account of its buckets' sizes in bytes (after the rebuild by gradient order)."""
    try:
        data = ddp._get_ddp_logging_data()
    except Exception:  # a private API: absent or changed
        return None
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes")
    return [int(x) for x in str(sizes).split(",")] if sizes else None


def _count(name: str, base, batch, bucket_mb: int) -> dict:
    import torch_wsl.distributed as twd

    model, step, _, counter = _build(name, base, batch, bucket_mb, counted=True)
    per_step = []
    for _ in range(COUNT_STEPS):
        if counter is None:  # FSDP2: no DDP hook; record everything c10d runs in the step
            with twd.record_collectives() as recorded:
                step()
            counts = recorded.take()
        else:
            step()
            counts = counter.take()
        per_step.append({**dataclasses.asdict(counts), "dtypes": list(counts.dtypes)})  # as JSON has it
    out = {"per_step": per_step, "last": per_step[-1]}
    if counter is not None:
        out["ddp_bucket_sizes"] = _ddp_buckets(model)
    return out


#: Calls timed per size in the all-reduce cost measurement (every rank makes the same calls).
COST_CALLS = 15


def _allreduce_cost(numel: int) -> dict:
    """This group's all-reduce time here: a 1-element call (the fixed cost), and the whole gradient in
    float32 and in bf16 (median ms of COST_CALLS calls each, after one untimed call)."""
    import torch.distributed as dist

    out = {}
    for key, tensor in (("one_element_ms", torch.ones(1)), ("gradients_fp32_ms", torch.ones(numel)),
                        ("gradients_bf16_ms", torch.ones(numel, dtype=torch.bfloat16))):
        dist.all_reduce(tensor)
        times = []
        for _ in range(COST_CALLS):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(tensor)
            times.append((time.perf_counter() - t0) * 1e3)
        out[key] = sorted(times)[len(times) // 2]
    return out


def _measure(rank: int, world: int, store: str, cfg: dict) -> dict:
    import torch.distributed as dist

    import torch_wsl.distributed as twd

    setup = twd.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        s = SHAPES[cfg["shape"]]
        torch.manual_seed(0)
        base = train.build_model("llama", s).train()
        batch = train.make_batch("llama", s, "cpu", torch.float32)
        # Each rank its own tokens (data parallelism): the batch rolled by the rank.
        batch = {k: torch.roll(v, shifts=rank, dims=1) for k, v in batch.items()}
        params = [p for p in base.parameters() if p.requires_grad]
        counts = {}
        for name in cfg["contenders"]:
            counts[name] = _count(name, base, batch, cfg["bucket_mb"])
        contenders, infos, update_ms = [], {}, {}
        for name in cfg["contenders"]:
            update_ms[name] = []
            _, step, info, _ = _build(name, base, batch, cfg["bucket_mb"], counted=False, update_ms=update_ms[name])
            contenders.append(Contender(contender_name(name), step, launches=lambda: None, dispatch_mode_ok=False))
            infos[contender_name(name)] = info
        case = Case(suite="dist", op="llama", mode=f"{world}-process step", dtype="fp32",
                    shape=tuple(batch["input_ids"].shape), bytes_moved=0, contenders=contenders, device="cpu",
                    baseline=BASELINE if BASELINE in cfg["contenders"] else None)
        # Every rank must make the same calls: no time-dependent lead calls, no minimum seconds.
        rs = harness.run_case(case, None, warmup=cfg["warmup"], reps=cfg["rounds"], min_seconds=0.0,
                              rounds=cfg["rounds"], round_warmup=0)
        for name, times in update_ms.items():
            # the optimizer step inside the timed steps (warm-up included: the median is robust to it)
            infos[contender_name(name)]["update_ms_median"] = statistics.median(times) if times else None
        cost = _allreduce_cost(sum(p.numel() for p in params))
        return {
            "results": [dataclasses.asdict(r) for r in rs],
            "allreduce_cost": cost,
            "counts": {contender_name(k): v for k, v in counts.items()},
            "infos": infos,
            "params": sum(p.numel() for p in params),
            "grad_bytes": sum(p.numel() * p.element_size() for p in params),
            "setup": {"backend": setup.backend, "applied": setup.applied, "kept": setup.kept},
        }
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- run

def _contenders(args) -> list[str]:
    names = args.dist_contenders or CONTENDERS
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"dist suite: unknown contenders {unknown} (known: {', '.join(CONTENDERS)})")
    return names


def run(args) -> list[Result]:
    from torch_wsl.env.settings import DDP_BUCKET_CAP_MB_WSL2

    if args.device != "cpu":
        print(f"  dist suite: measured on the CPU with gloo only; skipped for --device {args.device}", flush=True)
        return []
    shape = args.dist_shape or ("quick" if args.quick else "issue")
    threads = args.dist_threads or max(1, (os.cpu_count() or 1) // WORLD)
    cfg = {"shape": shape, "contenders": _contenders(args), "rounds": args.dist_rounds or (
        QUICK_ROUNDS if args.quick else ROUNDS), "warmup": args.dist_warmup,
           "bucket_mb": args.dist_bucket_mb or DDP_BUCKET_CAP_MB_WSL2, "threads": threads}
    t0 = time.perf_counter()
    from torch_wsl.distributed._spawn import run_ranks

    ranks = run_ranks(_measure, WORLD, timeout_s=TIMEOUT_S, args=(cfg,), threads=cfg["threads"], what="dist suite")
    first = ranks[0]
    results = [harness.result_from_dict(d) for d in first["results"]]
    for r in results:
        c = first["counts"][r.contender]["last"]
        expected = first["grad_bytes"] // (2 if "+bf16" in r.contender or "+fp16" in r.contender else 1)
        r.extra = {
            "world_size": WORLD, "backend": first["setup"]["backend"], "threads_per_process": threads,
            "shape_config": shape, "params": first["params"], "grad_bytes_fp32": first["grad_bytes"],
            **first["infos"][r.contender],
            "allreduce_calls_per_step": c["all_reduces"], "allreduce_bytes_per_step": c["all_reduce_bytes"],
            "buckets_per_step": c["buckets"], "collectives_per_step": c["ops"], "allreduce_dtypes": c["dtypes"],
            "expected_allreduce_bytes": None if is_fsdp2(r.contender) else expected,
            "ddp_bucket_sizes": first["counts"][r.contender].get("ddp_bucket_sizes"),
            "counts_by_step": first["counts"][r.contender]["per_step"],
            "rank_median_ms": [next(x for x in rank["results"] if x["contender"] == r.contender)["median_ms"]
                               for rank in ranks],
            "env_applied": first["setup"]["applied"],
            "allreduce_cost_ms": first["allreduce_cost"],
        }
    print(f"  dist: {', '.join(f'{r.contender} {r.median_ms:.1f} ms' for r in results)} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


# ---------------------------------------------------------------- report

def _mib(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 2**20:.2f}"


def rows(results: list[Result]) -> list[list[str]]:
    """One row per contender: step ms (median, p25-p75), vs baseline, all-reduces and MiB per step."""
    out = []
    for r in results:
        if r.suite != "dist":
            continue
        sp = "baseline" if r.contender == r.baseline else (
            f"{r.speedup_vs_baseline:.2f}x ({r.speedup_p25:.2f}-{r.speedup_p75:.2f})"
            if r.speedup_vs_baseline is not None else "")
        ops = r.extra.get("collectives_per_step", {})
        other = ", ".join(f"{k.strip('_')} {v[0]} ({_mib(v[1])} MiB)" for k, v in ops.items()
                          if not k.replace("_", "").startswith("allreduce"))
        out.append([r.contender, f"{r.median_ms:.1f}", f"{r.p25_ms:.1f}-{r.p75_ms:.1f}", sp,
                    str(r.extra.get("allreduce_calls_per_step", "")), _mib(r.extra.get("allreduce_bytes_per_step")),
                    other])
    return out


FSDP2_NOTE = ("fsdp2: its all-gathers and reduce-scatters are counted, and torch_wsl's clip_grad_norm_'s one "
              "1-element all-reduce; torch's clip_grad_norm_ (fsdp2+torch.optim) all-reduces inside DTensor's "
              "dispatch, which record_collectives does not see")

HEADER = ["contender", "step ms", "p25-p75", "vs ddp (p25-p75)", "all-reduces/step", "all-reduce MiB/step",
          "other collectives/step"]


def format_report(results: list[Result]) -> str:
    rs = [r for r in results if r.suite == "dist"]
    if not rs:
        return ""
    e = rs[0].extra
    lines = ["", f"dist suite: {e['world_size']} processes, {e['backend']} on the CPU ({e['threads_per_process']} "
             f"thread(s) each), Llama '{e['shape_config']}' ({e['params'] / 1e6:.2f}M parameters, "
             f"{_mib(e['grad_bytes_fp32'])} MiB of float32 gradients), batch {'x'.join(map(str, rs[0].shape))} per "
             f"rank; {rs[0].rounds} interleaved rounds; rank 0's times; collectives counted per rank in the "
             f"{COUNT_STEPS}rd step of an identical copy",
             "  " + " | ".join(HEADER)]
    lines += ["  " + " | ".join(row) for row in rows(rs)]
    if any(is_fsdp2(r.contender) for r in rs):
        lines.append(f"  {FSDP2_NOTE}")
    updates = [f"{r.contender} {r.extra['update_ms_median']:.2f}" for r in rs if r.extra.get("update_ms_median")]
    if updates:
        lines.append(f"  optimizer step, median ms per step (rank 0): {', '.join(updates)}")
    c = e.get("allreduce_cost_ms")
    if c:
        lines.append(f"  one gloo all-reduce here (median of {COST_CALLS}): "
                     f"{c['one_element_ms']:.3f} ms for 1 element, "
                     f"{c['gradients_fp32_ms']:.2f} ms for the float32 gradients, "
                     f"{c['gradients_bf16_ms']:.2f} ms in bf16")
    return "\n".join(lines)


def markdown(results: list[Result]) -> str:
    """The report's table as markdown (``python -m benchmarks.report`` appends it)."""
    body = rows(results)
    if not body:
        return ""
    note = ["", FSDP2_NOTE] if any(is_fsdp2(row[0]) for row in body) else []
    return "\n".join(["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
                     + ["| " + " | ".join(row) + " |" for row in body] + note)
