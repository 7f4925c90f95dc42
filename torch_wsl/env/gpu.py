"""On-demand probes that use the GPU: the pinned-memory ceiling and whether CUDA virtual memory works.

They run only when asked (``python -m torch_wsl doctor --probe-gpu`` or a call
here), each in a subprocess bounded by a timeout, so a driver that hangs or
crashes cannot take the caller with it. Without a GPU they return
``status="skipped"`` with the reason, without starting anything.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ._fs import Env, real_env
from .probes import TorchInfo, _parse_marked_json, probe_torch

__all__ = [
    "GPU_PROBE_TIMEOUT_S",
    "PINNED_PROBE_MAX_BYTES",
    "GpuProbeResult",
    "probe_pinned_ceiling",
    "probe_vmm",
]

#: Default wall-clock bound of one GPU probe, in seconds (includes starting Python and CUDA).
GPU_PROBE_TIMEOUT_S = 60.0

#: The pinned-memory probe never asks for more than this in one allocation.
#: 8 GiB is past every WSL2 ceiling reported (~0.5-1 GB, microsoft/WSL#14078, #8447)
#: while keeping the probe to a few seconds.
PINNED_PROBE_MAX_BYTES = 8 << 30

#: First size the pinned-memory probe tries, doubling from there.
PINNED_PROBE_START_BYTES = 64 << 20


@dataclass(frozen=True)
class GpuProbeResult:
    """Outcome of a GPU probe.

    ``status``: ``"ok"`` (it worked; ``value`` holds the measurement),
    ``"failed"`` (it ran and the feature failed; ``detail`` has the error),
    ``"skipped"`` (not run: no GPU, or not asked) or ``"unknown"`` (the probe
    itself crashed or timed out).
    """

    name: str
    status: str
    value: int | bool | None
    detail: str


_PINNED_SCRIPT = r"""
import ctypes, json, sys, time
import torch
cap, start, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + budget
out = {}
def load_cudart():
    # torch has loaded its CUDA runtime already: dlopen by soname returns that one.
    major = (torch.version.cuda or "").split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    return None
cudart = load_cudart() if torch.cuda.is_available() else None
if not torch.cuda.is_available():
    out["skipped"] = "torch sees no CUDA device"
elif cudart is None:
    out["skipped"] = "the CUDA runtime library could not be loaded"
else:
    torch.cuda.init()
    cudart.cudaGetErrorString.restype = ctypes.c_char_p
    # cudaHostAlloc directly: PyTorch's host allocator rounds every request up
    # to a power of two, which would put the ceiling off by up to 2x.
    def try_pin(n):
        p = ctypes.c_void_p()
        err = cudart.cudaHostAlloc(ctypes.byref(p), ctypes.c_size_t(n), ctypes.c_uint(0))
        if err != 0:
            cudart.cudaGetLastError()
            return False, cudart.cudaGetErrorString(err).decode(errors="replace")[:300]
        cudart.cudaFreeHost(p)
        return True, None
    best, bad, err, size = 0, None, None, start
    while size <= cap and time.monotonic() < deadline:
        ok, e = try_pin(size)
        if not ok:
            bad, err = size, e
            break
        best, size = size, size * 2
    while bad is not None and bad - best > start and time.monotonic() < deadline:
        mid = (best + bad) // 2 // start * start
        ok, e = try_pin(mid)
        if ok:
            best = mid
        else:
            bad, err = mid, e
    out.update(ceiling=best, first_failure=bad, error=err, capped=bad is None)
print("TORCH_WSL_JSON" + json.dumps(out))
"""

_VMM_SCRIPT = r"""
import json, os
os.environ.pop("PYTORCH_ALLOC_CONF", None)
os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
import torch
out = {}
if not torch.cuda.is_available():
    out["skipped"] = "torch sees no CUDA device"
else:
    try:
        xs = []
        for mib in (2, 64, 256):
            x = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
            x.fill_(7)
            xs.append(x)
        torch.cuda.synchronize()
        good = all(int(x[-1].item()) == 7 for x in xs)
        del xs
        torch.cuda.empty_cache()
        y = torch.ones(1 << 20, device="cuda").sum().item()
        torch.cuda.synchronize()
        out["ok"] = good and y == float(1 << 20)
        if not out["ok"]:
            out["error"] = "data written through expandable segments read back wrong"
    except Exception as e:
        out["ok"] = False
        out["error"] = (str(e).splitlines() or [type(e).__name__])[0][:300]
print("TORCH_WSL_JSON" + json.dumps(out))
"""


def _no_gpu_reason(torch_info: TorchInfo) -> str | None:
    if not torch_info.installed:
        return "torch is not installed"
    if torch_info.cuda is None:
        return "torch is a CPU-only build"
    if not torch_info.device_checked:
        return torch_info.device_reason or "no GPU"
    if not torch_info.device_available:
        return "torch sees no CUDA device" + (f" ({torch_info.device_reason})" if torch_info.device_reason else "")
    return None


def _fixture_result(env: Env, name: str) -> GpuProbeResult:
    data = (env.fixture("gpu") or {}).get(name)
    if not isinstance(data, dict):
        return GpuProbeResult(name, "skipped", None, "GPU probes run only on the real machine")
    return GpuProbeResult(name, str(data.get("status", "unknown")), data.get("value"), str(data.get("detail", "")))


def _run_script(env: Env, name: str, script: str, args: list[str], timeout: float) -> dict | GpuProbeResult:
    res = env.run([sys.executable, "-c", script, *args], timeout)
    data = _parse_marked_json(res.stdout)
    if data is None:
        why = res.error or f"exit status {res.returncode}"
        tail = (res.stderr or "").strip().splitlines()
        return GpuProbeResult(name, "unknown", None, f"probe did not report: {why}" + (f"; {tail[-1][:200]}" if tail else ""))
    if data.get("skipped"):
        return GpuProbeResult(name, "skipped", None, str(data["skipped"]))
    return data


def probe_pinned_ceiling(
    env: Env | None = None,
    *,
    max_bytes: int = PINNED_PROBE_MAX_BYTES,
    timeout: float = GPU_PROBE_TIMEOUT_S,
    torch_info: TorchInfo | None = None,
) -> GpuProbeResult:
    """Largest single pinned (page-locked) host allocation that succeeds, in bytes.

    Doubles from 64 MiB up to ``max_bytes`` and bisects after the first
    failure, calling ``cudaHostAlloc``/``cudaFreeHost`` directly (PyTorch's
    host allocator rounds requests up to powers of two, which would put the
    ceiling off by up to 2x). ``value`` is the ceiling; ``detail`` says
    whether it was capped by ``max_bytes``.
    """
    env = env or real_env()
    name = "pinned_ceiling"
    if not env.is_real:
        return _fixture_result(env, name)
    info = torch_info or probe_torch(env)
    reason = _no_gpu_reason(info)
    if reason:
        return GpuProbeResult(name, "skipped", None, reason)
    budget = max(1.0, timeout - 15.0)  # leave time for Python, torch and CUDA to start
    got = _run_script(env, name, _PINNED_SCRIPT, [str(max_bytes), str(PINNED_PROBE_START_BYTES), str(budget)], timeout)
    if isinstance(got, GpuProbeResult):
        return got
    ceiling = int(got.get("ceiling") or 0)
    if got.get("capped"):
        return GpuProbeResult(name, "ok", ceiling, f"no failure up to {ceiling >> 20} MiB (the probe's size or time limit)")
    if ceiling == 0:
        return GpuProbeResult(name, "failed", 0, f"pinning {PINNED_PROBE_START_BYTES >> 20} MiB failed: {got.get('error')}")
    return GpuProbeResult(name, "ok", ceiling,
                          f"{ceiling >> 20} MiB pins; {int(got.get('first_failure') or 0) >> 20} MiB fails: {got.get('error')}")


def probe_vmm(
    env: Env | None = None,
    *,
    timeout: float = GPU_PROBE_TIMEOUT_S,
    torch_info: TorchInfo | None = None,
) -> GpuProbeResult:
    """Whether CUDA virtual memory (what ``expandable_segments:True`` uses) works on this driver.

    Allocates, writes and reads back tensors with ``expandable_segments:True``
    in a fresh process. ``value`` is True/False; ``detail`` has the error.
    On some WSL drivers this fails (pytorch/pytorch#192330).
    """
    env = env or real_env()
    name = "vmm"
    if not env.is_real:
        return _fixture_result(env, name)
    info = torch_info or probe_torch(env)
    reason = _no_gpu_reason(info)
    if reason:
        return GpuProbeResult(name, "skipped", None, reason)
    got = _run_script(env, name, _VMM_SCRIPT, [], timeout)
    if isinstance(got, GpuProbeResult):
        return got
    if got.get("ok"):
        return GpuProbeResult(name, "ok", True, "expandable segments allocate, map and read back correctly")
    return GpuProbeResult(name, "failed", False, str(got.get("error") or "failed"))
