"""Whole training steps of tiny random-weight models: eager vs torch_wsl.optimize() vs torch.compile.

One step is what a training loop runs: forward with labels (the model's own
loss; ViT's cross-entropy on its logits), backward, the optimizer's step and
``zero_grad(set_to_none=True)``. Models (random weights, nothing downloaded):
Llama, Qwen3, Gemma 2, GPT-2 (causal LM), BERT (masked LM, 15% of the tokens
labelled), torchvision's ViT (image classification), each at the issue's
shape (hidden 256, 4 layers, vocab 8192; batch 4 x 128 tokens, images
4 x 3 x 224 x 224), and "llama3": the Llama config with Llama 3's vocabulary
(128256), not in the default run (a step takes many seconds on a small CPU).

Contenders, each with its own deep copy of the model and its own optimizer:
- "eager": the plain model, torch.optim.AdamW (its default foreach
  implementation): the baseline;
- "torch_wsl": torch_wsl.optimize() on the copy, torch_wsl.optim.AdamW;
- "compile": torch.compile of the plain copy, torch.optim.AdamW;
- "compile+torch_wsl": torch.compile after optimize(), torch_wsl.optim.AdamW.
The compile contenders run, by default, for the Llama config only
(--train-compile; torch.compile of a training step takes a minute or more
per model here).

Timed with the harness's interleaved rounds (one step per contender per
round, --train-rounds), so the speedups are medians of per-round ratios.
Reported per contender:
- step time: median and 25th-75th percentile;
- dispatched ops per step: eager contenders, every operator that reaches a
  kernel (harness.count_dispatched_ops); compiled contenders, the kernels
  Inductor generated for the model's forward and backward graphs (each runs
  once per step) plus every operator the compiled code and the eager
  optimizer dispatch at top level (extern matmuls, fallbacks, the
  optimizer's foreach ops; counted with the profiler): the launches a GPU
  would see; under WSL2 each one crosses the VM bus;
- peak memory of one step above what was allocated before it (weights and
  optimizer state): on CPU every tensor allocation counted by torch_wsl's
  CPU allocator, installed for that one step; on CUDA
  torch.cuda.max_memory_allocated;
- CUDA only: host synchronizations per step (torch.cuda's sync debug mode
  flags each synchronizing call);
- the WSL projection: launch overhead per step = ops per step x the cost of
  one launch measured here (an empty kernel on CUDA, the dispatcher's per-op
  overhead on CPU: torch_wsl.env.launch_cost), and the same at --launch-us,
  the per-launch cost a WSL2 user measured on their machine with
  ``python -m torch_wsl launch-cost``;
- for the torch_wsl contenders, optimize()'s report (modules replaced per
  kind and class, modules left alone and why) in the result's extra.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import harness
from ..harness import Case, Contender, Result

DEFAULTS: dict = {}

MODELS = ["llama", "qwen3", "gemma2", "gpt2", "bert", "vit"]
#: Selectable with --train-models, not in the default run.
EXTRA_MODELS = ["llama3"]
CONTENDERS = ["eager", "torch_wsl", "compile", "compile+torch_wsl"]
#: Models the compile contenders run for unless --train-compile says otherwise.
COMPILE_MODELS = ["llama"]
ROUNDS, QUICK_ROUNDS = 5, 2
LLAMA3_VOCAB = 128256
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

TARGETS = {
    "llama.ops_vs_eager": 0.25,  # torch_wsl's ops per step / eager's, at most
    "llama.speedup_vs_eager": 1.3,  # at least
    "llama.peak_vs_eager": 1.0,  # at most
    "llama.compile+torch_wsl_vs_compile": 1.1,  # at least
    "llama3.peak_vs_eager": 0.6,  # at most
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model family's size knobs (gated MLPs use `gated_intermediate`) and the batch."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    gated_intermediate: int
    vocab: int
    batch: int
    seq: int
    image: int
    patch: int


#: "issue": the sizes of issue 10; "tiny": a smoke run (tests, --quick).
SHAPES = {
    "issue": Shape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, gated_intermediate=688, vocab=8192,
                   batch=4, seq=128, image=224, patch=16),
    "tiny": Shape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, gated_intermediate=64, vocab=256,
                  batch=2, seq=16, image=32, patch=16),
}


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def add_args(p) -> None:
    g = p.add_argument_group("train suite (python -m benchmarks --suite train)")
    g.add_argument("--train-models", type=_csv, default=None,
                   help=f"models, comma-separated (default {','.join(MODELS)}; also: {','.join(EXTRA_MODELS)}, "
                   f"Llama with Llama 3's vocabulary of {LLAMA3_VOCAB})")
    g.add_argument("--train-contenders", type=_csv, default=CONTENDERS, help=f"default {','.join(CONTENDERS)}")
    g.add_argument("--train-compile", type=_csv, default=None,
                   help=f"models the compile contenders run for, or 'all' (default {','.join(COMPILE_MODELS)}; "
                   "--no-compile: none)")
    g.add_argument("--train-shape", choices=sorted(SHAPES), default=None,
                   help="issue: hidden 256, 4 layers, vocab 8192, batch 4x128, images 4x224 (default); "
                   "tiny: a smoke run (default with --quick)")
    g.add_argument("--train-dtype", choices=sorted(_DTYPES), default="fp32", help="parameters' dtype (default fp32)")
    g.add_argument("--train-rounds", type=int, default=None,
                   help=f"interleaved rounds, one step per contender each (default {ROUNDS}; {QUICK_ROUNDS} with --quick)")
    g.add_argument("--train-warmup", type=int, default=1, help="untimed steps per contender before the rounds")
    g.add_argument("--launch-us", type=float, default=None, metavar="US",
                   help="per-launch cost in microseconds measured on a WSL2 machine with `python -m torch_wsl "
                   "launch-cost` (one CUDA kernel launch, VM-bus crossing included): the report adds each "
                   "contender's launch overhead per step at that cost (ops per step x US), beside the one at the "
                   "cost measured on this machine")


def cases(args) -> Iterator[Case]:
    return iter(())  # this suite measures through run()


# ---------------------------------------------------------------- models

class ClassifierWithLoss(nn.Module):
    """An image classifier and its cross-entropy, so that every model's forward returns its loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(pixel_values), labels)


def build_model(name: str, s: Shape) -> nn.Module:
    """A random-weight model of family `name` at shape `s` (transformers imported here only)."""
    if name == "vit":
        from torchvision.models import VisionTransformer

        return ClassifierWithLoss(VisionTransformer(image_size=s.image, patch_size=s.patch, num_layers=s.layers,
                                                    num_heads=s.heads, hidden_dim=s.hidden, mlp_dim=s.intermediate,
                                                    num_classes=1000 if s.vocab > 1000 else s.vocab))
    import transformers as T

    pos = max(512, s.seq)
    common = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads)
    decoder = dict(common, num_key_value_heads=s.kv_heads, intermediate_size=s.gated_intermediate,
                   max_position_embeddings=pos)
    if name in ("llama", "llama3"):
        vocab = LLAMA3_VOCAB if name == "llama3" else s.vocab
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=vocab, **decoder))
    if name == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(vocab_size=s.vocab, head_dim=s.hidden // s.heads, **decoder))
    if name == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=s.vocab, head_dim=s.hidden // s.heads, **decoder))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=s.hidden, n_layer=s.layers, n_head=s.heads, n_inner=s.intermediate,
                                              vocab_size=s.vocab, n_positions=pos, bos_token_id=0, eos_token_id=0))
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=s.vocab, intermediate_size=s.intermediate,
                                              max_position_embeddings=pos, **common))
    raise ValueError(f"train suite: unknown model {name!r} (known: {', '.join(MODELS + EXTRA_MODELS)})")


def make_batch(name: str, s: Shape, device: str, dtype: torch.dtype) -> dict:
    """The step's inputs (fixed, the same for every contender)."""
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        classes = 1000 if s.vocab > 1000 else s.vocab
        return {"pixel_values": torch.randn(s.batch, 3, s.image, s.image, generator=g).to(device, dtype),
                "labels": torch.randint(0, classes, (s.batch,), generator=g).to(device)}
    vocab = LLAMA3_VOCAB if name == "llama3" else s.vocab
    ids = torch.randint(0, vocab, (s.batch, s.seq), generator=g)
    if name == "bert":  # masked LM: 15% of the positions carry a label
        labels = torch.where(torch.rand(s.batch, s.seq, generator=g) < 0.15, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]
        return {"input_ids": ids.to(device), "labels": labels.to(device)}
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def _loss(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.loss


def train_step(model: Callable, opt: torch.optim.Optimizer, batch: dict) -> Callable[[], None]:
    def step() -> None:
        _loss(model(**batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------- counting

#: Profiler event namespaces that are operators (everything else is a range: autograd, optimizer, compiled region).
_OP_NAMESPACES = ("aten", "torch_wsl", "prims")
_NO_LAUNCH_NAMES = {op.name() for op in harness._NO_LAUNCH}


def top_level_ops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Operators dispatched at top level during fn() (not inside another operator), metadata-only ones
    excluded, counted with torch.profiler: what compiled code calls besides its generated kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def is_op(e) -> bool:
        return e.name.split("::", 1)[0] in _OP_NAMESPACES and "::" in e.name

    names: dict[str, int] = {}
    for e in prof.events():
        if not is_op(e) or e.name in _NO_LAUNCH_NAMES:
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if is_op(parent):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            names[e.name] = names.get(e.name, 0) + 1
    return sum(names.values()), names


def host_syncs(fn: Callable[[], object]) -> Optional[int]:
    """Synchronizing CUDA calls during fn() (torch.cuda's sync debug mode); None off CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def report_summary(report) -> dict:
    """optimize()'s Report as JSON: replaced modules per kind and class, counts per kind, reasons left alone."""
    return {
        "total": report.total,
        "per_kind": {kind: sum(per.values()) for kind, per in report.replaced.items()},
        "replaced": {kind: dict(per) for kind, per in report.replaced.items()},
        "left_alone": [{"class": cls, "reason": why, "count": n} for (cls, why), n in sorted(report.reasons().items())],
    }


# ---------------------------------------------------------------- contenders

def _compiled_contender(name: str, step: Callable[[], None]) -> Contender:
    """Launches: Inductor's generated kernels + the operators dispatched at top level in one more step."""
    top_level: dict = {}

    def top_level_count() -> int:
        ops, names = top_level_ops(step)
        top_level.clear()
        top_level.update(names)
        return ops

    c = harness.compile_contender(step, name, extra_launches=top_level_count)
    c.state["top_level"] = top_level
    return c


def make_contenders(model_name: str, base: nn.Module, batch: dict, names: list[str]) -> list[Contender]:
    import torch_wsl

    out = []
    for name in names:
        model = copy.deepcopy(base)
        ours = "torch_wsl" in name
        report = torch_wsl.optimize(model) if ours else None
        callee = torch.compile(model) if name.startswith("compile") else model
        opt_cls = torch_wsl.optim.AdamW if ours else torch.optim.AdamW
        step = train_step(callee, opt_cls(model.parameters(), lr=1e-4), batch)
        c = _compiled_contender(name, step) if name.startswith("compile") else Contender(name, step,
                                                                                          dispatch_mode_ok=False)
        c.step = step
        c.report = report
        c.model = model
        out.append(c)
    return out


# ---------------------------------------------------------------- run

def _models(args) -> list[str]:
    models = args.train_models or MODELS
    unknown = [m for m in models if m not in MODELS + EXTRA_MODELS]
    if unknown:
        raise SystemExit(f"train suite: unknown models {unknown} (known: {', '.join(MODELS + EXTRA_MODELS)})")
    return models


def _contender_names(args, model: str) -> list[str]:
    compile_for = args.train_compile if args.train_compile is not None else COMPILE_MODELS
    with_compile = args.compile and ("all" in compile_for or model in compile_for)
    names = [c for c in args.train_contenders if c in CONTENDERS and (with_compile or not c.startswith("compile"))]
    if "eager" not in names:
        names.insert(0, "eager")  # the baseline
    return names


def run(args) -> list[Result]:
    from torch_wsl.env.launch_cost import measure_launch_cost

    shape_name = args.train_shape or ("tiny" if args.quick else "issue")
    s = SHAPES[shape_name]
    rounds = args.train_rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    dtype = _DTYPES[args.train_dtype]
    device = args.device
    launch = measure_launch_cost(device, launches=500 if args.quick else 2000, batches=3 if args.quick else 7)
    print(f"  train suite: launch cost here {launch['us_per_launch']:.2f} us ({launch['op']})", flush=True)
    results: list[Result] = []
    for model_name in _models(args):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        base = build_model(model_name, s).to(device=device, dtype=dtype).train()
        batch = make_batch(model_name, s, device, dtype)
        contenders = make_contenders(model_name, base, batch, _contender_names(args, model_name))
        shape = list(batch["pixel_values"].shape if model_name == "vit" else batch["input_ids"].shape)
        case = Case(suite="train", op=model_name, mode="train step", dtype=args.train_dtype, shape=tuple(shape),
                    bytes_moved=0, contenders=contenders, device=device, baseline="eager")
        rs = harness.run_case(case, None, warmup=args.train_warmup, reps=rounds, min_seconds=0.0, rounds=rounds,
                              round_warmup=0)
        by = {c.name: c for c in contenders}
        for r in rs:
            c = by[r.contender]
            r.gbps = 0.0  # bytes_moved is not defined for a whole step
            extra = {"shape_config": shape_name, "params": sum(p.numel() for p in base.parameters()),
                     "launch": dict(launch), "launch_us_given": args.launch_us}
            if r.contender.startswith("compile"):
                extra["ops_counted"] = ("Inductor's generated kernels (forward and backward graphs, each once per "
                                        "step) + operators dispatched at top level (profiler)")
                extra["inductor_kernels"] = c.state.get("kernels")
                extra["top_level_ops"] = c.state.get("top_level", {})
            else:
                extra["ops_counted"] = "every operator reaching a kernel (harness.count_dispatched_ops)"
                extra["ops"] = r.extra.get("ops", {})
            if device == "cpu":
                r.peak_memory_bytes = harness.cpu_true_peak(c.step)
                extra["peak_counted"] = "every CPU tensor allocation (torch_wsl.memory's allocator), above the start"
            else:
                extra["peak_counted"] = "torch.cuda.max_memory_allocated, above the start"
                extra["host_syncs_per_step"] = host_syncs(c.step)
            if r.dispatched_ops is not None:
                extra["launch_ms_here"] = r.dispatched_ops * launch["us_per_launch"] / 1e3
                if args.launch_us is not None:
                    extra["launch_ms_at_launch_us"] = r.dispatched_ops * args.launch_us / 1e3
                    if device.startswith("cuda"):
                        extra["projected_step_ms"] = r.median_ms + r.dispatched_ops * (
                            args.launch_us - launch["us_per_launch"]) / 1e3
            if c.report is not None:
                extra["optimize"] = report_summary(c.report)
            r.extra = extra
        results.extend(rs)
        print(f"  train {model_name}: {', '.join(f'{r.contender} {r.median_ms:.1f} ms' for r in rs)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del contenders, case, base
    return results


# ---------------------------------------------------------------- report

def _group(results: list[Result]) -> dict[str, dict[str, Result]]:
    by: dict[str, dict[str, Result]] = {}
    for r in results:
        if r.suite == "train":
            by.setdefault(r.op, {})[r.contender] = r
    return by


def _speedup(group: dict[str, Result], num: str, den: str) -> Optional[float]:
    a, b = group.get(num), group.get(den)
    if a is None or b is None:
        return None
    ratio = harness.round_ratios(a.round_ms, b.round_ms)
    return ratio[1] if ratio else a.median_ms / b.median_ms


def summary(results: list[Result]) -> dict:
    """The issue's targets with what was reached: {key: {value, target, met}} (met None: not measured)."""
    out: dict = {}
    by = _group(results)
    llama, llama3 = by.get("llama", {}), by.get("llama3", {})
    e, w = llama.get("eager"), llama.get("torch_wsl")
    if e and w:
        if e.dispatched_ops and w.dispatched_ops is not None:
            v = w.dispatched_ops / e.dispatched_ops
            out["llama.ops_vs_eager"] = {"value": v, "target": "<= 0.25", "met": v <= TARGETS["llama.ops_vs_eager"],
                                         "detail": f"{w.dispatched_ops} vs {e.dispatched_ops} ops/step"}
        v = _speedup(llama, "eager", "torch_wsl")
        out["llama.speedup_vs_eager"] = {"value": v, "target": ">= 1.3", "met": v >= TARGETS["llama.speedup_vs_eager"]}
        if e.peak_memory_bytes and w.peak_memory_bytes is not None:
            v = w.peak_memory_bytes / e.peak_memory_bytes
            out["llama.peak_vs_eager"] = {"value": v, "target": "<= 1.0", "met": v <= TARGETS["llama.peak_vs_eager"],
                                          "detail": f"{w.peak_memory_bytes / 2**20:.0f} vs "
                                                    f"{e.peak_memory_bytes / 2**20:.0f} MiB"}
    v = _speedup(llama, "compile", "compile+torch_wsl")
    out["llama.compile+torch_wsl_vs_compile"] = {
        "value": v, "target": ">= 1.1", "met": None if v is None else v >= TARGETS["llama.compile+torch_wsl_vs_compile"]}
    e3, w3 = llama3.get("eager"), llama3.get("torch_wsl")
    if e3 and w3 and e3.peak_memory_bytes and w3.peak_memory_bytes is not None:
        v = w3.peak_memory_bytes / e3.peak_memory_bytes
        out["llama3.peak_vs_eager"] = {"value": v, "target": "<= 0.6", "met": v <= TARGETS["llama3.peak_vs_eager"],
                                       "detail": f"{w3.peak_memory_bytes / 2**20:.0f} vs "
                                                 f"{e3.peak_memory_bytes / 2**20:.0f} MiB"}
    else:
        out["llama3.peak_vs_eager"] = {"value": None, "target": "<= 0.6", "met": None,
                                       "detail": "not run (--train-models llama3)"}
    return out


def format_report(results: list[Result]) -> str:
    by = _group(results)
    if not by:
        return ""
    any_r = next(iter(next(iter(by.values())).values()))
    launch = any_r.extra.get("launch", {})
    given = any_r.extra.get("launch_us_given")
    cuda = any_r.device.startswith("cuda")
    head = (f"{'model':8}{'contender':19}{'step ms':>10}{'p25-p75':>18}{'vs eager (p25-p75)':>22}{'ops/step':>9}"
            f"{'peak MiB':>9}" + (f"{'syncs':>6}" if cuda else "")
            + f"{'launch ms':>10}" + (f"{'@' + format(given, 'g') + 'us':>10}" if given is not None else ""))
    lines = ["", f"train suite on {any_r.device}: one training step (fwd with labels, bwd, AdamW step, zero_grad); "
             f"{any_r.rounds} interleaved rounds; launch ms = ops/step x {launch.get('us_per_launch', 0):.2f} us "
             f"measured here (median; best {launch.get('min_us', 0):.2f} us)" + (f", and x {given:g} us (--launch-us)" if given is not None else ""), head]
    for model, group in by.items():
        for name, r in group.items():
            sp = "baseline" if name == r.baseline else (
                f"{r.speedup_vs_baseline:.2f}x ({r.speedup_p25:.2f}-{r.speedup_p75:.2f})"
                if r.speedup_vs_baseline is not None else "")
            ops = "" if r.dispatched_ops is None else str(r.dispatched_ops)
            peak = "" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.1f}"
            row = (f"{model:8}{name:19}{r.median_ms:>10.1f}{f' {r.p25_ms:.1f}-{r.p75_ms:.1f}':>18}{sp:>22}{ops:>9}"
                   f"{peak:>9}")
            if cuda:
                syncs = r.extra.get("host_syncs_per_step")
                row += f"{'' if syncs is None else syncs:>6}"
            row += f"{r.extra.get('launch_ms_here', 0):>10.2f}"
            if given is not None:
                row += f"{r.extra.get('launch_ms_at_launch_us', 0):>10.2f}"
            lines.append(row)
    lines += ["", "optimize() reports (modules replaced per kind):"]
    for model, group in by.items():
        for name, r in group.items():
            rep = r.extra.get("optimize")
            if rep is not None:
                kinds = ", ".join(f"{k} {n}" for k, n in rep["per_kind"].items()) or "nothing replaced"
                alone = sum(x["count"] for x in rep["left_alone"])
                lines.append(f"  {model:8}{name:19}{kinds}; {alone} left alone")
                break
    lines += ["", "targets (issue 10, Llama-like config):"]
    for key, v in summary(results).items():
        val = "-" if v["value"] is None else f"{v['value']:.3f}"
        mark = "not measured" if v["met"] is None else ("met" if v["met"] else "NOT met")
        lines.append(f"  {key:38}{val:>8}  (target {v['target']}) {mark}" + (f"  [{v['detail']}]" if v.get("detail")
                                                                               else ""))
    return "\n".join(lines)
