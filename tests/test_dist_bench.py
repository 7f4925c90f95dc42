"""The dist suite (python -m benchmarks --suite dist) on its quick shape: 2 spawned gloo processes, every
contender, and the collectives it counted against what the model implies."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import harness, report
from benchmarks.suites import dist, train
import torch_wsl.distributed as twd

HALF = "bf16" if twd.bf16_hook_supported() else "fp16"  # torch's DDP refuses its bf16 hook on CPU builds of torch


def _args(**kw) -> argparse.Namespace:
    a = dict(dist_contenders=None, dist_shape=None, dist_rounds=None, dist_warmup=0, dist_bucket_mb=None,
             dist_threads=None, device="cpu", quick=True)
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.fixture(scope="module")
def quick_results():
    return dist.run(_args())


def _model_gradients() -> tuple[int, int]:
    """Parameters and float32 gradient bytes of the quick Llama, built here, outside the suite."""
    torch.manual_seed(0)
    model = train.build_model("llama", dist.SHAPES["quick"])
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), sum(4 * p.numel() for p in params)


def test_every_contender_is_timed_and_counted(quick_results):
    by = {r.contender: r for r in quick_results}
    assert list(by) == ["ddp", "ddp+buckets", f"ddp+buckets+{HALF}", "fsdp2", "fsdp2+torch.optim"]
    params, grad_bytes = _model_gradients()
    for r in quick_results:
        assert r.suite == "dist" and r.baseline == "ddp" and r.rounds == dist.QUICK_ROUNDS
        assert len(r.round_ms) == dist.QUICK_ROUNDS and r.median_ms > 0 and r.p25_ms <= r.median_ms <= r.p75_ms
        assert r.extra["world_size"] == 2 and r.extra["backend"] == "gloo"
        assert r.extra["params"] == params and r.extra["grad_bytes_fp32"] == grad_bytes
        assert len(r.extra["rank_median_ms"]) == 2 and min(r.extra["rank_median_ms"]) > 0
        cost = r.extra["allreduce_cost_ms"]
        assert set(cost) == {"one_element_ms", "gradients_fp32_ms", "gradients_bf16_ms"} and min(cost.values()) > 0
    assert by["ddp"].speedup_vs_baseline == 1.0 and by["fsdp2"].speedup_vs_baseline > 0
    assert all(r.extra["update_ms_median"] > 0 for r in quick_results)
    assert by["fsdp2"].extra["optimizer"] == "torch_wsl.optim.AdamW"
    assert by["fsdp2+torch.optim"].extra["optimizer"] == "torch.optim.AdamW(fused=True)"
    assert by["ddp"].extra["optimizer"] == "torch_wsl.optim.AdamW"


def test_counted_collectives_match_the_model(quick_results):
    by = {r.contender: r.extra for r in quick_results}
    _, grad_bytes = _model_gradients()
    one_mib = 1 << 20
    assert grad_bytes > one_mib  # so that torch's 1 MiB first bucket splits the default run
    d = by["ddp"]
    # torch's defaults: a 1 MiB first bucket, the rest (under 25 MiB) in a second one; DDP agrees
    assert d["allreduce_calls_per_step"] == 2 == len(d["ddp_bucket_sizes"]) == d["buckets_per_step"]
    assert d["ddp_bucket_sizes"][0] >= one_mib and sum(d["ddp_bucket_sizes"]) == grad_bytes
    assert d["allreduce_bytes_per_step"] == grad_bytes and d["allreduce_dtypes"] == ["float32"]
    b = by["ddp+buckets"]
    assert b["ddp_options"] == {"gradient_as_bucket_view": True, "bucket_cap_mb": 152}
    assert b["allreduce_calls_per_step"] == 1 and b["ddp_bucket_sizes"] == [grad_bytes]  # everything in one
    assert b["allreduce_bytes_per_step"] == grad_bytes
    h = by[f"ddp+buckets+{HALF}"]
    assert h["hook"] == f"{HALF}_compress_hook" and h["allreduce_calls_per_step"] == 1
    assert h["allreduce_bytes_per_step"] == grad_bytes // 2 == h["expected_allreduce_bytes"]  # 2 bytes a gradient
    assert h["allreduce_dtypes"] == [{"bf16": "bfloat16", "fp16": "float16"}[HALF]]
    for e in (d, b, h):  # the same every step once the buckets are built
        assert e["counts_by_step"][1]["all_reduce_bytes"] == e["counts_by_step"][2]["all_reduce_bytes"]
    f = by["fsdp2"]["collectives_per_step"]
    layers = dist.SHAPES["quick"].layers
    # forward gathers every group (root + layers), backward the layers again; one reduce-scatter per group
    assert f["_allgather_base_"][0] == 2 * layers + 1 and f["_reduce_scatter_base_"][0] == layers + 1
    assert f["_reduce_scatter_base_"][1] == grad_bytes  # the full gradients, scattered


def test_json_round_trip_and_report(quick_results, tmp_path):
    path = tmp_path / "dist.json"
    harness.write_json(path, {"processor": "test"}, {"best_gbps": 1.0, "kernel": "k", "threads": 1}, quick_results,
                       ["python", "-m", "benchmarks", "--suite", "dist", "--quick"], {"rounds": dist.QUICK_ROUNDS})
    doc = json.loads(path.read_text())
    assert [harness.result_from_dict(r) for r in doc["results"]] == quick_results
    md = report.markdown(path)
    assert "dist suite:" in md and "| all-reduces/step |" in md
    row = next(line for line in md.splitlines() if line.startswith("| ddp+buckets |"))
    assert row.split(" | ")[4:6] == ["1", f"{quick_results[0].extra['grad_bytes_fp32'] / 2**20:.2f}"]
    text = dist.format_report(quick_results)
    assert "2 processes, gloo on the CPU" in text and "fsdp2" in text and "reduce_scatter_base 3" in text


def test_options_and_refusals():
    from benchmarks.__main__ import parse_args

    a = parse_args(["--suite", "dist", "--dist-contenders", "ddp,fsdp2", "--dist-bucket-mb", "64"])
    assert a.suite == ["dist"] and a.dist_contenders == ["ddp", "fsdp2"] and a.dist_bucket_mb == 64
    with pytest.raises(SystemExit, match="unknown contenders"):
        dist._contenders(_args(dist_contenders=["ddp", "zero3"]))
    assert dist.run(_args(device="cuda")) == []  # gloo on the CPU only: said, not run
