"""`python -m torch_wsl doctor`: statuses and fixes per fixture tree, the JSON schema, the CLI and its exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from env_fixtures import FIXTURES, fx, variant
from torch_wsl import env as E
from torch_wsl.__main__ import main
from torch_wsl.env import _fs

NAMES = ["platform", "gpu_device", "driver", "libcuda", "triton_libcuda", "torch", "torch_wsl_build",
         "alloc_conf", "memory", "shm", "nccl", "pinned_memory", "cuda_vmm"]


def statuses(report: E.Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def check(report: E.Report, name: str) -> E.Check:
    return next(c for c in report.checks if c.name == name)


S = "skipped"
EXPECTED = {
    "native_linux": dict(platform="ok", gpu_device="ok", driver="ok", libcuda="ok", triton_libcuda="ok", torch="ok",
                         torch_wsl_build="ok", alloc_conf="ok", memory="ok", shm="ok", nccl="ok", pinned_memory=S, cuda_vmm=S),
    "wsl2_gpu": dict(platform="ok", gpu_device="ok", driver="ok", libcuda="ok", triton_libcuda="ok", torch="ok",
                     torch_wsl_build="ok", alloc_conf="ok", memory="ok", shm="ok", nccl="ok", pinned_memory=S, cuda_vmm=S),
    "wsl2_no_libcuda_so": dict(platform="ok", gpu_device="ok", driver="ok", libcuda="ok", triton_libcuda="fail", torch="ok",
                               torch_wsl_build="ok", alloc_conf="ok", memory="ok", shm="ok", nccl="ok", pinned_memory=S, cuda_vmm=S),
    "wsl2_two_gpus": dict(platform="ok", gpu_device="ok", driver="ok", libcuda="ok", triton_libcuda="ok", torch="ok",
                          torch_wsl_build="ok", alloc_conf="ok", memory="ok", shm="ok", nccl="warn", pinned_memory=S,
                          cuda_vmm=S),
    "wsl1": dict(platform="fail", gpu_device=S, driver=S, libcuda=S, triton_libcuda=S, torch=S,
                 torch_wsl_build="ok", alloc_conf="ok", memory="ok", shm=S, nccl="ok", pinned_memory=S, cuda_vmm=S),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_statuses_and_exit_code(name):
    report = E.run_doctor(fx(name))
    assert [c.name for c in report.checks] == NAMES
    assert statuses(report) == EXPECTED[name]
    assert report.exit_code == (1 if "fail" in EXPECTED[name].values() else 0)
    for c in report.checks:
        assert c.status in E.STATUSES and c.found and c.why
        assert (c.fix is not None) == (c.status in ("warn", "fail")), c  # every problem comes with its fix
    assert not E.validate_schema(report.to_json())


def test_wsl1_fix_names_the_distro():
    c = check(E.run_doctor(fx("wsl1")), "platform")
    assert c.fix == "from Windows: wsl --set-version Ubuntu 2"
    assert "WSL1" in c.found and "CUDA does not work" in c.why


def test_missing_libcuda_so_symlink_fix():
    c = check(E.run_doctor(fx("wsl2_no_libcuda_so")), "triton_libcuda")
    assert "cannot find libcuda.so" in c.found and "-lcuda" in c.found
    assert "ln -sf /usr/lib/wsl/lib/libcuda.so.1 $HOME/.local/lib/torch_wsl-libcuda/libcuda.so " in c.fix
    assert "export TRITON_LIBCUDA_PATH=$HOME/.local/lib/torch_wsl-libcuda" in c.fix


def test_missing_symlink_is_fine_for_a_triton_linking_libcuda_so_1(tmp_path):
    e = variant(tmp_path, "wsl2_no_libcuda_so", torch_facts={"triton": {"version": "3.6.0", "links": "libcuda.so.1"}})
    r = E.run_doctor(e)
    assert check(r, "triton_libcuda").status == "ok" and r.exit_code == 0


def test_stale_loader_cache_gives_ldconfig_and_triton_path_fixes(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", {"_fixture/commands/ldconfig.txt": "1 libs found\n\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n"})
    r = E.run_doctor(e)
    lib, tri = check(r, "libcuda"), check(r, "triton_libcuda")
    assert (lib.status, lib.fix) == ("fail", "sudo ldconfig")
    assert (tri.status, tri.fix) == ("fail", "export TRITON_LIBCUDA_PATH=/usr/lib/wsl/lib")
    assert r.exit_code == 1
    assert "export TRITON_LIBCUDA_PATH=/usr/lib/wsl/lib" in r.format_env().splitlines()
    # once the variable is set, Triton's check passes
    fixed = E.Env(e.root, {**e.environ, "TRITON_LIBCUDA_PATH": "/usr/lib/wsl/lib"})
    assert check(E.run_doctor(fixed), "triton_libcuda").status == "ok"


def test_linux_driver_inside_wsl_is_flagged(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", {"usr/lib/x86_64-linux-gnu/libcuda.so.1": ""})
    e = E.Env(e.root, {**e.environ, "LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu"})
    c = check(E.run_doctor(e), "libcuda")
    assert c.status == "warn" and c.fix.startswith("dpkg -S /usr/lib/x86_64-linux-gnu/libcuda.so.1")


def test_expandable_segments_on_wsl2(tmp_path):
    base = fx("wsl2_gpu")
    e = E.Env(base.root, {**base.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128"})
    r = E.run_doctor(e)
    c = check(r, "alloc_conf")
    assert c.status == "warn" and "192330" in c.why
    assert c.fix == "export PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128"
    assert r.exit_code == 0 and "export PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128" in r.format_env()
    # the same setting is fine on native Linux (the native fixture sets it)
    assert check(E.run_doctor(fx("native_linux")), "alloc_conf").status == "ok"


@pytest.mark.parametrize("vmm, alloc, exit_code", [("ok", "ok", 0), ("failed", "fail", 1)])
def test_expandable_segments_with_probed_vmm(tmp_path, vmm, alloc, exit_code):
    gpu = {"pinned_ceiling": {"status": "ok", "value": 536870912, "detail": "512 MiB pins; 576 MiB fails"},
           "vmm": {"status": vmm, "value": vmm == "ok", "detail": "CUDA error: device not ready" if vmm == "failed" else "works"}}
    base = variant(tmp_path, "wsl2_gpu", {"_fixture/gpu.json": gpu})
    e = E.Env(base.root, {**base.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    r = E.run_doctor(e, probe_gpu=True)
    assert check(r, "alloc_conf").status == alloc and r.exit_code == exit_code
    assert check(r, "cuda_vmm").status == ("ok" if vmm == "ok" else "warn")
    pinned = check(r, "pinned_memory")
    assert pinned.status == "warn" and "512 MiB" in pinned.found  # under 1 GiB on WSL2
    assert r.settings.pinned_budget_bytes == 384 << 20  # 75% of the measured ceiling
    assert r.settings.use_expandable_segments is (vmm == "ok")


def test_two_gpus_need_nccl_settings():
    e = fx("wsl2_two_gpus")
    r = E.run_doctor(e)
    c = check(r, "nccl")
    assert c.status == "warn" and c.fix == "export NCCL_SHM_DISABLE=1 NCCL_P2P_DISABLE=1 NCCL_IB_DISABLE=1"
    assert "microsoft/WSL#12467" in c.why and "peer-to-peer" in c.why and "/sys/class/infiniband" in c.why
    # --env prints the same variables the check names: one source (settings_from_probes)
    assert r.format_env().splitlines() == ["export NCCL_SHM_DISABLE=1", "export NCCL_P2P_DISABLE=1",
                                           "export NCCL_IB_DISABLE=1"]
    done = E.Env(e.root, {**e.environ, "NCCL_SHM_DISABLE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"})
    r2 = E.run_doctor(done)
    c2 = check(r2, "nccl")
    assert c2.status == "ok" and "NCCL_SHM_DISABLE=1" in c2.found
    assert r2.format_env() == "# torch_wsl: no environment changes recommended"


def test_nccl_variable_the_user_set_differently_is_kept_and_reported():
    e = fx("wsl2_two_gpus")
    mine = E.Env(e.root, {**e.environ, "NCCL_P2P_DISABLE": "0"})
    r = E.run_doctor(mine)
    assert "NCCL_P2P_DISABLE" not in r.settings.env  # never overridden: --env leaves it alone
    assert r.settings.kept == {"NCCL_P2P_DISABLE": "1"}
    c = check(r, "nccl")
    assert c.status == "warn" and "kept your NCCL_P2P_DISABLE=0" in c.why
    assert c.fix == "export NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_P2P_DISABLE=1"  # advice, for the user to take
    assert "NCCL_P2P_DISABLE" not in r.format_env()


def test_small_shm_in_docker_and_low_memory(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", {
        "proc/mounts": "shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size=65536k 0 0\n",
        "proc/meminfo": "MemTotal:        4026532 kB\nMemAvailable:    3000000 kB\nSwapTotal:       0 kB\n",
        ".dockerenv": "",
    })
    r = E.run_doctor(e)
    shm, mem = check(r, "shm"), check(r, "memory")
    assert shm.status == "warn" and "64 MiB" in shm.found and "--shm-size=8g" in shm.fix
    assert mem.status == "warn" and ".wslconfig" in mem.fix and "memory=16GB" in mem.fix and "wsl --shutdown" in mem.fix
    assert "(in a container)" in check(r, "platform").found


def test_gpu_problems(tmp_path):
    cpu_torch = variant(tmp_path / "a", "wsl2_gpu", torch_facts={"cuda": None, "version": "2.6.0+cpu",
                                                                  "torch_wsl_build": None, "device": None})
    c = check(E.run_doctor(cpu_torch), "torch")
    assert c.status == "fail" and c.fix == "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu126"

    old_driver = variant(tmp_path / "b", "wsl2_gpu", {"_fixture/commands/nvidia-smi.txt":
        (FIXTURES / "wsl2_gpu/_fixture/commands/nvidia-smi.txt").read_text().replace("CUDA Version: 12.7", "CUDA Version: 11.8")})
    c = check(E.run_doctor(old_driver), "torch")
    assert c.status == "fail" and "update the NVIDIA driver on Windows" in c.fix

    no_gpu_seen = variant(tmp_path / "c", "wsl2_gpu", torch_facts={"device": {"available": False, "count": 0}})
    c = check(E.run_doctor(no_gpu_seen), "torch")
    assert c.status == "fail" and "sees no GPU" in c.found

    mismatch = variant(tmp_path / "d", "wsl2_gpu", torch_facts={"torch_wsl_build": {"torch_version": "2.5.1+cu124", "with_cuda": True, "cuda_archs": "8.9"}})
    c = check(E.run_doctor(mismatch), "torch_wsl_build")
    assert c.status == "fail" and c.fix == "pip install --no-build-isolation --force-reinstall ."

    not_built = variant(tmp_path / "f", "wsl2_gpu", torch_facts={"torch_wsl_build": None})
    c = check(E.run_doctor(not_built), "torch_wsl_build")
    assert c.status == "fail" and "not built" in c.found and c.fix == "pip install --no-build-isolation --force-reinstall ."

    wrong_arch = variant(tmp_path / "e", "wsl2_gpu", torch_facts={"torch_wsl_build": {"torch_version": "2.6.0+cu126", "with_cuda": True, "cuda_archs": "7.5;9.0"}})
    c = check(E.run_doctor(wrong_arch), "torch_wsl_build")
    assert c.status == "warn" and c.fix.startswith("TORCH_CUDA_ARCH_LIST=8.9 ")


def test_wsl2_without_gpu_warns_but_does_not_fail(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", remove=("dev/dxg",), torch_facts={"device": None})
    r = E.run_doctor(e)
    s = statuses(r)
    assert s["gpu_device"] == "warn" and "wsl --update" in check(r, "gpu_device").fix
    assert s["libcuda"] == s["triton_libcuda"] == s["torch"] == "skipped"
    assert r.exit_code == 0


def test_nvidia_smi_timeout_is_a_warning(tmp_path):
    e = variant(tmp_path, "wsl2_gpu", {"_fixture/commands/nvidia-smi.json": {"timed_out": True, "error": "timed out after 10 s"}},
                remove=("_fixture/commands/nvidia-smi.txt",))
    c = check(E.run_doctor(e), "driver")
    assert c.status == "warn" and "timed out" in c.found and "wsl --shutdown" in c.fix


# --------------------------------------------------------------------------- unreadable files


def _unreadable_tree(tmp_path: Path) -> Path:
    root = tmp_path / "unreadable"
    shutil.copytree(FIXTURES / "wsl2_gpu", root)
    (root / "proc/meminfo").unlink()
    (root / "proc/meminfo").mkdir()                      # a directory where a file is expected
    (root / "proc/sys/kernel/osrelease").unlink()
    (root / "proc/sys/kernel/osrelease").mkdir()
    (root / "proc/version").unlink()
    os.mkfifo(root / "proc/version")                     # opening it would block forever
    (root / "proc/mounts").unlink()
    (root / "proc/mounts").symlink_to("/nonexistent")    # dangling
    (root / "_fixture/env.json").write_text("{broken")   # unparsable
    (root / "_fixture/torch.json").chmod(0)              # unreadable for non-root users
    return root


def test_unreadable_files_give_unknown_never_an_exception(tmp_path):
    root = _unreadable_tree(tmp_path)
    t0 = time.monotonic()
    r = E.run_doctor(E.Env(root))
    assert time.monotonic() - t0 < 2.0
    s = statuses(r)
    assert s["platform"] == "warn" and "not a regular file" in check(r, "platform").found
    assert s["memory"] == "skipped" and s["shm"] == "skipped"
    assert "unknown" in check(r, "memory").found
    assert r.platform == "unknown" and r.exit_code == 0
    assert r.settings.use_expandable_segments is False  # unknown platform: conservative
    assert not E.validate_schema(r.to_json())


def test_permission_denied_everywhere(monkeypatch):
    """Every open fails with EACCES (what chmod 000 gives a non-root user): all unknown, no exception."""

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_fs, "_open_regular", denied)
    for name in ("wsl2_gpu", "native_linux"):
        r = E.run_doctor(fx(name))
        s = statuses(r)
        assert s["platform"] == "warn" and "permission denied" in check(r, "platform").found
        assert s["memory"] == s["shm"] == "skipped"
        assert check(r, "torch").status == "skipped"  # torch facts unreadable
        assert not E.validate_schema(r.to_json())


def test_stat_errors_are_unknown(monkeypatch):
    real_stat = os.stat

    def stat(path, *a, **k):
        if str(path).endswith("/dev/dxg"):
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    r = E.run_doctor(fx("wsl2_gpu"))
    assert check(r, "gpu_device").status == "skipped" and "cannot stat /dev/dxg" in check(r, "gpu_device").found


# --------------------------------------------------------------------------- JSON schema


def test_schema_validator_rejects_bad_reports():
    good = E.run_doctor(fx("wsl2_gpu")).to_json()
    assert E.validate_schema(good) == []
    assert json.loads(json.dumps(good)) == good
    bad = json.loads(json.dumps(good))
    del bad["checks"][0]["fix"]
    bad["checks"][1]["status"] = "maybe"
    bad["summary"]["fail"] = True  # a bool is not an integer
    bad["extra"] = 1
    errors = E.validate_schema(bad)
    assert any("missing 'fix'" in e for e in errors)
    assert any("'maybe' not in" in e for e in errors)
    assert any("summary.fail" in e for e in errors)
    assert any("unexpected 'extra'" in e for e in errors)
    assert E.validate_schema({**good, "schema_version": 2})


def test_json_summary_matches_checks():
    j = E.run_doctor(fx("wsl2_no_libcuda_so")).to_json()
    assert j["schema_version"] == E.SCHEMA_VERSION == 1
    n = {s: sum(c["status"] == s for c in j["checks"]) for s in E.STATUSES}
    assert {s: j["summary"][s] for s in E.STATUSES} == n
    assert j["summary"]["exit_code"] == 1 and j["summary"]["platform"] == "wsl2"
    assert j["settings"]["pinned_budget_bytes"] == 512 << 20 and j["settings"]["use_expandable_segments"] is False


# --------------------------------------------------------------------------- CLI


def test_cli_text_json_env_and_exit_code(capsys):
    root = str(FIXTURES / "wsl2_no_libcuda_so")
    assert main(["doctor", "--root", root]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(NAMES) + 1 and out[-1].startswith("summary: 10 ok, 0 warn, 1 fail, 2 skipped")
    fail = next(line for line in out if line.startswith("FAIL"))
    assert "triton_libcuda" in fail and "| why: " in fail and "| fix: " in fail

    assert main(["doctor", "--json", "--root", root]) == 1
    j = json.loads(capsys.readouterr().out)
    assert E.validate_schema(j) == []

    assert main(["doctor", "--env", "--root", str(FIXTURES / "wsl2_gpu")]) == 0
    assert capsys.readouterr().out.strip() == "# torch_wsl: no environment changes recommended"

    assert main(["doctor", "--root", str(FIXTURES / "wsl1")]) == 1
    capsys.readouterr()
    assert main([]) == 2


def test_cli_on_this_machine():
    """`python -m torch_wsl doctor --json` on the CI machine: valid JSON, nothing fails, fast."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch_wsl", "doctor", "--json"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert E.validate_schema(report) == []
    assert report["summary"]["fail"] == 0 and [c["name"] for c in report["checks"]] == NAMES
    if not E.probe_device_nodes(E.Env()).any_gpu_node:
        assert report["summary"]["elapsed_s"] < 1.0  # the checks themselves; `import torch` dominates the wall time
        assert wall < 15  # generous: CI machines are busy


def test_probe_gpu_without_gpu_is_skipped_quickly():
    if E.probe_device_nodes(E.Env()).any_gpu_node:
        pytest.skip("this test is for machines without a GPU device node")
    t0 = time.monotonic()
    r = E.run_doctor(probe_gpu=True)
    assert time.monotonic() - t0 < 5
    assert check(r, "pinned_memory").status == check(r, "cuda_vmm").status == "skipped"
    # The probes name the first thing missing: a CPU-only build of torch (CI's torch 2.13.0 run) is
    # reported before the missing device node (a CUDA build of torch on a GPU-less machine).
    expected = "torch is a CPU-only build" if torch.version.cuda is None else "no GPU device node"
    assert expected in check(r, "cuda_vmm").found
