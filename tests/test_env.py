"""torch_wsl.env: the redirectable root, each probe, the GPU probes' plumbing and recommended_settings.

Fixture trees live in tests/fixtures/env/<name>/ (see torch_wsl/env/_fs.py for
the layout); variants are built in tmp_path so the fixtures stay small.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from env_fixtures import FIXTURES, fx, variant
from torch_wsl import env as E
from torch_wsl.env import _fs
from torch_wsl.env.gpu import probe_pinned_ceiling, probe_vmm
from torch_wsl.env.probes import parse_alloc_conf, parse_size

GiB = 1 << 30
MiB = 1 << 20



def two_gpu_nvidia_smi() -> str:
    """The wsl2_gpu fixture's nvidia-smi output with a second, identical GPU."""
    lines = (FIXTURES / "wsl2_gpu" / "_fixture" / "commands" / "nvidia-smi.txt").read_text().splitlines(keepends=True)
    i = next(k for k, line in enumerate(lines) if line.startswith("|   0 "))
    second = [lines[i].replace("|   0 ", "|   1 ", 1)] + lines[i + 1 : i + 3]
    return "".join(lines[: i + 3] + second + lines[i + 3 :])


def no_run(argv, timeout, environ):  # a runner that must not be used
    raise AssertionError(f"unexpected command: {argv}")


# --------------------------------------------------------------------------- Env


def test_env_reads_through_the_root_and_reports_why_not(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 1 kB\n")
    (tmp_path / "proc" / "mounts").mkdir()
    e = E.Env(tmp_path)
    assert not e.is_real and E.Env().is_real
    assert e.read_text("/proc/meminfo") == "MemTotal: 1 kB\n"
    missing = e.read("/proc/version")
    assert missing.text is None and "missing" in missing.error
    as_dir = e.read("/proc/mounts")
    assert as_dir.text is None and "not a regular file" in as_dir.error
    assert e.exists("/proc/meminfo") is True and e.exists("/proc/nope") is False
    assert e.exists("/proc/meminfo/x") is False  # a file used as a directory
    assert e.listdir("/proc") == ["meminfo", "mounts"] and e.listdir("/nope") is None
    assert e.environ == {}  # no _fixture/env.json: an empty environment, never os.environ


def test_env_never_blocks_on_a_fifo(tmp_path):
    (tmp_path / "proc").mkdir()
    os.mkfifo(tmp_path / "proc" / "meminfo")  # opening a FIFO for reading would block forever
    t0 = time.monotonic()
    got = E.Env(tmp_path).read("/proc/meminfo")
    assert time.monotonic() - t0 < 1.0
    assert got.text is None and "not a regular file" in got.error


def test_env_fixture_environment_and_bad_json(tmp_path):
    assert fx("wsl2_gpu").environ["WSL_DISTRO_NAME"] == "Ubuntu-22.04"
    assert fx("wsl2_gpu", {"A": "1"}).environ == {"A": "1"}
    (tmp_path / "_fixture").mkdir()
    (tmp_path / "_fixture" / "env.json").write_text("{not json")
    e = E.Env(tmp_path)
    assert e.environ == {} and e.fixture("env") is None


def test_run_bounded_times_out_and_never_raises():
    t0 = time.monotonic()
    res = _fs.run_bounded([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, os.environ)
    assert time.monotonic() - t0 < 5.0
    assert res.timed_out and res.returncode is None and not res.ok and "timed out" in res.error
    missing = _fs.run_bounded(["/nonexistent/tool"], 1.0, os.environ)
    assert missing.returncode is None and missing.error == "missing"
    ok = _fs.run_bounded([sys.executable, "-c", "print('hi')"], 10.0, os.environ)
    assert ok.ok and ok.stdout.strip() == "hi"


def test_fixture_commands_need_the_executable_in_the_tree(tmp_path):
    e = fx("wsl2_gpu")
    assert e.run(["/sbin/ldconfig", "-p"], 1).ok
    assert "libcuda.so.1" in e.run(["/sbin/ldconfig", "-p"], 1).stdout
    assert not fx("wsl1").run(["/sbin/ldconfig", "-p"], 1).ok
    v = variant(tmp_path, "wsl2_gpu", {"_fixture/commands/nvidia-smi.json": {"timed_out": True, "error": "timed out after 10 s"}},
                remove=("_fixture/commands/nvidia-smi.txt",))
    res = v.run(["/usr/lib/wsl/lib/nvidia-smi"], 1)
    assert res.timed_out and not res.ok


def test_which_searches_path_in_the_root():
    e = fx("wsl2_gpu")
    assert e.which("nvidia-smi") == "/usr/lib/wsl/lib/nvidia-smi"
    assert e.which("ldconfig") == "/sbin/ldconfig"
    assert e.which("nvcc") is None
    assert fx("wsl1").which("nvidia-smi", ("/usr/lib/wsl/lib",)) is None


# --------------------------------------------------------------------------- WSL


@pytest.mark.parametrize(
    "name, is_wsl, version, kernel",
    [
        ("wsl2_gpu", True, 2, "5.15.167.4-microsoft-standard-WSL2"),
        ("wsl2_no_libcuda_so", True, 2, "5.15.167.4-microsoft-standard-WSL2"),
        ("wsl1", True, 1, "4.4.0-19041-Microsoft"),
        ("native_linux", False, None, "6.8.0-49-generic"),
    ],
)
def test_probe_wsl(name, is_wsl, version, kernel):
    w = E.probe_wsl(fx(name))
    assert (w.is_wsl, w.version, w.kernel) == (is_wsl, version, kernel)
    assert w.errors == ()


def test_probe_wsl_older_wsl2_kernel_and_custom_kernel(tmp_path):
    old = variant(tmp_path, "wsl2_gpu", {"proc/sys/kernel/osrelease": "4.19.128-microsoft-standard\n",
                                         "proc/version": "Linux version 4.19.128-microsoft-standard (oe-user@oe-host)\n"})
    assert (E.probe_wsl(old).is_wsl, E.probe_wsl(old).version) == (True, 2)
    custom = fx("native_linux", {"WSL_INTEROP": "/run/WSL/1_interop", "WSL_DISTRO_NAME": "Arch"})
    w = E.probe_wsl(custom)
    assert (w.is_wsl, w.version, w.distro) == (True, 2, "Arch")


def test_probe_wsl_unknown_when_kernel_files_unreadable(tmp_path):
    (tmp_path / "proc" / "sys" / "kernel" / "osrelease").mkdir(parents=True)
    w = E.probe_wsl(E.Env(tmp_path))
    assert w.is_wsl is None and w.version is None and w.kernel is None
    assert any("osrelease" in e for e in w.errors) and any("/proc/version" in e for e in w.errors)


def test_probe_device_nodes():
    assert E.probe_device_nodes(fx("wsl2_gpu")).dxg is True
    native = E.probe_device_nodes(fx("native_linux"))
    assert native.dxg is False and native.nvidia == ("/dev/nvidia0", "/dev/nvidiactl")  # not nvidia-uvm
    assert not E.probe_device_nodes(fx("wsl1")).any_gpu_node


# --------------------------------------------------------------------------- libcuda / Triton


def test_probe_libcuda_wsl2():
    lc = E.probe_libcuda(fx("wsl2_gpu"))
    assert lc.wsl_lib_dir and lc.wsl_files == {"libcuda.so": True, "libcuda.so.1": True}
    assert lc.wsl_ld_conf is True and lc.cache_dirs == ("/usr/lib/wsl/lib",) and not lc.cache_from_conf
    assert lc.loader_finds is True and lc.foreign_dirs == () and lc.stub_dirs == ()
    missing = E.probe_libcuda(fx("wsl2_no_libcuda_so"))
    assert missing.wsl_files == {"libcuda.so": False, "libcuda.so.1": True} and missing.loader_finds


def test_probe_libcuda_falls_back_to_ld_so_conf_without_ldconfig(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", remove=("sbin/ldconfig",))
    lc = E.probe_libcuda(e)
    assert lc.cache_from_conf and lc.cache_dirs == ("/usr/lib/wsl/lib",) and lc.loader_finds
    assert any("ldconfig" in err for err in lc.errors)


def test_probe_libcuda_finds_foreign_driver_and_stub(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", {"usr/lib/x86_64-linux-gnu/libcuda.so.1": "",
                                       "usr/local/cuda/lib64/stubs/libcuda.so": ""})
    e = E.Env(e.root, {**e.environ, "LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu:/usr/local/cuda/lib64/stubs"})
    lc = E.probe_libcuda(e)
    assert lc.loader_dirs[0] == "/usr/lib/x86_64-linux-gnu"  # LD_LIBRARY_PATH comes first
    assert lc.foreign_dirs == ("/usr/lib/x86_64-linux-gnu",)
    assert lc.stub_dirs == ("/usr/local/cuda/lib64/stubs",)


def test_probe_triton_replays_its_lookup(tmp_path):
    ok = E.probe_triton(fx("wsl2_gpu"))
    assert ok.installed and ok.links == "libcuda.so" and ok.search_dirs == ("/usr/lib/wsl/lib",) and ok.finds
    bad = E.probe_triton(fx("wsl2_no_libcuda_so"))
    assert bad.finds is False and "libcuda.so" in bad.problem and "-lcuda" in bad.problem
    # a Triton that links libcuda.so.1 (triton-lang/triton#8668) is fine without the libcuda.so symlink
    new = variant(tmp_path, "wsl2_no_libcuda_so", torch_facts={"triton": {"version": "3.6.0", "links": "libcuda.so.1"}})
    assert E.probe_triton(new).finds is True
    # TRITON_LIBCUDA_PATH wins over the lookup, also when it is wrong
    wrong = fx("wsl2_gpu", {**fx("wsl2_gpu").environ, "TRITON_LIBCUDA_PATH": "/opt/nowhere"})
    t = E.probe_triton(wrong)
    assert t.search_dirs == ("/opt/nowhere",) and t.finds is False and "no libcuda.so.1 in /opt/nowhere" == t.problem


def test_probe_triton_real_machine_reads_installed_source():
    t = E.probe_triton(E.Env())
    try:
        import importlib.util

        has_triton = importlib.util.find_spec("triton") is not None
    except ImportError:
        has_triton = False
    assert t.installed is has_triton
    if has_triton:
        assert t.links in ("libcuda.so", "libcuda.so.1") and t.version


# --------------------------------------------------------------------------- driver


def test_probe_driver_from_nvidia_smi_and_proc():
    d = E.probe_driver(fx("wsl2_gpu"))
    assert (d.source, d.driver_version, d.cuda_version) == ("nvidia-smi", "566.36", "12.7")
    assert d.gpus == (E.probes.GpuName(0, "NVIDIA GeForce RTX 4090", 24564 * MiB),)
    n = E.probe_driver(fx("native_linux"))
    assert (n.source, n.driver_version, n.cuda_version) == ("/proc/driver/nvidia", "550.127.05", None)
    assert [g.name for g in n.gpus] == ["NVIDIA A100-SXM4-80GB"]
    none = E.probe_driver(fx("wsl1"))
    assert none.source is None and none.driver_version is None


def test_probe_driver_nvidia_smi_timeout_is_unknown(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", {"_fixture/commands/nvidia-smi.json": {"timed_out": True, "error": "timed out after 10 s"}},
                remove=("_fixture/commands/nvidia-smi.txt",))
    d = E.probe_driver(e)
    assert d.source is None and d.driver_version is None and d.nvidia_smi == "/usr/lib/wsl/lib/nvidia-smi"
    assert any("timed out" in err for err in d.errors)


# --------------------------------------------------------------------------- torch


def test_probe_torch_fixture():
    t = E.probe_torch(fx("wsl2_gpu"))
    assert (t.version, t.cuda, t.device_checked, t.device_available) == ("2.6.0+cu126", "12.6", True, True)
    assert (t.device_name, t.capability) == ("NVIDIA GeForce RTX 4090", (8, 9))
    w1 = E.probe_torch(fx("wsl1"))
    assert not w1.device_checked and "no GPU device node" in w1.device_reason


def test_probe_torch_real_machine_asks_no_subprocess_without_device_nodes():
    nodes = E.probe_device_nodes(E.Env())
    if nodes.any_gpu_node:
        pytest.skip("this test is for machines without a GPU device node")
    t = E.probe_torch(E.Env(runner=no_run))
    assert t.installed and t.version == torch.__version__ and t.cuda == torch.version.cuda
    assert t.device_checked is False and t.device_available is None


def test_probe_torch_device_subprocess_is_parsed_and_bounded():
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch build: the device subprocess is not used")
    seen = {}

    def runner(argv, timeout, environ):
        seen["timeout"] = timeout
        payload = {"available": True, "count": 2, "name": "NVIDIA RTX A6000", "total_memory": 48 * GiB, "capability": [8, 6]}
        return _fs.CommandResult(0, "noise\nTORCH_WSL_JSON" + json.dumps(payload) + "\n")

    t = E.probe_torch(E.Env(runner=runner), check_device=True)
    assert seen["timeout"] == E.probes.TORCH_DEVICE_TIMEOUT_S
    assert (t.device_available, t.device_count, t.capability) == (True, 2, (8, 6))

    hung = E.probe_torch(E.Env(runner=lambda a, t, e: _fs.CommandResult(None, timed_out=True, error="timed out after 30 s")),
                         check_device=True)
    assert hung.device_checked and hung.device_available is None and "timed out" in hung.device_reason


# --------------------------------------------------------------------------- allocator config


def test_parse_alloc_conf():
    opts, bad = parse_alloc_conf("expandable_segments:True, max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2]")
    assert opts == {"expandable_segments": "True", "max_split_size_mb": "128",
                    "roundup_power2_divisions": "[256:1,512:2]"} and bad == []
    assert parse_alloc_conf("expandable_segments,backend:native")[1] == ["expandable_segments"]


def test_probe_alloc_conf_precedence():
    a = E.probe_alloc_conf(E.Env("/nonexistent", {"PYTORCH_ALLOC_CONF": "expandable_segments:False",
                                                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}))
    assert a.variable == "PYTORCH_CUDA_ALLOC_CONF" and a.expandable_segments is True
    b = E.probe_alloc_conf(E.Env("/nonexistent", {"PYTORCH_ALLOC_CONF": "expandable_segments:false"}))
    assert b.variable == "PYTORCH_ALLOC_CONF" and b.expandable_segments is False
    c = E.probe_alloc_conf(E.Env("/nonexistent", {}))
    assert c.variable is None and c.expandable_segments is None


# --------------------------------------------------------------------------- memory / NCCL


def test_parse_size():
    assert parse_size("65536k") == 64 * MiB
    assert parse_size("8g") == 8 * GiB and parse_size("8G") == 8 * GiB
    assert parse_size("50%", 16 * GiB) == 8 * GiB and parse_size("50%") is None
    assert parse_size("lots") is None


def test_probe_memory(tmp_path):
    m = E.probe_memory(fx("wsl2_gpu"))
    assert m.mem_total == 16303436 * 1024 and m.swap_total == 4194304 * 1024
    assert m.shm_size == m.mem_total // 2 and "tmpfs default" in m.shm_source
    n = E.probe_memory(fx("native_linux"))
    assert n.shm_size == 32921180 * 1024 and n.shm_source == "/proc/mounts"
    docker = variant(tmp_path, "wsl2_gpu", {"proc/mounts": "shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size=65536k 0 0\n"})
    assert E.probe_memory(docker).shm_size == 64 * MiB
    w1 = E.probe_memory(fx("wsl1"))  # /run/shm, no /dev/shm mount: unknown, not an error
    assert w1.mem_total is not None and w1.shm_size is None


def test_probe_memory_real_machine():
    m = E.probe_memory(E.Env())
    assert m.mem_total and m.mem_total > 0 and m.shm_size and m.shm_size > 0


def test_probe_nccl():
    n = E.probe_nccl(E.Env("/x", {"NCCL_SHM_DISABLE": "1", "NCCL_DEBUG": "INFO", "PATH": "/bin"}))
    assert n.variables == {"NCCL_DEBUG": "INFO", "NCCL_SHM_DISABLE": "1"} and n.get("NCCL_P2P_DISABLE") is None


def test_probe_nccl_infiniband_devices(tmp_path):
    assert E.probe_nccl(fx("wsl2_two_gpus")).ib_devices == ()  # no /sys/class/infiniband: no RDMA stack
    ib = variant(tmp_path / "a", "native_linux", {"sys/class/infiniband/mlx5_0": "", "sys/class/infiniband/mlx5_1": ""})
    assert E.probe_nccl(ib).ib_devices == ("mlx5_0", "mlx5_1")
    odd = variant(tmp_path / "b", "native_linux", {"sys/class/infiniband": "not a directory"})
    n = E.probe_nccl(odd)
    assert n.ib_devices is None and "cannot list" in n.errors[0]  # unknown, not "none"


# --------------------------------------------------------------------------- GPU probes


def test_gpu_probes_skip_without_a_gpu_and_start_nothing():
    info = E.TorchInfo(True, "2.6.0", "12.6", False, None, None, None, None, None, "no GPU device node (/dev/dxg, /dev/nvidia*)")
    e = E.Env(runner=no_run)
    p = probe_pinned_ceiling(e, torch_info=info)
    v = probe_vmm(e, torch_info=info)
    assert (p.status, v.status) == ("skipped", "skipped") and "no GPU device node" in p.detail
    cpu = E.TorchInfo(True, "2.6.0", None, True, False, 0, None, None, None, "CPU-only build of torch")
    assert probe_vmm(e, torch_info=cpu).detail == "torch is a CPU-only build"


def test_gpu_probes_on_this_machine():
    if E.probe_device_nodes(E.Env()).any_gpu_node:
        pytest.skip("this test is for machines without a GPU device node")
    assert probe_pinned_ceiling().status == "skipped" and probe_vmm().status == "skipped"


GPU = E.TorchInfo(True, "2.6.0", "12.6", True, True, 1, "GPU", 24 * GiB, (8, 9), None)


def _reply(payload: dict | None, **kw):
    out = "" if payload is None else "TORCH_WSL_JSON" + json.dumps(payload)
    return lambda argv, timeout, environ: _fs.CommandResult(kw.get("rc", 0), out, kw.get("err", ""), kw.get("to", False), kw.get("error"))


def test_pinned_probe_results_are_interpreted():
    r = probe_pinned_ceiling(E.Env(runner=_reply({"ceiling": 512 * MiB, "first_failure": 576 * MiB, "error": "CUDA error: out of memory"})),
                             torch_info=GPU)
    assert (r.status, r.value) == ("ok", 512 * MiB) and "576 MiB fails" in r.detail
    capped = probe_pinned_ceiling(E.Env(runner=_reply({"ceiling": 8 * GiB, "first_failure": None, "capped": True})), torch_info=GPU)
    assert capped.status == "ok" and "no failure" in capped.detail
    none = probe_pinned_ceiling(E.Env(runner=_reply({"ceiling": 0, "first_failure": 64 * MiB, "error": "oom"})), torch_info=GPU)
    assert (none.status, none.value) == ("failed", 0)
    hung = probe_pinned_ceiling(E.Env(runner=_reply(None, rc=None, to=True, error="timed out after 60 s")), torch_info=GPU)
    assert hung.status == "unknown" and "timed out" in hung.detail


def test_vmm_probe_results_are_interpreted():
    assert probe_vmm(E.Env(runner=_reply({"ok": True})), torch_info=GPU).status == "ok"
    f = probe_vmm(E.Env(runner=_reply({"ok": False, "error": "CUDA error: device not ready"})), torch_info=GPU)
    assert (f.status, f.value, f.detail) == ("failed", False, "CUDA error: device not ready")
    crash = probe_vmm(E.Env(runner=_reply(None, rc=-11, err="Segmentation fault")), torch_info=GPU)
    assert crash.status == "unknown" and "Segmentation fault" in crash.detail


def test_subprocess_scripts_compile():
    from torch_wsl.env import gpu, probes

    for script in (gpu._PINNED_SCRIPT, gpu._VMM_SCRIPT, probes._DEVICE_SCRIPT):
        compile(script, "<probe>", "exec")


def test_gpu_probe_scripts_run_without_a_gpu():
    """The real subprocess scripts start, report, and say 'skipped' when torch sees no device."""
    if torch.cuda.is_available():
        pytest.skip("this test is for machines without a GPU")
    r = probe_vmm(E.Env(), torch_info=GPU, timeout=60)
    assert (r.status, r.detail) == ("skipped", "torch sees no CUDA device")


# --------------------------------------------------------------------------- settings


def test_recommended_settings_wsl2_defaults():
    s = E.recommended_settings(fx("wsl2_gpu"))
    assert s.platform == "wsl2" and s.use_expandable_segments is False
    assert s.vram_budget_fraction == E.settings.VRAM_BUDGET_FRACTION_WSL2 == 0.90
    assert s.pinned_budget_bytes == E.settings.PINNED_BUDGET_WSL2_BYTES == 512 * MiB
    assert s.env == {} and s.exports() == []


def test_recommended_settings_native():
    s = E.recommended_settings(fx("native_linux"))
    assert s.platform == "linux" and s.use_expandable_segments is True
    assert s.vram_budget_fraction == 0.95
    assert s.pinned_budget_bytes == int(65842364 * 1024 * E.settings.PINNED_RAM_FRACTION)
    assert s.env == {}  # expandable_segments:True is fine on native Linux


def test_recommended_settings_wsl2_risky_env_and_two_gpus(tmp_path):
    smi2 = two_gpu_nvidia_smi()
    base = variant(tmp_path, "wsl2_gpu", {"_fixture/commands/nvidia-smi.txt": smi2}, torch_facts={"device": None})
    e = E.Env(base.root, {**base.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128"})
    p = E.probe_all(e)
    assert p.gpu_count == 2
    s = E.recommended_settings(probes=p)
    assert s.env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "NCCL_SHM_DISABLE": "1", "NCCL_P2P_DISABLE": "1",
                     "NCCL_IB_DISABLE": "1"}  # no /sys/class/infiniband in the tree
    assert "export PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128" in s.exports()
    only = E.Env(base.root, {**base.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert "unset PYTORCH_CUDA_ALLOC_CONF" in E.recommended_settings(only).exports()
    # a passing VMM probe lifts the restriction
    vmm_ok = E.GpuProbeResult("vmm", "ok", True, "")
    s2 = E.recommended_settings(probes=p, vmm=vmm_ok)
    assert s2.use_expandable_segments is True and "PYTORCH_CUDA_ALLOC_CONF" not in s2.env


def test_recommended_settings_pinned_budget_sources(tmp_path):
    p = E.probe_all(fx("wsl2_gpu"))
    measured = E.recommended_settings(probes=p, pinned=E.GpuProbeResult("pinned_ceiling", "ok", 400 * MiB, ""))
    assert measured.pinned_budget_bytes == 300 * MiB
    failed = E.recommended_settings(probes=p, pinned=E.GpuProbeResult("pinned_ceiling", "failed", 0, ""))
    assert failed.pinned_budget_bytes == 0
    small = variant(tmp_path, "wsl2_gpu", {"proc/meminfo": "MemTotal: 1048576 kB\nMemAvailable: 524288 kB\nSwapTotal: 0 kB\n"})
    assert E.recommended_settings(small).pinned_budget_bytes == 256 * MiB  # 25% of 1 GiB < 512 MiB


def test_recommended_settings_libcuda_fixes(tmp_path):
    stale = variant(tmp_path, "wsl2_gpu", {"_fixture/commands/ldconfig.txt": "1 libs found\n\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n"})
    s = E.recommended_settings(stale)
    assert s.env["TRITON_LIBCUDA_PATH"] == "/usr/lib/wsl/lib"
    assert s.env["LD_LIBRARY_PATH"] == "/usr/lib/wsl/lib"


def test_recommended_settings_real_machine_is_cached_and_cheap():
    t0 = time.monotonic()
    s = E.recommended_settings()
    assert s is E.recommended_settings()
    assert s.platform in ("linux", "wsl2", "wsl1", "unknown") and s.pinned_budget_bytes > 0
    assert 0 < s.vram_budget_fraction <= 1
    assert time.monotonic() - t0 < 15
