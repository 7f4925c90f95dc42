"""torch_wsl.distributed: the WSL2 NCCL rules per fixture tree, init_process_group in spawned processes,
DDP's bucket options, bf16 gradient compression (fp16 where torch's DDP refuses bf16) and the collective
counter (gloo; NCCL variants skip without GPUs)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import BACKENDS, device_for, run_workers
from env_fixtures import fx, variant
import torch_wsl.distributed as twd
from torch_wsl import env as E
from torch_wsl.env.settings import DDP_BUCKET_CAP_MB_WSL2, NCCL_SHM_MIN_BYTES

ROOT = Path(__file__).resolve().parents[1]
#: DDP accepts torch's bf16 hook only on CUDA builds with NCCL 2.10+ (the torch-2.13 CI venv is CPU-only): fp16 there.
COMPRESS = torch.bfloat16 if twd.bf16_hook_supported() else torch.float16
COMPRESS_NAME = str(COMPRESS).replace("torch.", "")
WSL2_MULTI_GPU = {"NCCL_SHM_DISABLE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}


# --------------------------------------------------------------------------- the rules, per fixture tree


def test_wsl2_with_two_gpus_gets_every_rule_with_its_source():
    e = fx("wsl2_two_gpus")
    assert twd.recommended_env(e) == WSL2_MULTI_GPU
    why = twd.recommended_env_reasons(e)
    assert set(why) == set(WSL2_MULTI_GPU)
    assert "microsoft/WSL#12467" in why["NCCL_SHM_DISABLE"] and "NVIDIA/nccl#1518" in why["NCCL_SHM_DISABLE"]
    assert "/dev/shm is" not in why["NCCL_SHM_DISABLE"]  # 7.8 GiB here: the size is not a reason
    assert "peer-to-peer" in why["NCCL_P2P_DISABLE"] and "/sys/class/infiniband" in why["NCCL_IB_DISABLE"]


def test_small_dev_shm_is_named_as_a_reason(tmp_path):
    e = variant(tmp_path, "wsl2_two_gpus",
                {"proc/mounts": "shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size=65536k 0 0\n"})
    assert twd.recommended_env(e) == WSL2_MULTI_GPU
    why = twd.recommended_env_reasons(e)["NCCL_SHM_DISABLE"]
    assert "/dev/shm is 64 MiB" in why and "--shm-size=1g" in why
    assert NCCL_SHM_MIN_BYTES == 1 << 30 and E.doctor.LOW_SHM_BYTES == NCCL_SHM_MIN_BYTES  # one threshold


def test_infiniband_devices_keep_nccl_probing(tmp_path):
    with_ib = variant(tmp_path / "a", "wsl2_two_gpus", {"sys/class/infiniband/mlx5_0": ""})
    assert twd.recommended_env(with_ib) == {"NCCL_SHM_DISABLE": "1", "NCCL_P2P_DISABLE": "1"}
    unknown = variant(tmp_path / "b", "wsl2_two_gpus", {"sys/class/infiniband": "unlistable"})
    assert "NCCL_IB_DISABLE" not in twd.recommended_env(unknown)  # cannot tell: leave NCCL to decide


def test_user_set_variables_are_never_overridden():
    e = fx("wsl2_two_gpus")
    same = E.Env(e.root, {**e.environ, "NCCL_SHM_DISABLE": "1"})
    assert twd.recommended_env(same) == {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
    assert "NCCL_SHM_DISABLE" not in twd.recommended_env_reasons(same)  # already what torch_wsl wants
    other = E.Env(e.root, {**e.environ, "NCCL_IB_DISABLE": "0"})
    assert twd.recommended_env(other) == {"NCCL_SHM_DISABLE": "1", "NCCL_P2P_DISABLE": "1"}
    assert twd.recommended_env_reasons(other)["NCCL_IB_DISABLE"].startswith("kept your NCCL_IB_DISABLE=0")


def test_this_machines_cached_advice_drops_what_was_set_since(monkeypatch):
    from torch_wsl.distributed import process_group as pg

    wsl2 = E.recommended_settings(fx("wsl2_two_gpus"))  # as if this machine had probed so (the probes are cached)
    monkeypatch.setattr(pg, "_settings", lambda env: wsl2)
    for name in WSL2_MULTI_GPU:
        monkeypatch.delenv(name, raising=False)
    assert twd.recommended_env() == WSL2_MULTI_GPU
    monkeypatch.setenv("NCCL_SHM_DISABLE", "0")
    assert twd.recommended_env() == {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
    assert set(twd.recommended_env_reasons()) == {"NCCL_P2P_DISABLE", "NCCL_IB_DISABLE"}


def test_no_changes_on_native_linux_or_with_one_gpu(tmp_path):
    assert twd.recommended_env(fx("native_linux")) == {}
    smi = (Path(fx("wsl2_two_gpus").root) / "_fixture/commands/nvidia-smi.txt").read_text()
    two = variant(tmp_path, "native_linux", {"_fixture/commands/nvidia-smi.txt": smi},
                  torch_facts={"device": {"available": True, "count": 2}})
    assert E.probe_all(two).gpu_count == 2 and twd.recommended_env(two) == {}  # native: NCCL's own detection
    assert twd.recommended_env(fx("wsl2_gpu")) == {}  # WSL2, one GPU: no inter-GPU traffic
    assert twd.recommended_env_reasons(fx("wsl2_gpu")) == {}


def test_unknown_gpu_count_under_wsl2_assumes_several(tmp_path):
    e = variant(tmp_path, "wsl2_two_gpus", {"_fixture/commands/nvidia-smi.json": {"timed_out": True}},
                remove=("_fixture/commands/nvidia-smi.txt",), torch_facts={"device": None})
    assert E.probe_all(e).gpu_count is None
    assert twd.recommended_env(e) == WSL2_MULTI_GPU
    c = next(c for c in E.run_doctor(e).checks if c.name == "nccl")
    assert c.status == "warn" and "GPU count unknown" in c.found


def test_ddp_options_per_platform():
    assert twd.ddp_options(fx("wsl2_two_gpus")) == {"gradient_as_bucket_view": True, "bucket_cap_mb": 152}
    assert DDP_BUCKET_CAP_MB_WSL2 == 152  # 40M float32 gradients, in MiB
    assert twd.ddp_options(fx("native_linux")) == {"gradient_as_bucket_view": True}
    assert twd.ddp_options(platform="wsl2") == twd.ddp_options(fx("wsl2_two_gpus"))
    assert "Megatron-Core" in E.recommended_settings(fx("wsl2_two_gpus")).reasons["ddp_bucket_cap_mb"]
    with pytest.raises(ValueError, match="platform must be one of"):
        twd.ddp_options(platform="windows")


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(TypeError, match="compress_gradients: ddp_model must be a .*DistributedDataParallel"):
        twd.compress_gradients(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="count_collectives: ddp_model"):
        twd.count_collectives(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16 or torch.float16, got torch.float32"):
        twd.compression_hook(torch.float32)


def test_import_is_separate_and_cheap():
    code = ("import sys, torch_wsl; assert 'torch_wsl.distributed' not in sys.modules; "
            "import torch_wsl.distributed; "
            "bad = [m for m in sys.modules if m.startswith('torch.distributed.tensor') or 'ddp_comm_hooks' in m]; "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- init_process_group, spawned


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _init_body(rank, world_size, init_method, transport):
    import torch.distributed as dist

    from torch_wsl.distributed import process_group as pg

    # This machine is native Linux: recommend what the WSL2 two-GPU tree gets.
    pg._settings = lambda env: E.recommended_settings(fx("wsl2_two_gpus"))
    os.environ["NCCL_P2P_DISABLE"] = "0"  # the user's choice, to be kept
    for name in ("NCCL_SHM_DISABLE", "NCCL_IB_DISABLE"):
        os.environ.pop(name, None)
    log = _Lines()
    logging.getLogger("torch_wsl.distributed").addHandler(log)
    logging.getLogger("torch_wsl.distributed").setLevel(logging.INFO)

    setup = twd.init_process_group(init_method=init_method, rank=rank, world_size=world_size)
    out = {"backend": setup.backend, "why": setup.backend_reason, "applied": setup.applied, "kept": setup.kept,
           "reasons": setup.reasons, "torch_backend": dist.get_backend(), "log": list(log.lines),
           "env": {k: os.environ.get(k) for k in WSL2_MULTI_GPU}}
    device = device_for(transport, rank)
    t = torch.full((3,), float(rank + 1), device=device)
    dist.all_reduce(t)
    c = torch.full((2,), float(rank + 1))  # a CPU tensor: Gloo serves it under NCCL too
    dist.all_reduce(c)
    out["sums"] = (t.cpu().tolist(), c.tolist())

    # A second init fails exactly as torch's does, and leaves no variable it set behind.
    os.environ.pop("NCCL_IB_DISABLE")
    try:
        twd.init_process_group(init_method=init_method + "-again", rank=rank, world_size=world_size)
    except ValueError as e:
        out["twice"] = str(e)
    out["ib_after_failure"] = os.environ.get("NCCL_IB_DISABLE")
    dist.destroy_process_group()

    # An explicit backend is the caller's; the environment still comes first.
    again = twd.init_process_group("gloo", init_method=init_method + "-gloo", rank=rank, world_size=world_size)
    out["explicit"] = (again.backend, again.backend_reason, again.applied)
    dist.barrier()
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_process_group_applies_env_picks_backend_and_reports(backend):
    results = run_workers(_init_body, backend=backend, init_group=False, transport=backend)
    for rank, r in enumerate(results):
        expected = "gloo" if backend == "gloo" else "cuda:nccl,cpu:gloo"
        assert r["backend"] == expected and r["torch_backend"] == expected
        if backend == "gloo":  # this machine: a CUDA build without a GPU, or a CPU build (torch-2.13 CI)
            assert r["why"] == ("no CUDA GPU is visible" if torch.distributed.is_nccl_available()
                                else "this torch build has no NCCL")
        else:
            assert "NCCL for CUDA tensors" in r["why"]
        assert r["applied"] == {"NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
        assert r["kept"] == {"NCCL_P2P_DISABLE": "0"} and r["env"]["NCCL_P2P_DISABLE"] == "0"
        assert r["env"]["NCCL_SHM_DISABLE"] == "1" and r["env"]["NCCL_IB_DISABLE"] == "1"
        assert "microsoft/WSL#12467" in r["reasons"]["NCCL_SHM_DISABLE"]
        assert r["reasons"]["NCCL_P2P_DISABLE"].startswith("kept your NCCL_P2P_DISABLE=0")
        assert len(r["log"]) == 1 and f"backend {expected}" in r["log"][0]
        assert "NCCL_SHM_DISABLE=1" in r["log"][0] and "kept NCCL_P2P_DISABLE=0" in r["log"][0]
        assert r["sums"] == ([3.0] * 3, [3.0] * 2)
        assert r["twice"] == "trying to initialize the default process group twice!"
        assert r["ib_after_failure"] is None
        assert r["explicit"] == ("gloo", "given by the caller", {"NCCL_IB_DISABLE": "1"})


# --------------------------------------------------------------------------- DDP: buckets, compression, counts

#: 8 bias-free 512x512 float32 layers: 8 gradients of exactly 1 MiB each.
LAYERS, WIDTH = 8, 512


def _layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])


def _ddp_body(rank, world_size, steps):
    """One spawn for every DDP check (a spawn costs seconds of imports)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(rank))
    out = {}
    cases = {"default": ({}, None), "cap2": ({"bucket_cap_mb": 2}, None), "cap3": ({"bucket_cap_mb": 3}, None),
             "wsl2": (twd.ddp_options(platform="wsl2"), None),
             "half": ({"bucket_cap_mb": 2}, twd.compression_hook(COMPRESS))}
    for name, (options, hook) in cases.items():
        model = DDP(_layers(), **options)
        counter = twd.count_collectives(model, hook=hook)
        per_step = []
        for _ in range(3):  # DDP builds its buckets by gradient order in the first backward: count after it
            model(x).square().mean().backward()
            c = counter.take()
            per_step.append((c.buckets, c.all_reduces, c.all_reduce_bytes, c.dtypes))
        out[name] = per_step
    # record_collectives sees explicit collectives with their dtype
    import torch.distributed as dist

    with twd.record_collectives() as rec:
        dist.all_reduce(torch.ones(10, dtype=torch.float16))
        dist.broadcast(torch.ones(3), src=0)
    c = rec.take()
    out["recorded"] = (c.all_reduces, c.all_reduce_bytes, c.ops.get("broadcast_"), c.dtypes, rec.take().all_reduces)
    out["losses"] = _train_with_and_without_compression(rank, world_size, steps)
    if not twd.bf16_hook_supported():  # torch's refusal reaches the user through either entry point
        refused = []
        bf16 = twd.compression_hook(torch.bfloat16)
        for register in (twd.compress_gradients, lambda m: twd.count_collectives(m, bf16)):
            try:
                register(DDP(_layers()))
            except TypeError as e:
                refused.append("BF16 all reduce communication hook required" in str(e))
        out["bf16_refused"] = refused
    return out


TRAIN_STEPS = 25


@pytest.fixture(scope="module")
def ddp_results():
    return run_workers(_ddp_body, steps=TRAIN_STEPS)


def test_count_collectives_buckets_and_bytes(ddp_results):
    fp32 = LAYERS * WIDTH * WIDTH * 4
    for r in ddp_results:
        for name in ("default", "cap2", "cap3", "wsl2", "half"):
            assert r[name][0][2] == r[name][1][2]  # the bytes: the same from the first step
        for step in (1, 2):
            # torch's default: a 1 MiB first bucket, then 25 MiB ones: [1, 7] MiB
            assert r["default"][step] == (2, 2, fp32, ("float32",))
            assert r["cap2"][step] == (4, 4, fp32, ("float32",))  # a bucket closes once it holds >= 2 MiB
            assert r["cap3"][step] == (3, 3, fp32, ("float32",))  # [3, 3, 2] MiB
            assert r["wsl2"][step] == (1, 1, fp32, ("float32",))  # 152 MiB: everything in one all-reduce
            assert r["half"][step] == (4, 4, fp32 // 2, (COMPRESS_NAME,))  # same buckets, half the bytes
        assert r["recorded"] == (1, 20, [1, 12], ("float16",), 0)


def _train_with_and_without_compression(rank, world_size, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import torch_wsl

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own half of the batch
    xs = [torch.randn(16, 32, generator=g) for _ in range(steps)]
    ys = [x[:, :1].sin() + 0.1 * x[:, 1:2] for x in xs]
    losses = {}
    for name in ("fp32", "half"):
        model = DDP(copy_of(base), **twd.ddp_options(platform="wsl2"))
        if name == "half":
            hook = twd.compress_gradients(model, dtype=COMPRESS)
            assert hook.__name__ == f"{'bf16' if COMPRESS == torch.bfloat16 else 'fp16'}_compress_hook"
        opt = torch_wsl.optim.AdamW(model.parameters(), lr=1e-2)
        run = []
        for x, y in zip(xs, ys):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch_wsl.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses[name] = run
        # the replicas agree after every step, compressed or not
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), name
    return losses


def copy_of(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


def test_compression_trains_like_float32(ddp_results):
    for r in ddp_results:
        assert r.get("bf16_refused", [True, True]) == [True, True]
        fp32, half = r["losses"]["fp32"], r["losses"]["half"]
        assert half[0] == fp32[0]  # the same start
        assert fp32[-1] < 0.5 * fp32[0] and half[-1] < 0.5 * half[0]  # both learn
        for a, b in zip(fp32, half):
            assert abs(a - b) <= 0.05 * a + 1e-4, (fp32, half)  # 16-bit gradients: close, not equal
        assert fp32 != half  # compression did happen
