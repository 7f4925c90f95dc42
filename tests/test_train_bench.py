"""The train suite (python -m benchmarks --suite train) on tiny configs, its report and plot, and
`python -m torch_wsl launch-cost`. CPU; the torch.compile contenders only in the slow test."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness, report
from benchmarks.suites import train

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
try:  # the torch-2.13 CI venv has no torchvision
    import torchvision  # noqa: F401

    MODELS = ["llama", "vit"]
except ImportError:
    MODELS = ["llama"]


def _args(**kw) -> argparse.Namespace:
    a = dict(train_models=MODELS, train_contenders=train.CONTENDERS, train_compile=None, train_shape="tiny",
             train_dtype="fp32", train_rounds=1, train_warmup=0, launch_us=50.0, compile=False, device="cpu",
             quick=True)
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.fixture(scope="module")
def quick_results():
    return train.run(_args())


def test_train_suite_end_to_end_on_tiny_models(quick_results):
    by = {(r.op, r.contender): r for r in quick_results}
    assert set(by) == {(m, c) for m in MODELS for c in ("eager", "torch_wsl")}
    for model in MODELS:
        eager, ours = by[(model, "eager")], by[(model, "torch_wsl")]
        assert eager.baseline == ours.baseline == "eager" and eager.speedup_vs_baseline == 1.0
        assert ours.rounds == 1 and len(ours.round_ms) == 1 and ours.median_ms > 0 and ours.speedup_vs_baseline > 0
        # Every op of a step counted: the fused AdamW and norms leave fewer than torch's per-parameter loop.
        assert eager.dispatched_ops > ours.dispatched_ops > 0
        assert sum(eager.extra["ops"].values()) == eager.dispatched_ops
        assert ours.extra["ops"]["torch_wsl.adamw_"] == 1 and "torch_wsl.adamw_" not in eager.extra["ops"]
        # The true CPU peak: at least the gradients of every parameter, which live until zero_grad.
        grads = 4 * eager.extra["params"]
        assert eager.peak_memory_bytes >= grads and ours.peak_memory_bytes >= grads
        cost = eager.extra["launch"]["us_per_launch"]
        assert cost > 0 and eager.extra["launch_us_given"] == 50.0
        assert ours.extra["launch_ms_here"] == pytest.approx(ours.dispatched_ops * cost / 1e3)
        assert ours.extra["launch_ms_at_launch_us"] == pytest.approx(ours.dispatched_ops * 50.0 / 1e3)
        assert "host_syncs_per_step" not in ours.extra and "projected_step_ms" not in ours.extra  # CPU
        rep = ours.extra["optimize"]
        assert rep["per_kind"]["norms"] >= 1 and rep["total"] == sum(rep["per_kind"].values())
        assert "optimize" not in eager.extra
    # Llama's RMSNorms (2 per layer + the final one) and ViT's LayerNorms (the same) go through optimize().
    assert by[("llama", "torch_wsl")].extra["optimize"]["replaced"]["norms"]["LlamaRMSNorm"] == 3
    if "vit" in MODELS:
        assert by[("vit", "torch_wsl")].extra["optimize"]["replaced"]["norms"]["LayerNorm"] == 3


def test_summary_and_report_name_the_targets(quick_results):
    s = train.summary(quick_results)
    assert set(s) == set(train.TARGETS)
    e = next(r for r in quick_results if r.op == "llama" and r.contender == "eager")
    w = next(r for r in quick_results if r.op == "llama" and r.contender == "torch_wsl")
    assert s["llama.ops_vs_eager"]["value"] == pytest.approx(w.dispatched_ops / e.dispatched_ops)
    assert s["llama.ops_vs_eager"]["met"] == (w.dispatched_ops <= 0.25 * e.dispatched_ops)
    assert s["llama.peak_vs_eager"]["value"] == pytest.approx(w.peak_memory_bytes / e.peak_memory_bytes)
    assert s["llama.compile+torch_wsl_vs_compile"]["met"] is None and s["llama3.peak_vs_eager"]["met"] is None
    text = train.format_report(quick_results)
    assert "llama.speedup_vs_eager" in text and "not measured" in text and re.search(r"\b(met|NOT met)\b", text)
    assert "@50us" in text and "optimize() reports" in text


def test_json_round_trip_markdown_and_plot(quick_results, tmp_path):
    path = tmp_path / "train.json"
    harness.write_json(path, {"processor": "test"}, {"best_gbps": 1.0, "kernel": "k", "threads": 1}, quick_results,
                       ["python", "-m", "benchmarks", "--suite", "train"], {"rounds": 1})
    doc = json.loads(path.read_text())
    assert [harness.result_from_dict(r) for r in doc["results"]] == quick_results
    assert "| llama | train step |" in report.markdown(path)
    out = tmp_path / "plots"
    assert report.main([str(path), "--plot", "--plot-dir", str(out)]) == 0
    png = out / "train.train.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
    # Without --plot-dir the PNG goes next to the JSON.
    assert report.plot(path) == [tmp_path / "train.train.png"]
    assert (tmp_path / "train.train.png").read_bytes()[:8] == PNG_SIGNATURE


def test_top_level_ops_counts_what_compiled_code_dispatches():
    a, w = torch.randn(4, 8), torch.randn(3, 8)
    n, names = train.top_level_ops(lambda: (torch.mm(a, w.t()) + 1).view(-1))
    assert names == {"aten::mm": 1, "aten::add": 1} and n == 2  # t and view launch nothing
    n, names = train.top_level_ops(lambda: F.linear(a, w))
    assert n == 1 and names == {"aten::linear": 1}  # the ops inside linear are not counted again


def test_true_peak_counts_every_allocation():
    def fn():
        x = torch.empty(1 << 18)  # 1 MiB, freed at once
        del x
        return torch.empty(1 << 16)  # 256 KiB

    assert harness.cpu_true_peak(fn) >= 1 << 20


def test_cli_options_and_unknown_model():
    from benchmarks.__main__ import parse_args

    args = parse_args(["--suite", "train", "--launch-us", "12.5", "--train-models", "llama,llama3"])
    assert args.launch_us == 12.5 and args.train_models == ["llama", "llama3"] and args.suite == ["train"]
    assert train._contender_names(args, "llama") == train.CONTENDERS
    assert train._contender_names(args, "qwen3") == ["eager", "torch_wsl"]  # compile for llama only by default
    assert train._contender_names(parse_args(["--no-compile"]), "llama") == ["eager", "torch_wsl"]
    assert train._contender_names(parse_args(["--train-compile", "all"]), "bert") == train.CONTENDERS
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={"TORCH_WSL_BENCH_REEXEC": "1", **__import__("os").environ}, timeout=120)
    assert "--launch-us" in p.stdout and "launch-cost" in p.stdout
    with pytest.raises(SystemExit, match="unknown models"):
        train._models(_args(train_models=["llama2"]))


def test_launch_cost_command_prints_a_number():
    cmd = [sys.executable, "-m", "torch_wsl", "launch-cost", "--device", "cpu", "--launches", "200", "--batches", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    m = re.match(r"(\d+\.\d+) us per launch on cpu", p.stdout)
    assert m and float(m.group(1)) > 0
    p = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    doc = json.loads(p.stdout)
    assert doc["device"] == "cpu" and doc["launches"] == 200 and doc["min_us"] <= doc["us_per_launch"] <= doc["max_us"]


@pytest.mark.slow
def test_train_suite_compile_contenders():
    rs = train.run(_args(train_models=["llama"], compile=True, launch_us=None))
    by = {r.contender: r for r in rs}
    assert list(by) == train.CONTENDERS
    for name in ("compile", "compile+torch_wsl"):
        r = by[name]
        kernels, top = r.extra["inductor_kernels"], r.extra["top_level_ops"]
        assert kernels > 0 and r.dispatched_ops == kernels + sum(top.values())
        assert top.get("aten::mm", 0) > 0  # the matmuls stay extern calls
        assert r.peak_memory_bytes > 0 and "launch_ms_at_launch_us" not in r.extra
    assert by["compile+torch_wsl"].extra["top_level_ops"]["torch_wsl::adamw_"] == 1
    assert by["compile+torch_wsl"].dispatched_ops < by["compile"].dispatched_ops
    assert train.summary(rs)["llama.compile+torch_wsl_vs_compile"]["value"] > 0
