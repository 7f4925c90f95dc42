"""torch_wsl.memory: policy parsing, the standalone allocator on the simulated
backend, traces and replay, the CPU tensor allocator under real models
(transformers GPT-2, torchvision ResNet), pinned-memory fallback, and the
CUDA installation rules (GPU cases skip without one)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import torch_wsl
import torch_wsl.memory as twm
from torch_wsl.memory import _conf

from conftest import HAS_CUDA_KERNELS, HAS_GPU, cuda_only

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cpu_allocator(monkeypatch):
    """Enables the CPU caching allocator for one test and always puts the default back."""
    monkeypatch.delenv(_conf.ALLOC_CONF_ENV, raising=False)
    yield twm
    twm.disable("cpu")


def run_python(code: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------- policy

def test_parse_size():
    assert _conf.parse_size("512M") == 512 * MiB
    assert _conf.parse_size("8GiB") == 8 * GiB
    assert _conf.parse_size(4096) == 4096
    assert _conf.parse_size("1.5K") == 1536
    with pytest.raises(ValueError):
        _conf.parse_size("12 parsecs")
    with pytest.raises(ValueError):
        _conf.parse_size(-1)


def test_alloc_conf_prefixes_and_precedence():
    text = "large_segment_size:40M, cuda.budget:90%, cpu.large_segment_size:60M, pinned.budget:256M, huge_pages:false"
    assert _conf.parse_alloc_conf(text, "cpu") == {"large_segment_size": 60 * MiB, "huge_pages": False}
    assert _conf.parse_alloc_conf(text, "cuda") == {"large_segment_size": 40 * MiB, "budget": "90%", "huge_pages": False}
    with pytest.raises(ValueError, match="unknown device prefix"):
        _conf.parse_alloc_conf("gpu.budget:1G", "cpu")
    with pytest.raises(ValueError, match="key:value"):
        _conf.parse_alloc_conf("budget", "cpu")
    # defaults < environment < keyword arguments
    core, extras = _conf.resolve_policy(
        "cuda", {"small_segment_size": 4 * MiB}, environ={_conf.ALLOC_CONF_ENV: "cuda.budget:80%,small_segment_size:8M"},
        defaults={"budget": 0.9})
    assert core == {"small_segment_size": 4 * MiB, "budget_fraction": 0.8, "budget_bytes": 0}
    core, _ = _conf.resolve_policy("cuda", {"budget": "6G"}, environ={})
    assert core == {"budget_bytes": 6 * GiB, "budget_fraction": 0.0}
    core, extras = _conf.resolve_policy("pinned", {}, environ={}, defaults={"budget": 512 * MiB})
    assert core == {} and extras == {"pinned_budget_bytes": 512 * MiB}
    with pytest.raises(ValueError, match="unknown allocator policy"):
        _conf.resolve_policy("cpu", {"expandable_segments": True}, environ={})


# ---------------------------------------------------------------- the standalone allocator

def test_standalone_allocator_caches_and_empty_cache_returns_memory():
    sim = twm.SimulatedBackend(capacity=GiB)
    a = twm.CachingAllocator(sim)
    ptrs = [a.malloc(n) for n in (100, 5000, 3 * MiB, 12 * MiB)]
    s = a.stats()
    assert s["allocation.all.current"] == 4
    assert s["requested_bytes.all.current"] == 100 + 5000 + 3 * MiB + 12 * MiB
    assert s["allocated_bytes.all.current"] == a._impl.round_size(100) + a._impl.round_size(5000) + 3 * MiB + 12 * MiB
    calls = s["num_device_alloc"]
    for p in ptrs:
        a.free(p)
    for _ in range(3):  # the same pattern again: served from the cache
        ptrs = [a.malloc(n) for n in (100, 5000, 3 * MiB, 12 * MiB)]
        for p in ptrs:
            a.free(p)
    s = a.stats()
    assert s["num_device_alloc"] == calls and s["num_device_free"] == 0
    assert s["reserved_bytes.all.current"] == sim.counters()["live_bytes"] > 0
    a.empty_cache()
    s = a.stats()
    assert s["reserved_bytes.all.current"] == 0 and sim.counters()["live_bytes"] == 0
    assert s["num_device_free"] == calls


def test_standalone_out_of_memory_is_torch_oom_with_statistics():
    a = twm.CachingAllocator(twm.SimulatedBackend(capacity=64 * MiB))
    keep = a.malloc(40 * MiB)
    with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 40\.00 MiB.*Allocated: 40\.00 MiB"):
        a.malloc(40 * MiB)
    assert a.stats()["num_ooms"] == 1
    a.free(keep)


def test_standalone_budget_fails_fast_without_asking_the_device():
    sim = twm.SimulatedBackend(capacity=GiB)
    a = twm.CachingAllocator(sim, budget="32M")
    assert a.budget == 32 * MiB
    with pytest.raises(torch.OutOfMemoryError, match="budget"):
        a.malloc(40 * MiB)
    assert sim.counters()["alloc_calls"] == 0
    assert a.set_budget(fraction=0.5) == GiB // 2
    p = a.malloc(40 * MiB)
    a.free(p)


def test_standalone_record_stream_defers_reuse():
    sim = twm.SimulatedBackend()
    a = twm.CachingAllocator(sim)
    p = a.malloc(4096)
    a.record_stream(p, 5)
    sim.submit_work(5)
    a.free(p)
    assert [b["state"] for s in a.snapshot() for b in s["blocks"] if b["address"] == p] == ["active_pending_free"]
    q = a.malloc(4096)
    assert q != p
    sim.complete_work(5)
    assert a.malloc(4096) == p


def test_standalone_snapshot_trace_and_errors():
    a = twm.CachingAllocator("simulated", trace_capacity=8)
    p = a.malloc(1000)
    snap = a.snapshot()
    assert len(snap) == 1 and snap[0]["segment_type"] == "small" and snap[0]["total_size"] == 2 * MiB
    assert snap[0]["blocks"][0] == {"address": p, "size": 1024, "requested_size": 1000, "state": "active_allocated"}
    assert [e["action"] for e in a.trace()] == ["segment_alloc", "alloc"]
    with pytest.raises(ValueError, match="not allocated by this allocator"):
        a.free(p + 512)
    with pytest.raises(ValueError, match="unknown allocator policy"):
        twm.CachingAllocator("simulated", no_such_thing=1)
    with pytest.raises(ValueError, match="min_block_size must be a power of two"):
        twm.CachingAllocator("simulated", min_block_size=1000)
    a.free(p)


def test_host_backend_memory_is_real():
    a = twm.CachingAllocator("host", min_block_size=64)
    p = a.malloc(3 * MiB)
    ctypes.memset(p, 0x5A, 3 * MiB)
    assert ctypes.string_at(p + 3 * MiB - 4, 4) == b"\x5a" * 4
    a.free(p)
    a.empty_cache()
    assert a.backend.alloc_calls == a.backend.free_calls == 1


# ---------------------------------------------------------------- traces and replay

def _synthetic_trace(steps: int = 4) -> twm.Trace:
    events = [("alloc", 0, 20 * MiB)]  # "weights": live across steps
    nid = 1
    for _ in range(steps):
        ids = []
        for n in (4, 300, 70 * KiB, 2 * MiB, 5 * MiB, 11 * MiB, 513):
            events.append(("alloc", nid, n))
            ids.append(nid)
            nid += 1
        events += [("free", i, 0) for i in reversed(ids)]
        events.append(("step", 0, 0))
    events.append(("free", 0, 0))
    return twm.Trace.from_events(events)


def test_replay_caching_vs_no_caching(tmp_path):
    trace = _synthetic_trace()
    assert trace.num_steps == 4 and len(trace) == 1 + 4 * 15 + 1
    cached = twm.replay(trace, twm.CachingAllocator("simulated"), passes=2)
    assert cached["backend_calls_per_steady_step"] == 0
    assert cached["steps"][0]["device_allocs"] > 0
    assert cached["peak_requested"] == 20 * MiB + 4 + 300 + 70 * KiB + 18 * MiB + 513
    assert 1.0 <= cached["fragmentation"] < 2.0
    assert cached["ns_per_malloc_free"] > 0
    none = twm.replay(trace, twm.NoCachingAllocator("simulated"))
    assert none["backend_calls_per_steady_step"] == 14  # 7 mallocs + 7 frees, every step
    trace.save(tmp_path / "t.bin")
    back = twm.Trace.load(tmp_path / "t.bin")
    assert back.events() == trace.events()


# ---------------------------------------------------------------- the CPU tensor allocator

def test_cpu_allocator_serves_tensors_and_stats_move(cpu_allocator):
    before = torch.randn(1000)  # allocated by the default allocator, freed later through its own deleter
    twm.enable("cpu")
    assert twm.is_enabled("cpu")
    s0 = twm.stats("cpu")
    x = torch.empty(1024, 1024)
    s1 = twm.stats("cpu")
    assert s1["allocation.all.current"] == s0["allocation.all.current"] + 1
    assert s1["requested_bytes.all.current"] - s0["requested_bytes.all.current"] == 4 * MiB
    assert x.data_ptr() % 64 == 0
    del before
    y = x * 2
    del x, y
    s2 = twm.stats("cpu")
    assert s2["allocation.all.current"] == s0["allocation.all.current"]
    assert s2["reserved_bytes.all.current"] > 0
    calls = s2["num_device_alloc"]
    for _ in range(5):
        z = torch.empty(1024, 1024) + 1
        del z
    assert twm.stats("cpu")["num_device_alloc"] == calls  # cached
    survivor = torch.ones(10)
    twm.empty_cache("cpu")
    s3 = twm.stats("cpu")
    assert s3["num_device_free"] > 0 and s3["reserved_bytes.all.current"] < s2["reserved_bytes.all.current"]
    summary = twm.memory_summary("cpu")
    assert "Reserved memory" in summary and "backend calls" in summary
    assert twm.disable("cpu") is True
    assert survivor.sum().item() == 10  # outlives the allocator's turn
    with pytest.raises(RuntimeError, match=r"enable\('cpu'\)"):
        twm.stats("cpu")


def test_cpu_allocator_policy_from_environment(cpu_allocator, monkeypatch):
    monkeypatch.setenv(_conf.ALLOC_CONF_ENV, "cpu.large_segment_size:40M,cuda.large_segment_size:80M")
    twm.enable("cpu", small_segment_size=4 * MiB)
    policy = torch_wsl._C._alloc.cpu_current().policy
    assert policy["large_segment_size"] == 40 * MiB and policy["small_segment_size"] == 4 * MiB


def test_cpu_budget_raises_torch_oom(cpu_allocator):
    twm.enable("cpu", budget="64M")
    a = torch.empty(8 * MiB, dtype=torch.uint8)
    with pytest.raises(torch.OutOfMemoryError, match="budget of 64.00 MiB"):
        torch.empty(80 * MiB, dtype=torch.uint8)
    assert twm.stats("cpu")["num_ooms"] == 1
    del a


def _train_gpt2(steps: int = 3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def _train_resnet(steps: int = 2):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("train", [_train_gpt2, _train_resnet], ids=["gpt2", "resnet18"])
def test_cpu_allocator_trains_real_models_identically(cpu_allocator, train):
    ref_losses, ref_params = train()
    twm.enable("cpu")
    losses, params = train()
    s = twm.stats("cpu")
    assert s["allocation.all.allocated"] > 100  # the model really ran on torch_wsl's allocator
    assert s["num_device_alloc"] < s["allocation.all.allocated"] / 10  # and mostly from the cache
    # The same arithmetic on the same data: bit-identical results.
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))


def test_record_trace_of_a_real_step_replays_without_steady_backend_calls(cpu_allocator):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256,
                                                                 n_positions=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 32))
    with twm.record_trace() as trace:
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            trace.step()
    assert trace.num_steps == 4
    kinds = [e[0] for e in trace.events()]
    assert kinds.count("alloc") > 100 and kinds.count("free") > 100
    result = twm.replay(trace, twm.CachingAllocator("simulated"), passes=2)
    assert result["backend_calls_per_steady_step"] == 0
    none = twm.replay(trace, twm.NoCachingAllocator("simulated"))
    assert none["backend_calls_per_steady_step"] > 100
    assert result["fragmentation"] >= 1.0
    # Recording works with torch_wsl's CPU allocator underneath too.
    twm.enable("cpu")
    with twm.record_trace() as trace2:
        torch.empty(1000) + 1
    assert [e[0] for e in trace2.events()].count("alloc") >= 2


# ---------------------------------------------------------------- pinned memory

@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="build without CUDA")
def test_pinned_pool_falls_back_to_a_separate_pageable_pool_with_one_warning():
    pool = twm.PinnedPool(budget=0)  # no pinned budget at all: the driver is never asked
    with pytest.warns(RuntimeWarning, match="falls back to pageable memory.*budget"):
        p = pool.malloc(64 * KiB)  # a small-pool segment
    ctypes.memset(p, 1, 64 * KiB)  # real memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = pool.malloc(3 * MiB)  # a large-pool segment: no second warning
    counters = pool.counters()
    assert counters["pinned_segments"] == 0 and counters["driver_refusals"] == 0
    assert counters["budget_refusals"] >= 2
    s = pool.stats()
    assert s["segment.all.current"] == 0 and s["reserved_bytes.all.current"] == 0  # nothing in the pinned pool
    assert s["pageable_fallback.segment"] == 2 and s["pageable_fallback.allocation"] == 2
    pool.free(p)
    pool.free(q)
    with pytest.raises(ValueError, match="not allocated by this pinned pool"):
        pool.free(p)
    pool.empty_cache()
    assert pool.stats()["pageable_fallback.reserved_bytes"] == 0


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="build without CUDA")
def test_cuda_free_entry_point_never_throws():
    # torch_wsl_free is a deleter: an unknown pointer or a bad device index is
    # reported and counted, never raised (that would terminate the process).
    # No GPU needed: nothing reaches the driver.
    r = run_python("""
        import ctypes, torch_wsl, torch_wsl.memory as twm
        lib = ctypes.CDLL(torch_wsl._C.__file__)
        free = lib.torch_wsl_free
        free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
        free(ctypes.c_void_p(0x1234), 16, 0, None)     # not a pointer torch_wsl handed out
        free(ctypes.c_void_p(0x5678), 16, 999, None)   # no such device
        free(None, 0, 0, None)                         # freeing nothing is not an error
        print("ERRORS", twm._A.cuda_deleter_errors())
    """)
    assert r.returncode == 0, r.stderr
    assert "ERRORS 2" in r.stdout
    assert r.stderr.count("torch_wsl allocator: freeing memory failed") == 1  # printed once, counted always


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="build without CUDA")
def test_pinned_only_allocator_raises_past_its_budget():
    a = twm.CachingAllocator(torch_wsl._C._alloc.PinnedHostBackend(0))
    with pytest.raises(torch.OutOfMemoryError):
        a.malloc(4 * KiB)


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU fallback")
def test_pinned_empty_without_gpu_is_pageable():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        t = twm.pinned_empty(4, 5, dtype=torch.float16)
        u = twm.pin(torch.arange(6.0))
    assert t.shape == (4, 5) and t.dtype == torch.float16 and not t.is_pinned()
    assert torch.equal(u, torch.arange(6.0))


# ---------------------------------------------------------------- CUDA installation rules

@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="build without CUDA")
def test_enable_cuda_after_cuda_initialized_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setitem(twm._enabled, "cuda", False)
    with pytest.raises(RuntimeError, match=r"must run before CUDA is initialized.*first thing"):
        twm.enable("cuda")
    with pytest.raises(ValueError, match="expandable_segments"):
        twm.enable("cuda", expandable_segments=True)


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="build without CUDA")
def test_enable_cuda_installs_the_pluggable_allocator():
    # In a fresh process: the swap must happen before CUDA starts.
    r = run_python("""
        import torch, torch_wsl, torch_wsl.memory as twm
        twm.enable("cuda", budget="1G")
        assert twm.is_enabled("cuda")
        import torch._inductor.config as inductor_config
        assert not inductor_config.triton.cudagraph_trees  # graph trees need the native allocator
        name = torch.cuda.memory.get_allocator_backend() if hasattr(torch.cuda.memory, "get_allocator_backend") else ""
        print("OK", name)
        if torch.cuda.is_available():
            x = torch.empty(1 << 20, device="cuda")
            s = twm.stats("cuda")
            assert s["allocated_bytes.all.current"] >= 4 << 20, s
            assert s["budget_bytes"] == 1 << 30
            del x
            torch.cuda.empty_cache()     # routed to torch_wsl's allocator
            assert twm.stats("cuda")["reserved_bytes.all.current"] == 0
            try:
                torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
                raise SystemExit("expected OutOfMemoryError")
            except torch.OutOfMemoryError as e:
                assert "budget" in str(e), str(e)
            print("GPU OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    if HAS_GPU:
        assert "GPU OK" in r.stdout


@cuda_only
@pytest.mark.cuda
def test_cuda_record_stream_and_pinned_dataloader():
    r = run_python("""
        import torch, torch_wsl, torch_wsl.memory as twm
        twm.enable("cuda")
        twm.enable("pinned", budget="64M")
        side = torch.cuda.Stream()
        x = torch.ones(1 << 20, device="cuda")
        with torch.cuda.stream(side):
            y = x * 2
        x.record_stream(side)
        del x
        torch.cuda.synchronize()
        assert torch.equal(y.cpu(), torch.full((1 << 20,), 2.0))
        ds = torch.utils.data.TensorDataset(torch.randn(64, 128))
        loader = torch.utils.data.DataLoader(ds, batch_size=16, pin_memory=True)
        for (b,) in loader:
            assert b.is_pinned()
            b.to("cuda", non_blocking=True)
        assert twm.stats("pinned")["num_device_alloc"] >= 1
        t = twm.pinned_empty(1000)
        assert t.is_pinned()
        # Non-blocking copies of ordinary (pageable) tensors ask the host allocator too.
        z = torch.arange(1 << 16, dtype=torch.float32).to("cuda", non_blocking=True)
        assert torch.equal(z.cpu(), torch.arange(1 << 16, dtype=torch.float32))
        print("GPU OK", twm.measure_driver_cost(reps=5))
    """)
    assert r.returncode == 0, r.stderr
    assert "GPU OK" in r.stdout


@cuda_only
@pytest.mark.cuda
def test_cuda_pinned_fallback_blocks_never_come_back_as_pinned():
    r = run_python("""
        import warnings, torch, torch_wsl, torch_wsl.memory as twm
        twm.enable("pinned", budget="4M", probe_ceiling=False)
        a = torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            b = torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True)  # over the budget: pageable
        assert a.is_pinned() and not b.is_pinned(), (a.is_pinned(), b.is_pinned())
        assert any("pageable" in str(x.message) for x in w)
        del b, a  # the pageable block goes back to its own pool
        c = torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True)
        d = torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True)
        assert c.is_pinned() and not d.is_pinned(), (c.is_pinned(), d.is_pinned())
        s = twm.stats("pinned")
        assert s["pageable_fallback.allocation"] == 1 and s["allocation.all.current"] == 1, s
        print("GPU OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "GPU OK" in r.stdout


@cuda_only
@pytest.mark.cuda
def test_cuda_stats_api_and_cudnn_benchmark_under_torch_wsl():
    # torch.cuda.memory_* answer from torch_wsl's statistics; cuDNN's benchmark
    # mode asks cacheInfo for its workspace (a stock pluggable allocator fails there).
    r = run_python("""
        import torch, torch_wsl, torch_wsl.memory as twm, torchvision
        twm.enable("cuda", budget="8G")
        torch.backends.cudnn.benchmark = True
        model = torchvision.models.resnet18(num_classes=10).cuda()
        x = torch.randn(4, 3, 64, 64, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        loss = model(x).sum()
        loss.backward()
        torch.cuda.synchronize()
        ours = twm.stats("cuda")
        assert torch.cuda.memory_allocated() == ours["allocated_bytes.all.current"] > 0
        assert torch.cuda.memory_reserved() == ours["reserved_bytes.all.current"] > 0
        assert torch.cuda.max_memory_allocated() == ours["allocated_bytes.all.peak"]
        assert torch.cuda.memory_stats()["num_device_alloc"] == ours["num_device_alloc"]
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "memory_allocated"):
            assert torch.accelerator.memory_allocated() == ours["allocated_bytes.all.current"]
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
        assert "Allocated memory" in torch.cuda.memory_summary() or torch.cuda.memory_summary()
        # set_per_process_memory_fraction caps at a fraction of *total* memory, and the byte budget stays.
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(0.5)
        assert twm.stats("cuda")["budget_bytes"] == min(8 << 30, int(total * 0.5)), (twm.stats("cuda")["budget_bytes"], total)
        torch.cuda.set_per_process_memory_fraction(0.001)
        try:
            torch.empty(int(total * 0.01), dtype=torch.uint8, device="cuda")
            raise SystemExit("expected OutOfMemoryError")
        except torch.OutOfMemoryError as e:
            assert "budget" in str(e), str(e)
        # A bad pointer freed through torch's API is reported, not fatal.
        torch.cuda.caching_allocator_delete(12345)
        assert twm.stats("cuda")["num_deleter_errors"] == 1
        print("GPU OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "GPU OK" in r.stdout


@cuda_only
@pytest.mark.cuda
def test_cuda_graph_capture_uses_a_private_pool():
    r = run_python("""
        import torch, torch_wsl, torch_wsl.memory as twm
        twm.enable("cuda")
        twm.enable("pinned", budget="64M", probe_ceiling=False)  # the host allocator takes part in captures too
        static_in = torch.randn(1 << 20, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the capture, as PyTorch recommends
            for _ in range(2):
                tmp = static_in * 2
                out = tmp + 1
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            tmp = static_in * 2     # freed inside the capture: stays in the graph's pool
            static_out = tmp.sin() + 1
            del tmp
        st = twm.stats("cuda")
        assert st["private_pools.current"] == 1 and st["private_pool_reserved_bytes.current"] > 0, st
        # Eager tensors made after the capture must not overlap memory the replays write.
        eager = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(8)]
        for _ in range(3):
            static_in.copy_(torch.randn_like(static_in))
            g.replay()
        torch.cuda.synchronize()
        assert torch.allclose(static_out, (static_in * 2).sin() + 1)
        assert all(bool((e == 7.0).all()) for e in eager)
        # A second graph sharing the pool, make_graphed_callables, then release.
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2, pool=g.pool()):
            out2 = static_in.cos()
        g2.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out2, static_in.cos())
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
        graphed = torch.cuda.make_graphed_callables(mlp, (torch.randn(16, 64, device="cuda"),))
        x = torch.randn(16, 64, device="cuda", requires_grad=True)
        graphed(x).sum().backward()
        torch.cuda.synchronize()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        del g, g2, static_out, out2
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        print("pools after release:", twm.stats("cuda")["private_pools.current"])
        # torch.cuda.MemPool and use_mem_pool use the same private pools; destroying one must not abort.
        if hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool"):
            pool = torch.cuda.MemPool()
            with torch.cuda.use_mem_pool(pool):
                inside = torch.empty(1 << 20, device="cuda")
            assert twm.stats("cuda")["private_pools.current"] >= 1
            del inside, pool
            torch.cuda.empty_cache()
        # torch.compile's CUDA graphs.
        f = torch.compile(lambda t: (t * 3).relu() + 1, mode="reduce-overhead")
        t = torch.randn(4096, device="cuda")
        for _ in range(3):
            y = f(t)
        torch.cuda.synchronize()
        assert torch.allclose(y, (t * 3).relu() + 1)
        print("GPU OK")
    """, timeout=400)
    assert r.returncode == 0, r.stderr
    assert "GPU OK" in r.stdout


# ---------------------------------------------------------------- the benchmark suite's arithmetic

def test_alloc_benchmark_replay_rows_and_targets():
    from benchmarks.suites import alloc

    trace = _synthetic_trace(steps=4)
    rows = alloc._replay_rows("synthetic", trace, call_us=2.0)
    by = {r.contender: r for r in rows}
    assert by["torch_wsl"].extra["backend_calls_per_steady_step"] == 0
    assert by["no caching"].extra["backend_calls_per_steady_step"] == 14
    # Every steady step of "no caching" busy-waits 14 calls x 2 us at least.
    assert by["no caching"].median_ms >= 14 * 2.0 / 1000
    s = alloc.summary(rows)
    assert s["synthetic.backend_calls_per_steady_step"]["met"] is True
    assert s["synthetic.fragmentation"]["value"] == by["torch_wsl"].extra["fragmentation"]
    assert "targets:" in alloc.format_report(rows)
