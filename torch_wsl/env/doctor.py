"""``python -m torch_wsl doctor``: one line per check, with what was found, why it matters and the exact fix.

The checks are a pure function of the probe results (:func:`checks_from_probes`),
so fixture trees test them exhaustively. :func:`run_doctor` takes the probes,
optionally runs the GPU probes, and returns a :class:`Report` that renders as
text, as JSON following :data:`REPORT_SCHEMA`, or as shell ``export`` lines.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ._fs import Env, real_env
from .gpu import GPU_PROBE_TIMEOUT_S, GpuProbeResult, probe_pinned_ceiling, probe_vmm
from .probes import WSL_LIB_DIR, WSL_LD_CONF, Probes, probe_all
from .settings import NCCL_SHM_MIN_BYTES, Settings, _without_expandable, settings_from_probes

__all__ = [
    "LOW_RAM_BYTES",
    "LOW_SHM_BYTES",
    "PINNED_LOW_BYTES",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "STATUSES",
    "Check",
    "Report",
    "checks_from_probes",
    "run_doctor",
    "validate_schema",
]

SCHEMA_VERSION = 1
STATUSES = ("ok", "warn", "fail", "skipped")

#: Below this much RAM in the VM, training with DataLoader workers and checkpoints gets tight.
#: torch_wsl's choice; WSL2 gives the VM half of Windows' RAM by default (Microsoft: "WSL config").
LOW_RAM_BYTES = 8 << 30

#: /dev/shm smaller than this is too small for DataLoader workers or NCCL (Docker's default is 64 MiB):
#: NCCL's figure (settings.NCCL_SHM_MIN_BYTES), which DataLoader workers' shared batches also fit in.
LOW_SHM_BYTES = NCCL_SHM_MIN_BYTES

#: A pinned-memory ceiling below this on WSL2 is reported (pin_memory=True DataLoaders hit it).
PINNED_LOW_BYTES = 1 << 30

REBUILD = "pip install --no-build-isolation --force-reinstall ."

_CHECK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "status", "found", "why", "fix"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "status": {"type": "string", "enum": list(STATUSES)},
        "found": {"type": "string"},
        "why": {"type": "string"},
        "fix": {"type": ["string", "null"]},
    },
}

#: JSON Schema (draft 2020-12 subset) of ``doctor --json``. Bump SCHEMA_VERSION on any incompatible change.
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "torch_wsl doctor report",
    "type": "object",
    "required": ["schema_version", "checks", "summary", "settings"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "checks": {"type": "array", "items": _CHECK_SCHEMA, "minItems": 1},
        "summary": {
            "type": "object",
            "required": ["platform", "ok", "warn", "fail", "skipped", "exit_code", "elapsed_s"],
            "additionalProperties": False,
            "properties": {
                "platform": {"type": "string", "enum": ["linux", "wsl1", "wsl2", "unknown"]},
                "ok": {"type": "integer", "minimum": 0},
                "warn": {"type": "integer", "minimum": 0},
                "fail": {"type": "integer", "minimum": 0},
                "skipped": {"type": "integer", "minimum": 0},
                "exit_code": {"type": "integer", "enum": [0, 1]},
                "elapsed_s": {"type": "number", "minimum": 0},
            },
        },
        "settings": {
            "type": "object",
            "required": ["use_expandable_segments", "vram_budget_fraction", "pinned_budget_bytes", "env"],
            "additionalProperties": False,
            "properties": {
                "use_expandable_segments": {"type": "boolean"},
                "vram_budget_fraction": {"type": "number", "minimum": 0, "maximum": 1},
                "pinned_budget_bytes": {"type": "integer", "minimum": 0},
                "env": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
            },
        },
    },
}


@dataclass(frozen=True)
class Check:
    """One doctor line: ``status`` is one of :data:`STATUSES`; ``fix`` is a command or variable, or None."""

    name: str
    status: str
    found: str
    why: str
    fix: str | None = None


def _gib(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n >> 20} MiB"


def _ver(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def _errors(errs: tuple[str, ...]) -> str:
    return "; ".join(errs) if errs else "no data"


def _wsl_driver_fix(in_container: bool | None) -> str:
    fix = "install a current NVIDIA driver on Windows (it includes WSL support), then from Windows: wsl --update; wsl --shutdown"
    if in_container:
        fix += "; start the container with --gpus all"
    return fix


def _has_gpu(p: Probes) -> bool:
    """Whether the machine shows a GPU at all (device node or driver listing)."""
    return bool(p.devices.any_gpu_node or (p.driver.gpus and p.driver.source))


# --------------------------------------------------------------------------- the checks


def _check_platform(p: Probes) -> Check:
    w = p.wsl
    kern = w.kernel or "unknown kernel"
    box = " (in a container)" if w.in_container else ""
    if p.platform == "linux":
        return Check("platform", "ok", f"native Linux, kernel {kern}{box}", "WSL-specific advice does not apply")
    if p.platform == "wsl2":
        distro = f", distro {w.distro}" if w.distro else ""
        return Check("platform", "ok", f"WSL2, kernel {kern}{distro}{box}",
                     "CUDA reaches the GPU through paravirtualization (/dev/dxg)")
    if p.platform == "wsl1":
        return Check("platform", "fail", f"WSL1, kernel {kern}",
                     "WSL1 has no GPU support: CUDA does not work (NVIDIA CUDA on WSL guide)",
                     f"from Windows: wsl --set-version {w.distro or '<distro>'} 2")
    return Check("platform", "warn", f"unknown ({_errors(w.errors)})",
                 "cannot tell native Linux from WSL; WSL-specific checks may be off",
                 "make /proc/sys/kernel/osrelease and /proc/version readable")


def _check_gpu_device(p: Probes) -> Check:
    d = p.devices
    name = "gpu_device"
    if p.platform == "wsl1":
        return Check(name, "skipped", "WSL1 has no /dev/dxg", "see platform")
    if p.platform == "wsl2":
        if d.dxg:
            return Check(name, "ok", "/dev/dxg present (GPU paravirtualization)", "the Windows driver is reachable")
        if d.dxg is None:
            return Check(name, "skipped", f"cannot stat /dev/dxg ({_errors(d.errors)})", "unknown")
        return Check(name, "warn", "no /dev/dxg: this WSL2 VM has no GPU",
                     "CUDA under WSL2 needs GPU paravirtualization (/dev/dxg); without it training runs on the CPU",
                     _wsl_driver_fix(p.wsl.in_container))
    if d.nvidia:
        return Check(name, "ok", ", ".join(d.nvidia), "NVIDIA device nodes present")
    if d.dxg:
        return Check(name, "ok", "/dev/dxg present", "GPU paravirtualization")
    if d.nvidia is None:
        return Check(name, "skipped", f"cannot list /dev ({_errors(d.errors)})", "unknown")
    return Check(name, "skipped", "no NVIDIA GPU device (/dev/nvidia*, /dev/dxg)", "CPU-only machine: GPU checks do not apply")


def _check_driver(p: Probes) -> Check:
    dr = p.driver
    name = "driver"
    if dr.source:
        gpus = ", ".join(f"{g.name}" + (f" ({_gib(g.memory)})" if g.memory else "") for g in dr.gpus or ())
        cuda = f" (CUDA {dr.cuda_version})" if dr.cuda_version else ""
        where = " [Windows driver]" if p.platform == "wsl2" else ""
        found = f"driver {dr.driver_version}{cuda}{where} via {dr.source}; {len(dr.gpus or ())} GPU(s)" + (f": {gpus}" if gpus else "")
        if not dr.gpus and dr.source == "nvidia-smi":
            return Check(name, "warn", found, "the driver lists no GPU", _wsl_driver_fix(p.wsl.in_container)
                         if p.platform == "wsl2" else "check the GPU with nvidia-smi")
        return Check(name, "ok", found, "the newest CUDA this driver supports bounds the torch build you can use")
    if p.platform == "wsl2" and p.devices.dxg:
        if not dr.nvidia_smi:
            return Check(name, "warn", f"nvidia-smi not found (looked on PATH and in {WSL_LIB_DIR})",
                         "the Windows driver should provide it; its absence means an old or broken driver install",
                         _wsl_driver_fix(p.wsl.in_container))
        return Check(name, "warn", f"nvidia-smi failed: {_errors(dr.errors)}",
                     "the driver does not answer; CUDA calls will likely fail or hang",
                     "from Windows: wsl --shutdown, then retry; if it persists reinstall the NVIDIA Windows driver")
    if p.devices.nvidia:
        return Check(name, "warn", f"GPU device nodes but no driver version ({_errors(dr.errors)})",
                     "the NVIDIA kernel module or nvidia-smi is missing or broken",
                     "reinstall the NVIDIA driver (e.g. sudo ubuntu-drivers install) and reboot")
    return Check(name, "skipped", "no NVIDIA driver", "no GPU on this machine")


def _check_libcuda(p: Probes) -> Check:
    lc = p.libcuda
    name = "libcuda"
    if p.platform == "wsl2" and p.devices.dxg:
        if lc.wsl_files.get("libcuda.so.1") is False:
            return Check(name, "fail", f"no libcuda.so.1 in {WSL_LIB_DIR}",
                         "WSL2's libcuda is provided by the Windows driver; without it CUDA cannot start",
                         _wsl_driver_fix(p.wsl.in_container))
        if lc.loader_finds is False:
            fix = ("sudo ldconfig" if lc.wsl_ld_conf
                   else f"echo {WSL_LIB_DIR} | sudo tee {WSL_LD_CONF} && sudo ldconfig"
                   f"  (or: export LD_LIBRARY_PATH={WSL_LIB_DIR}:$LD_LIBRARY_PATH)")
            return Check(name, "fail", f"the dynamic loader does not find libcuda.so.1 ({WSL_LIB_DIR} not in the ldconfig cache or LD_LIBRARY_PATH)",
                         "torch cannot load the CUDA driver: torch.cuda.is_available() is False", fix)
        foreign = [d for d in lc.foreign_dirs if "stubs" not in d.split("/")]
        if foreign:
            return Check(name, "warn", f"libcuda.so.1 also in {', '.join(foreign)}",
                         "a Linux NVIDIA driver installed inside WSL shadows the WSL one (NVIDIA: never install a Linux driver in WSL)",
                         f"dpkg -S {foreign[0]}/libcuda.so.1  # names the package: remove it, then: sudo ldconfig")
        if lc.stub_dirs:
            return Check(name, "warn", f"LD_LIBRARY_PATH contains the CUDA toolkit's link-only stub: {', '.join(lc.stub_dirs)}",
                         "loading the stub gives 'CUDA driver is a stub library'",
                         f"remove {lc.stub_dirs[0]} from LD_LIBRARY_PATH")
        if lc.loader_finds is None:
            return Check(name, "skipped", f"cannot tell whether the loader finds libcuda.so.1 ({_errors(lc.errors)})", "unknown")
        how = "LD_LIBRARY_PATH" if lc.ld_library_path_dirs else ("/etc/ld.so.conf" if lc.cache_from_conf else "the ldconfig cache")
        return Check(name, "ok", f"libcuda.so.1 in {', '.join(lc.loader_dirs)}, found through {how}",
                     "torch loads the CUDA driver from here")
    if p.platform == "wsl2" or not _has_gpu(p):
        return Check(name, "skipped", "no GPU on this machine" if p.platform != "wsl2" else "no /dev/dxg", "no CUDA driver to find")
    if lc.loader_finds:
        return Check(name, "ok", f"libcuda.so.1 in {', '.join(lc.loader_dirs)}", "torch loads the CUDA driver from here")
    if lc.loader_finds is None:
        return Check(name, "skipped", f"cannot tell whether the loader finds libcuda.so.1 ({_errors(lc.errors)})", "unknown")
    return Check(name, "fail", "the dynamic loader does not find libcuda.so.1",
                 "torch cannot load the CUDA driver", "install the NVIDIA driver's user-space libraries, then: sudo ldconfig")


def _check_triton(p: Probes) -> Check:
    t = p.triton
    lc = p.libcuda
    name = "triton_libcuda"
    if t.installed is False:
        return Check(name, "skipped", "Triton is not installed", "torch.compile cannot generate GPU kernels without it")
    if t.installed is None:
        return Check(name, "skipped", "unknown whether Triton is installed", "unknown")
    if not _has_gpu(p) or (p.platform == "wsl2" and not p.devices.dxg):
        return Check(name, "skipped", f"Triton {t.version or '?'}; no GPU", "Triton's libcuda lookup only matters with a GPU")
    vers = f"Triton {t.version or '?'} links {t.links or 'libcuda.so (assumed)'}"
    if t.finds:
        src = "TRITON_LIBCUDA_PATH" if t.libcuda_path_env else "its own lookup"
        return Check(name, "ok", f"{vers}; finds it in {', '.join(t.search_dirs or ())} ({src})",
                     "torch.compile can build its GPU kernel launchers")
    if t.finds is None:
        return Check(name, "skipped", f"{vers}; cannot replay its lookup ({_errors(t.errors)})", "unknown")
    why = "torch.compile fails with 'cannot find -lcuda' / 'libcuda.so cannot found' (pytorch/pytorch#97501, #107960)"
    links = t.links or "libcuda.so"
    if p.platform == "wsl2":
        if lc.wsl_files.get("libcuda.so.1") and lc.wsl_files.get(links):
            fix = f"export TRITON_LIBCUDA_PATH={WSL_LIB_DIR}"
        else:
            d = "$HOME/.local/lib/torch_wsl-libcuda"
            fix = (f"mkdir -p {d} && ln -sf {WSL_LIB_DIR}/libcuda.so.1 {d}/libcuda.so && "
                   f"ln -sf {WSL_LIB_DIR}/libcuda.so.1 {d}/libcuda.so.1 && export TRITON_LIBCUDA_PATH={d}"
                   f"  ({WSL_LIB_DIR} is read-only; or upgrade to a Triton that links libcuda.so.1, triton-lang/triton#8668)")
    elif lc.loader_dirs:
        fix = f"export TRITON_LIBCUDA_PATH={lc.loader_dirs[0]}"
    else:
        fix = "sudo ldconfig"
    return Check(name, "fail", f"{vers}; {t.problem}", why, fix)


def _torch_index(driver_cuda: str | None) -> str:
    v = _ver(driver_cuda)
    tag = None
    if v is not None:
        for need, name in (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"), ((11, 8), "cu118")):
            if v >= need:
                tag = name
                break
    if tag is None:
        return "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
    return f"pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/{tag}"


def _check_torch(p: Probes) -> Check:
    t = p.torch
    name = "torch"
    if not t.installed:
        status = "skipped" if t.installed is None else "fail"
        return Check(name, status, f"torch not available ({_errors(t.errors)})", "torch_wsl needs torch",
                     None if status == "skipped" else "pip install torch")
    build = f"torch {t.version} (CUDA {t.cuda})" if t.cuda else f"torch {t.version} (CPU-only build)"
    has_gpu = _has_gpu(p) and not (p.platform == "wsl2" and not p.devices.dxg)
    if not has_gpu:
        return Check(name, "skipped", f"{build}; no GPU on this machine", "nothing for torch to see")
    if t.cuda is None:
        return Check(name, "fail", f"{build} but this machine has an NVIDIA GPU",
                     "a CPU-only torch never uses the GPU", _torch_index(p.driver.cuda_version))
    tv, dv = _ver(t.cuda), _ver(p.driver.cuda_version)
    too_new = tv is not None and dv is not None and tv[0] > dv[0]
    if too_new:
        upd = "update the NVIDIA driver on Windows" if p.platform == "wsl2" else "update the NVIDIA driver"
        return Check(name, "fail", f"{build}, but the driver supports only CUDA {p.driver.cuda_version}",
                     "a driver older than torch's CUDA major version cannot run its kernels",
                     f"{upd}, or: {_torch_index(p.driver.cuda_version)}")
    if not t.device_checked:
        return Check(name, "skipped", f"{build}; GPU visibility not checked ({t.device_reason})", "not requested")
    if t.device_available:
        cap = f", sm_{t.capability[0]}{t.capability[1]}" if t.capability else ""
        found = f"{build}; {t.device_count} GPU(s), GPU 0: {t.device_name}, {_gib(t.device_memory)}{cap}"
        if tv is not None and dv is not None and tv > dv:
            return Check(name, "warn", found + f"; driver supports CUDA {p.driver.cuda_version} < {t.cuda}",
                         "CUDA minor-version compatibility runs most kernels, but PTX JIT and newer features fail",
                         "update the NVIDIA driver" + (" on Windows" if p.platform == "wsl2" else ""))
        return Check(name, "ok", found, "torch sees the GPU")
    if t.device_available is None:
        return Check(name, "warn", f"{build}; the GPU check did not finish ({t.device_reason})",
                     "CUDA initialization hangs or crashes: the driver is in a bad state",
                     "from Windows: wsl --shutdown, then retry" if p.platform == "wsl2" else "run nvidia-smi; reboot if it hangs")
    err = f" ({t.device_reason})" if t.device_reason else ""
    return Check(name, "fail", f"{build} sees no GPU{err}", "training would silently run on the CPU",
                 "from Windows: wsl --shutdown, then retry; check CUDA_VISIBLE_DEVICES" if p.platform == "wsl2"
                 else "check nvidia-smi and CUDA_VISIBLE_DEVICES")


def _archs_cover(archs: str, cap: tuple[int, int]) -> bool:
    for a in archs.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip()
        ptx = a.endswith("+PTX")
        v = _ver(a.removesuffix("+PTX"))
        if v is None:
            continue
        if (v[0] == cap[0] and v[1] <= cap[1]) or (ptx and v <= cap):
            return True
    return False


def _check_build(p: Probes) -> Check:
    t = p.torch
    b = t.torch_wsl_build
    name = "torch_wsl_build"
    if not b:
        return Check(name, "fail", "torch_wsl's build configuration not found: the extension is not built",
                     "torch_wsl's operators and runtime services cannot load", REBUILD)
    if t.version and b.get("torch_version") and b["torch_version"] != t.version:
        return Check(name, "fail", f"built against torch {b['torch_version']}, running torch {t.version}",
                     "the C++ ABI changes between torch builds: import fails or kernels crash", REBUILD)
    archs = str(b.get("cuda_archs") or "")
    found = f"built against torch {b.get('torch_version')}; CUDA kernels: " + (f"yes ({archs})" if b.get("with_cuda") else "no")
    if t.device_available and not b.get("with_cuda"):
        return Check(name, "warn", found, "the GPU is visible but torch_wsl's operators have no CUDA kernels",
                     f"FORCE_CUDA=1 {REBUILD}")
    if t.device_available and t.capability and archs and b.get("with_cuda") and not _archs_cover(archs, t.capability):
        cap = f"{t.capability[0]}.{t.capability[1]}"
        return Check(name, "warn", found + f"; GPU is sm_{cap.replace('.', '')}",
                     "no kernel image for this GPU: torch_wsl's CUDA operators will fail to launch",
                     f"TORCH_CUDA_ARCH_LIST={cap} {REBUILD}")
    return Check(name, "ok", found, "matches the running torch")


def _check_alloc_conf(p: Probes, vmm: GpuProbeResult | None, settings: Settings) -> Check:
    ac = p.alloc_conf
    name = "alloc_conf"
    if ac.variable is None:
        return Check(name, "ok", "PYTORCH_CUDA_ALLOC_CONF unset (PyTorch defaults)", "nothing risky requested")
    found = f"{ac.variable}={ac.raw}"
    if ac.malformed:
        good = ",".join(f"{k}:{v}" for k, v in ac.options.items())
        return Check(name, "warn", found + f" (not key:value: {', '.join(ac.malformed)})",
                     "PyTorch rejects the whole setting at the first CUDA allocation",
                     f"export {ac.variable}={good}" if good else f"unset {ac.variable}")
    if ac.expandable_segments and p.platform == "wsl2":
        if vmm is not None and vmm.status == "ok":
            return Check(name, "ok", found + " (CUDA virtual memory probed OK)", "expandable segments work on this driver")
        new = settings.env[ac.variable] if ac.variable in settings.env else (_without_expandable(ac.raw or "") or None)
        fix = f"unset {ac.variable}" if new is None else f"export {ac.variable}={new}"
        failed = vmm is not None and vmm.status == "failed"
        return Check(name, "fail" if failed else "warn",
                     found + (f" and CUDA virtual memory fails here: {vmm.detail}" if failed else ""),
                     "expandable segments (CUDA VMM) fail on some WSL drivers: 'device not ready', "
                     "dxgkio_make_resident: -12 (pytorch/pytorch#192330); torch_wsl's allocator limits fragmentation without them",
                     fix)
    return Check(name, "ok", found, "nothing risky for this platform")


def _check_memory(p: Probes) -> Check:
    m = p.memory
    name = "memory"
    if m.mem_total is None:
        return Check(name, "skipped", f"unknown ({_errors(m.errors)})", "cannot judge the VM's memory")
    found = f"RAM {_gib(m.mem_total)} ({_gib(m.mem_available)} available), swap {_gib(m.swap_total) if m.swap_total else '0'}"
    if m.mem_total < LOW_RAM_BYTES:
        if p.platform == "wsl2":
            fix = ("in %UserProfile%\\.wslconfig put '[wsl2]' and 'memory=16GB' (the VM gets half of Windows' RAM by default), "
                   "then from Windows: wsl --shutdown")
        else:
            fix = "add RAM or swap: sudo fallocate -l 8G /swapfile && sudo chmod 600 /swapfile && sudo mkswap /swapfile && sudo swapon /swapfile"
        return Check(name, "warn", found, f"under {_gib(LOW_RAM_BYTES)}: DataLoader workers, pinned buffers and checkpoint loading run out of memory", fix)
    return Check(name, "ok", found, "enough for typical training")


def _check_shm(p: Probes) -> Check:
    m = p.memory
    name = "shm"
    if m.shm_size is None:
        return Check(name, "skipped", f"/dev/shm size unknown ({_errors(m.errors)})", "cannot judge shared memory")
    found = f"/dev/shm is {_gib(m.shm_size)} (from {m.shm_source})"
    if m.shm_size < LOW_SHM_BYTES:
        fix = ("restart the container with --shm-size=8g (or --ipc=host)" if p.wsl.in_container
               else "sudo mount -o remount,size=8G /dev/shm")
        return Check(name, "warn", found,
                     "DataLoader workers pass batches through /dev/shm and NCCL uses it between ranks: "
                     "too small gives 'Bus error' or 'No space left on device'", fix)
    return Check(name, "ok", found, "enough for DataLoader workers and NCCL")


def _check_nccl(p: Probes, settings: Settings) -> Check:
    """What settings_from_probes decided for NCCL, said as a check: the same source as ``--env``."""
    name = "nccl"
    setv = ", ".join(f"{k}={v}" for k, v in p.nccl.variables.items()) or "no NCCL_* variables set"
    if p.platform != "wsl2":
        return Check(name, "ok", setv, "no WSL-specific NCCL settings needed")
    n = p.gpu_count
    if n is not None and n <= 1:
        return Check(name, "ok", f"{setv}; {n} GPU", "a single GPU needs no NCCL transport changes")
    gpus = "GPU count unknown (assuming several)" if n is None else f"{n} GPUs under WSL2"
    need = {k: v for k, v in settings.distributed_env().items() if k.startswith("NCCL_")}
    kept = {k: v for k, v in settings.kept.items() if k.startswith("NCCL_")}
    if need or kept:
        why = "; ".join(f"{k}: {settings.reasons[k]}" for k in [*need, *kept])
        fix = "export " + " ".join(f"{k}={v}" for k, v in {**need, **kept}.items())
        return Check(name, "warn", f"{setv}; {gpus}", why, fix)
    return Check(name, "ok", f"{setv}; {gpus}", "WSL-safe NCCL transport settings are in place")


def _check_pinned(p: Probes, pinned: GpuProbeResult | None, settings: Settings) -> Check:
    name = "pinned_memory"
    budget = f"torch_wsl's pinned budget: {_gib(settings.pinned_budget_bytes)}"
    if pinned is None:
        return Check(name, "skipped", f"not measured (run with --probe-gpu); {budget}", "the pinned-memory ceiling needs a GPU probe")
    if pinned.status == "skipped":
        return Check(name, "skipped", f"{pinned.detail}; {budget}", "the pinned-memory ceiling needs a GPU")
    if pinned.status == "unknown":
        return Check(name, "warn", f"the probe did not finish: {pinned.detail}", "pinning memory may hang on this driver",
                     "DataLoader(pin_memory=False) until it does")
    if pinned.status == "failed":
        return Check(name, "warn", pinned.detail, "pin_memory=True fails with 'CUDA error: out of memory' (microsoft/WSL#8447)",
                     "DataLoader(pin_memory=False); torch_wsl copies from pageable memory")
    ceiling = int(pinned.value or 0)
    found = f"largest pinned allocation {_gib(ceiling)} ({pinned.detail}); {budget}"
    if p.platform == "wsl2" and ceiling < PINNED_LOW_BYTES:
        return Check(name, "warn", found,
                     "pinned buffers past the ceiling fail with 'CUDA error: out of memory' (microsoft/WSL#14078, #8447)",
                     f"keep pinned batches under {_gib(ceiling)} (smaller batch or pin_memory=False); torch_wsl's pool stays under its budget")
    return Check(name, "ok", found, "pinned buffers up to this size work")


def _check_vmm(p: Probes, vmm: GpuProbeResult | None) -> Check:
    name = "cuda_vmm"
    if vmm is None:
        return Check(name, "skipped", "not probed (run with --probe-gpu)", "whether expandable segments work needs a GPU probe")
    if vmm.status == "skipped":
        return Check(name, "skipped", vmm.detail, "needs a GPU")
    if vmm.status == "ok":
        return Check(name, "ok", vmm.detail, "expandable_segments:True is safe on this driver")
    if vmm.status == "unknown":
        return Check(name, "warn", f"the probe did not finish: {vmm.detail}", "CUDA virtual memory may hang on this driver",
                     "do not set expandable_segments:True in PYTORCH_CUDA_ALLOC_CONF")
    return Check(name, "warn", f"CUDA virtual memory fails: {vmm.detail}",
                 "expandable_segments:True would fail here (pytorch/pytorch#192330); torch_wsl uses plain segments",
                 "do not set expandable_segments:True in PYTORCH_CUDA_ALLOC_CONF")


def checks_from_probes(
    probes: Probes,
    *,
    pinned: GpuProbeResult | None = None,
    vmm: GpuProbeResult | None = None,
    settings: Settings | None = None,
) -> list[Check]:
    """All checks, in display order, from probe results (pure; no I/O)."""
    settings = settings or settings_from_probes(probes, pinned=pinned, vmm=vmm)
    return [
        _check_platform(probes),
        _check_gpu_device(probes),
        _check_driver(probes),
        _check_libcuda(probes),
        _check_triton(probes),
        _check_torch(probes),
        _check_build(probes),
        _check_alloc_conf(probes, vmm, settings),
        _check_memory(probes),
        _check_shm(probes),
        _check_nccl(probes, settings),
        _check_pinned(probes, pinned, settings),
        _check_vmm(probes, vmm),
    ]


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    """The doctor's result: checks, the settings it recommends, and how long it took."""

    checks: list[Check]
    settings: Settings
    platform: str
    elapsed_s: float
    probes: Probes | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        """1 if any check failed, else 0."""
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-able dict following :data:`REPORT_SCHEMA`."""
        return {
            "schema_version": SCHEMA_VERSION,
            "checks": [asdict(c) for c in self.checks],
            "summary": {"platform": self.platform, **self.counts(), "exit_code": self.exit_code,
                        "elapsed_s": round(self.elapsed_s, 3)},
            "settings": {
                "use_expandable_segments": self.settings.use_expandable_segments,
                "vram_budget_fraction": self.settings.vram_budget_fraction,
                "pinned_budget_bytes": self.settings.pinned_budget_bytes,
                "env": dict(self.settings.env),
            },
        }

    def format_text(self) -> str:
        """One line per check: status, name, what was found; for warn/fail also why and the fix."""
        lines = []
        for c in self.checks:
            line = f"{c.status.upper():<7} {c.name:<16} {c.found}"
            if c.status in ("warn", "fail"):
                line += f" | why: {c.why}"
                if c.fix:
                    line += f" | fix: {c.fix}"
            lines.append(line)
        n = self.counts()
        lines.append(f"summary: {n['ok']} ok, {n['warn']} warn, {n['fail']} fail, {n['skipped']} skipped "
                     f"({self.platform}; checks took {self.elapsed_s * 1000:.0f} ms)"
                     + ("; `python -m torch_wsl doctor --env` prints the exports" if self.settings.env else ""))
        return "\n".join(lines)

    def format_env(self) -> str:
        """Shell lines to apply the recommended environment (a comment if there is nothing to change)."""
        lines = self.settings.exports()
        return "\n".join(lines) if lines else "# torch_wsl: no environment changes recommended"


def run_doctor(
    env: Env | None = None,
    *,
    probe_gpu: bool = False,
    gpu_timeout: float = GPU_PROBE_TIMEOUT_S,
) -> Report:
    """Probe the machine and build the report.

    ``probe_gpu`` also runs the GPU probes (pinned-memory ceiling, CUDA VMM),
    each in a subprocess bounded by ``gpu_timeout`` seconds; they report
    "skipped" without a GPU.
    """
    start = time.monotonic()
    env = env or real_env()
    probes = probe_all(env)
    pinned = vmm = None
    if probe_gpu:
        pinned = probe_pinned_ceiling(env, timeout=gpu_timeout, torch_info=probes.torch)
        vmm = probe_vmm(env, timeout=gpu_timeout, torch_info=probes.torch)
    settings = settings_from_probes(probes, pinned=pinned, vmm=vmm)
    checks = checks_from_probes(probes, pinned=pinned, vmm=vmm, settings=settings)
    return Report(checks, settings, probes.platform, time.monotonic() - start, probes)


# --------------------------------------------------------------------------- schema validation


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def validate_schema(instance: Any, schema: dict[str, Any] = REPORT_SCHEMA, path: str = "$") -> list[str]:
    """Validate against the JSON Schema subset used by :data:`REPORT_SCHEMA`; return the errors (empty: valid).

    Supports ``type`` (string or list), ``enum``, ``required``, ``properties``,
    ``additionalProperties`` (bool or schema), ``items``, ``minItems``,
    ``minLength``, ``minimum`` and ``maximum`` — enough to keep the report's
    shape stable without depending on ``jsonschema``.
    """
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(instance, t) for t in names):
            return [f"{path}: expected {'/'.join(names)}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors += validate_schema(value, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, dict):
                errors += validate_schema(value, extra, f"{path}.{key}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += validate_schema(item, schema["items"], f"{path}[{i}]")
    if isinstance(instance, str) and len(instance) < schema.get("minLength", 0):
        errors.append(f"{path}: shorter than {schema['minLength']}")
    if _is_type(instance, "number"):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} < {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} > {schema['maximum']}")
    return errors
