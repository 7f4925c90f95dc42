"""Probes of the machine: each reads through an :class:`~torch_wsl.env.Env` and returns a frozen dataclass.

A fact that cannot be learned (file missing or unreadable, command absent or
timed out) is ``None`` ("unknown") and the reason is appended to the
result's ``errors``; no probe raises for the state of the machine. The probes
here are cheap (a few file reads, ``ldconfig -p`` and ``nvidia-smi`` with time
bounds); the one that asks torch whether a GPU is visible starts a subprocess
only when a GPU device node exists. Probes that need to use the GPU live in
:mod:`torch_wsl.env.gpu`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field

from ._fs import Env, real_env

__all__ = [
    "INFINIBAND_SYSFS",
    "WSL_LIB_DIR",
    "AllocConfInfo",
    "DeviceNodes",
    "DriverInfo",
    "GpuName",
    "LibcudaInfo",
    "MemoryInfo",
    "NcclInfo",
    "Probes",
    "TorchInfo",
    "TritonInfo",
    "WslInfo",
    "parse_alloc_conf",
    "parse_size",
    "probe_all",
    "probe_alloc_conf",
    "probe_device_nodes",
    "probe_driver",
    "probe_libcuda",
    "probe_memory",
    "probe_nccl",
    "probe_torch",
    "probe_triton",
    "probe_wsl",
]

#: Where WSL2 mounts the Windows driver's user-mode libraries (libcuda.so*, nvidia-smi).
#: Source: NVIDIA CUDA on WSL User Guide.
WSL_LIB_DIR = "/usr/lib/wsl/lib"

#: The loader configuration WSL writes so that ldconfig caches WSL_LIB_DIR.
WSL_LD_CONF = "/etc/ld.so.conf.d/ld.wsl.conf"

#: Directories GNU ld searches for ``-l`` after ``-L`` and ``LIBRARY_PATH`` (x86-64 Debian/Fedora).
LINKER_DEFAULT_DIRS = (
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)

#: Seconds allowed for ``ldconfig -p`` and for ``nvidia-smi`` (which can stall on a broken driver).
LDCONFIG_TIMEOUT_S = 5.0
NVIDIA_SMI_TIMEOUT_S = 10.0

#: Seconds allowed for the subprocess that asks torch whether it sees a GPU
#: (CUDA initialization through GPU-PV can take several seconds on WSL2).
TORCH_DEVICE_TIMEOUT_S = 30.0


def _add(errors: list[str], msg: str | None) -> None:
    if msg and msg not in errors:
        errors.append(msg)


# --------------------------------------------------------------------------- WSL


@dataclass(frozen=True)
class WslInfo:
    """Whether this is WSL, and which version.

    ``is_wsl``/``version`` are None when the kernel files could not be read.
    ``in_container`` is True inside Docker/Podman (``/.dockerenv``, ``/run/.containerenv``).
    """

    is_wsl: bool | None
    version: int | None
    kernel: str | None
    distro: str | None
    in_container: bool | None
    errors: tuple[str, ...] = ()


def _kernel_major_minor(kernel: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", kernel)
    return (int(m.group(1)), int(m.group(2))) if m else None


def probe_wsl(env: Env | None = None) -> WslInfo:
    """Detect WSL from ``/proc/sys/kernel/osrelease`` and ``/proc/version``.

    WSL2 kernels say ``microsoft-standard-WSL2`` (older ones ``-microsoft-standard``);
    WSL1 reports a 4.4 kernel named ``...-Microsoft`` and has no GPU support.
    A custom WSL2 kernel is still recognised by ``WSL_DISTRO_NAME``/``WSL_INTEROP``
    or ``/proc/sys/fs/binfmt_misc/WSLInterop``.
    """
    env = env or real_env()
    errors: list[str] = []
    rel = env.read("/proc/sys/kernel/osrelease")
    ver = env.read("/proc/version")
    _add(errors, rel.error)
    _add(errors, ver.error)
    kernel = rel.text.strip() if rel.text else None
    if kernel is None and ver.text:
        m = re.match(r"Linux version (\S+)", ver.text)
        kernel = m.group(1) if m else None
    distro = env.environ.get("WSL_DISTRO_NAME") or None
    docker = env.exists("/.dockerenv")
    podman = env.exists("/run/.containerenv")
    in_container = True if (docker or podman) else (None if None in (docker, podman) else False)

    text = " ".join(t for t in (rel.text, ver.text) if t)
    low = text.lower()
    is_wsl: bool | None
    version: int | None = None
    if "microsoft" in low or "wsl" in low:
        is_wsl = True
        if "wsl2" in low or "microsoft-standard" in low:
            version = 2
        else:
            mm = _kernel_major_minor(kernel or "")
            version = 1 if mm == (4, 4) else (2 if mm is not None else None)
    elif env.environ.get("WSL_DISTRO_NAME") or env.environ.get("WSL_INTEROP") or env.exists(
        "/proc/sys/fs/binfmt_misc/WSLInterop"
    ):
        is_wsl, version = True, 2  # WSL1 always reports the Microsoft kernel; this is a custom WSL2 kernel
    elif text:
        is_wsl = False
    else:
        is_wsl = None
    return WslInfo(is_wsl, version, kernel, distro, in_container, tuple(errors))


# --------------------------------------------------------------------------- device nodes


@dataclass(frozen=True)
class DeviceNodes:
    """GPU device nodes: ``/dev/dxg`` (WSL2 GPU paravirtualization) and native ``/dev/nvidia*``."""

    dxg: bool | None
    nvidia: tuple[str, ...] | None
    errors: tuple[str, ...] = ()

    @property
    def any_gpu_node(self) -> bool:
        return bool(self.dxg) or bool(self.nvidia)


def probe_device_nodes(env: Env | None = None) -> DeviceNodes:
    """Which GPU device nodes exist (None: could not be told)."""
    env = env or real_env()
    errors: list[str] = []
    dxg = env.exists("/dev/dxg")
    if dxg is None:
        errors.append("/dev/dxg: cannot stat")
    names = env.listdir("/dev")
    nvidia: tuple[str, ...] | None
    if names is None:
        nvidia = None
        errors.append("/dev: cannot list")
    else:
        nvidia = tuple("/dev/" + n for n in names if re.fullmatch(r"nvidia(\d+|ctl)", n))
    return DeviceNodes(dxg, nvidia, tuple(errors))


# --------------------------------------------------------------------------- libcuda


@dataclass(frozen=True)
class LibcudaInfo:
    """Where ``libcuda`` (the driver's user-mode library) is, and who finds it.

    ``wsl_files`` maps ``libcuda.so``, ``libcuda.so.1`` to their presence in
    ``/usr/lib/wsl/lib``. ``cache_dirs`` are the directories ``ldconfig -p``
    lists for ``libcuda.so.1`` (None: ldconfig unavailable; then
    ``cache_from_conf`` is True and they come from ``/etc/ld.so.conf``).
    ``loader_dirs`` are where the dynamic loader finds ``libcuda.so.1``:
    ``LD_LIBRARY_PATH`` first, then the cache. ``foreign_dirs`` hold a
    ``libcuda.so.1`` outside ``/usr/lib/wsl/lib`` (on WSL2 a Linux driver
    installed inside the VM, which must not be). ``stub_dirs`` are
    ``LD_LIBRARY_PATH`` entries holding the CUDA toolkit's link-only stub.
    """

    wsl_lib_dir: bool | None
    wsl_files: dict[str, bool | None]
    wsl_ld_conf: bool | None
    cache_dirs: tuple[str, ...] | None
    cache_from_conf: bool
    ld_library_path_dirs: tuple[str, ...]
    loader_dirs: tuple[str, ...]
    loader_finds: bool | None
    foreign_dirs: tuple[str, ...]
    stub_dirs: tuple[str, ...]
    errors: tuple[str, ...] = ()


def _ld_conf_dirs(env: Env, path: str = "/etc/ld.so.conf", depth: int = 0) -> list[str]:
    """Directories named by ld.so.conf and its ``include`` globs (read through the root)."""
    text = env.read_text(path)
    if text is None or depth > 4:
        return []
    dirs: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include"):
            pattern = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
            parent, _, glob = pattern.rpartition("/")
            parent = parent or "/etc"
            rx = re.compile("^" + re.escape(glob).replace(r"\*", ".*") + "$")
            for name in env.listdir(parent) or []:
                if rx.match(name):
                    dirs += _ld_conf_dirs(env, f"{parent}/{name}", depth + 1)
        else:
            dirs.append(line)
    return dirs


def _parse_ldconfig(stdout: str, soname: str) -> list[str]:
    out: list[str] = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(soname + " ") and "=>" in line:
            d = os.path.dirname(line.split("=>", 1)[1].strip())
            if d not in out:
                out.append(d)
    return out


def _ldconfig_dirs(env: Env, soname: str) -> tuple[list[str] | None, str | None]:
    """Directories the loader cache lists for ``soname`` (via ``ldconfig -p``), or (None, reason)."""
    exe = "/sbin/ldconfig" if env.exists("/sbin/ldconfig") else env.which("ldconfig", ("/sbin", "/usr/sbin"))
    if not exe:
        return None, "ldconfig: not found"
    res = env.run([exe, "-p"], LDCONFIG_TIMEOUT_S)
    if not res.ok:
        return None, f"ldconfig -p: {res.error or 'exit status %s' % res.returncode}"
    return _parse_ldconfig(res.stdout, soname), None


def probe_libcuda(env: Env | None = None) -> LibcudaInfo:
    """Find ``libcuda.so``/``libcuda.so.1`` in ``/usr/lib/wsl/lib``, the loader cache and ``LD_LIBRARY_PATH``."""
    env = env or real_env()
    errors: list[str] = []
    wsl_dir = env.exists(WSL_LIB_DIR)
    wsl_files = {n: env.exists(f"{WSL_LIB_DIR}/{n}") for n in ("libcuda.so", "libcuda.so.1")}
    wsl_conf = env.exists(WSL_LD_CONF)

    cache, err = _ldconfig_dirs(env, "libcuda.so.1")
    from_conf = False
    if cache is None:
        _add(errors, err)
        conf_dirs = _ld_conf_dirs(env)
        if conf_dirs or env.exists("/etc/ld.so.conf"):
            from_conf = True
            cache = [d for d in dict.fromkeys(conf_dirs + list(LINKER_DEFAULT_DIRS)) if env.exists(f"{d}/libcuda.so.1")]

    ldlp = [d for d in env.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    ldlp_hits = [d for d in ldlp if env.exists(f"{d}/libcuda.so.1")]
    stubs = [d for d in ldlp if "stubs" in d.split("/") and env.exists(f"{d}/libcuda.so")]
    loader = list(dict.fromkeys(ldlp_hits + (cache or [])))
    loader_finds: bool | None = True if loader else (None if cache is None else False)
    foreign = [d for d in loader if os.path.normpath(d) != WSL_LIB_DIR]
    return LibcudaInfo(
        wsl_lib_dir=wsl_dir,
        wsl_files=wsl_files,
        wsl_ld_conf=wsl_conf,
        cache_dirs=None if cache is None else tuple(cache),
        cache_from_conf=from_conf,
        ld_library_path_dirs=tuple(ldlp_hits),
        loader_dirs=tuple(loader),
        loader_finds=loader_finds,
        foreign_dirs=tuple(foreign),
        stub_dirs=tuple(stubs),
        errors=tuple(errors),
    )


# --------------------------------------------------------------------------- triton


@dataclass(frozen=True)
class TritonInfo:
    """Whether Triton (``torch.compile``'s GPU code generator) will find libcuda.

    ``links`` is the file Triton's NVIDIA launcher links against:
    ``libcuda.so`` (``-lcuda``, older Triton) or ``libcuda.so.1`` (newer,
    triton-lang/triton#8668). ``search_dirs`` are the directories Triton
    computes itself: ``TRITON_LIBCUDA_PATH`` if set, else those ``ldconfig -p``
    lists for ``libcuda.so.1``, else the ``LD_LIBRARY_PATH`` entries holding it.
    ``finds`` is None when unknown; ``problem`` says what will fail.
    """

    installed: bool | None
    version: str | None
    links: str | None
    libcuda_path_env: str | None
    search_dirs: tuple[str, ...] | None
    finds: bool | None
    problem: str | None
    errors: tuple[str, ...] = ()


def _real_triton_facts() -> dict | None:
    """Version and link target of the installed Triton, without importing it."""
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None
    try:
        from importlib.metadata import version

        ver: str | None = version("triton")
    except Exception:
        ver = None
    links = None
    driver = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "driver.py")
    try:
        with open(driver, encoding="utf-8", errors="replace") as f:
            src = f.read(1 << 20)
        m = re.search(r"^libraries\s*=\s*\[([^\]]*)\]", src, re.M)
        if m:
            links = "libcuda.so.1" if "libcuda.so.1" in m.group(1) else "libcuda.so"
    except OSError:
        pass
    return {"version": ver, "links": links}


def probe_triton(env: Env | None = None, libcuda: LibcudaInfo | None = None) -> TritonInfo:
    """Replay Triton's own libcuda lookup (``triton/backends/nvidia/driver.py: libcuda_dirs``) on this machine."""
    env = env or real_env()
    errors: list[str] = []
    if env.is_real:
        facts = _real_triton_facts()
        installed: bool | None = facts is not None
    else:
        tf = (env.fixture("torch") or {})
        installed = None if "triton" not in tf else tf["triton"] is not None
        facts = tf.get("triton") if isinstance(tf.get("triton"), dict) else None
    version = facts.get("version") if facts else None
    links = facts.get("links") if facts else None
    path_env = env.environ.get("TRITON_LIBCUDA_PATH") or None
    if not installed:
        return TritonInfo(installed, None, None, path_env, None, None, None, tuple(errors))
    libcuda = libcuda or probe_libcuda(env)
    if path_env:
        dirs: list[str] | None = [path_env]
    elif libcuda.cache_dirs:
        dirs = list(libcuda.cache_dirs)
    else:
        dirs = list(libcuda.ld_library_path_dirs)
        if not dirs and libcuda.cache_dirs is None:
            dirs = None
    if dirs is None:
        return TritonInfo(installed, version, links, path_env, None, None, None, libcuda.errors)
    has_so1 = [d for d in dirs if env.exists(f"{d}/libcuda.so.1")]
    problem = None
    if not has_so1:
        problem = "no libcuda.so.1 in " + (", ".join(dirs) if dirs else "any directory Triton searches")
    else:
        link_name = links or "libcuda.so"  # unknown: assume the stricter, older behaviour
        library_path = [d for d in env.environ.get("LIBRARY_PATH", "").split(":") if d]
        linker_dirs = list(dict.fromkeys(dirs + library_path + list(LINKER_DEFAULT_DIRS)))
        if not any(env.exists(f"{d}/{link_name}") for d in linker_dirs):
            problem = f"the linker cannot find {link_name} (Triton links with -l{'cuda' if link_name == 'libcuda.so' else ':' + link_name})"
    return TritonInfo(installed, version, links, path_env, tuple(dirs), problem is None, problem, tuple(errors))


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class GpuName:
    """A GPU as the driver lists it (memory in bytes, None if unknown)."""

    index: int
    name: str
    memory: int | None = None


@dataclass(frozen=True)
class DriverInfo:
    """NVIDIA driver version and the newest CUDA it supports.

    ``source`` is ``"nvidia-smi"``, ``"/proc/driver/nvidia"`` or None. On WSL2
    the version is the Windows driver's. ``gpus`` is None when unknown.
    """

    source: str | None
    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[GpuName, ...] | None
    nvidia_smi: str | None
    errors: tuple[str, ...] = ()


def _parse_nvidia_smi(text: str) -> tuple[str | None, str | None, list[GpuName]]:
    drv = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
    gpus: list[GpuName] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\|\s+(\d+)\s+(.+?)\s+(?:On|Off)\s+\|", line)
        if not m:
            continue
        mem = None
        if i + 1 < len(lines):
            mm = re.search(r"(\d+)\s*MiB\s*/\s*(\d+)\s*MiB", lines[i + 1])
            if mm:
                mem = int(mm.group(2)) << 20
        gpus.append(GpuName(int(m.group(1)), m.group(2).strip(), mem))
    return (drv.group(1) if drv else None, cuda.group(1) if cuda else None, gpus)


def probe_driver(env: Env | None = None) -> DriverInfo:
    """Ask ``nvidia-smi`` (bounded by a timeout); else read ``/proc/driver/nvidia`` (native Linux)."""
    env = env or real_env()
    errors: list[str] = []
    smi = env.which("nvidia-smi", (WSL_LIB_DIR, "/usr/bin"))
    if smi:
        res = env.run([smi], NVIDIA_SMI_TIMEOUT_S)
        if res.ok:
            drv, cuda, gpus = _parse_nvidia_smi(res.stdout)
            if drv:
                return DriverInfo("nvidia-smi", drv, cuda, tuple(gpus), smi, tuple(errors))
            errors.append("nvidia-smi: output not understood")
        else:
            msg = res.error or f"exit status {res.returncode}"
            first = (res.stdout or res.stderr).strip().splitlines()
            errors.append(f"nvidia-smi: {msg}" + (f" ({first[0][:160]})" if first else ""))
    ver = env.read("/proc/driver/nvidia/version")
    if ver.text:
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([\d.]+)", ver.text)
        gpus = []
        for i, d in enumerate(env.listdir("/proc/driver/nvidia/gpus") or []):
            info = env.read_text(f"/proc/driver/nvidia/gpus/{d}/information") or ""
            mm = re.search(r"^Model:\s*(.+)$", info, re.M)
            gpus.append(GpuName(i, mm.group(1).strip() if mm else "unknown"))
        return DriverInfo("/proc/driver/nvidia", m.group(1) if m else None, None, tuple(gpus), smi, tuple(errors))
    if not smi and ver.error and "missing" not in ver.error:
        errors.append(ver.error)
    return DriverInfo(None, None, None, None if errors else (), smi, tuple(errors))


# --------------------------------------------------------------------------- torch


@dataclass(frozen=True)
class TorchInfo:
    """The installed torch and what it sees.

    ``cuda`` is ``torch.version.cuda`` (None: a CPU-only build). The device
    fields are filled only when ``device_checked``; otherwise ``device_reason``
    says why not (e.g. no GPU device node, so nothing to ask).
    ``torch_wsl_build`` is torch_wsl's build configuration when readable.
    """

    installed: bool | None
    version: str | None
    cuda: str | None
    device_checked: bool
    device_available: bool | None
    device_count: int | None
    device_name: str | None
    device_memory: int | None
    capability: tuple[int, int] | None
    device_reason: str | None
    torch_wsl_build: dict | None = None
    errors: tuple[str, ...] = ()


_DEVICE_SCRIPT = r"""
import json
out = {}
try:
    import torch
    out["available"] = bool(torch.cuda.is_available())
    if out["available"]:
        out["count"] = torch.cuda.device_count()
        p = torch.cuda.get_device_properties(0)
        out["name"] = p.name
        out["total_memory"] = int(p.total_memory)
        out["capability"] = [p.major, p.minor]
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e).splitlines()[0][:300] if str(e) else type(e).__name__
print("TORCH_WSL_JSON" + json.dumps(out))
"""


def _parse_marked_json(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("TORCH_WSL_JSON"):
            try:
                data = json.loads(line[len("TORCH_WSL_JSON") :])
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None


def _torch_wsl_build() -> dict | None:
    try:
        cfg = importlib.import_module("torch_wsl._build_config")
    except Exception:
        return None
    return {
        "torch_version": getattr(cfg, "TORCH_VERSION", None),
        "with_cuda": getattr(cfg, "WITH_CUDA", None),
        "cuda_archs": getattr(cfg, "CUDA_ARCHS", None),
    }


def probe_torch(env: Env | None = None, *, check_device: bool | None = None) -> TorchInfo:
    """Version and CUDA build of torch; whether it sees a GPU, its name and memory.

    ``check_device=None`` (default) asks only when a GPU device node exists
    (``/dev/dxg`` or ``/dev/nvidia*``), in a subprocess bounded by
    ``TORCH_DEVICE_TIMEOUT_S``, since CUDA initialization can hang on a broken
    driver. If CUDA is already initialized in this process it is asked directly.
    """
    env = env or real_env()
    if not env.is_real:
        return _fixture_torch(env, check_device)
    errors: list[str] = []
    try:
        import torch
    except Exception as e:  # not installed, or broken
        return TorchInfo(False, None, None, False, None, None, None, None, None, "torch is not importable",
                         _torch_wsl_build(), (f"import torch: {type(e).__name__}: {e}",))
    version = str(torch.__version__)
    cuda = getattr(torch.version, "cuda", None)
    build = _torch_wsl_build()
    nodes = probe_device_nodes(env)
    if check_device is None:
        check_device = nodes.any_gpu_node
    if not check_device:
        reason = "no GPU device node (/dev/dxg, /dev/nvidia*)" if not nodes.any_gpu_node else "not requested"
        return TorchInfo(True, version, cuda, False, None, None, None, None, None, reason, build, ())
    if cuda is None:
        return TorchInfo(True, version, cuda, True, False, 0, None, None, None, "CPU-only build of torch", build, ())
    data: dict | None
    try:
        initialized = bool(torch.cuda.is_initialized())
    except Exception:
        initialized = False
    if initialized:
        data = {"available": torch.cuda.is_available()}
        if data["available"]:
            p = torch.cuda.get_device_properties(0)
            data.update(count=torch.cuda.device_count(), name=p.name, total_memory=int(p.total_memory),
                        capability=[p.major, p.minor])
    else:
        res = env.run([sys.executable, "-c", _DEVICE_SCRIPT], TORCH_DEVICE_TIMEOUT_S)
        data = _parse_marked_json(res.stdout)
        if data is None:
            msg = res.error or f"exit status {res.returncode}"
            errors.append(f"torch device check: {msg}")
            return TorchInfo(True, version, cuda, True, None, None, None, None, None,
                             f"device check failed: {msg}", build, tuple(errors))
    return _torch_from_data(True, version, cuda, data, build, errors)


def _torch_from_data(installed: bool | None, version: str | None, cuda: str | None, data: dict,
                     build: dict | None, errors: list[str]) -> TorchInfo:
    if data.get("error"):
        errors.append(f"torch.cuda: {data['error']}")
    cap = data.get("capability")
    return TorchInfo(
        installed, version, cuda, True,
        data.get("available") if isinstance(data.get("available"), bool) else None,
        data.get("count"), data.get("name"), data.get("total_memory"),
        (int(cap[0]), int(cap[1])) if isinstance(cap, (list, tuple)) and len(cap) == 2 else None,
        data.get("error"), build, tuple(errors),
    )


def _fixture_torch(env: Env, check_device: bool | None) -> TorchInfo:
    f = env.fixture("torch")
    if f is None:
        return TorchInfo(None, None, None, False, None, None, None, None, None,
                         "no torch facts in this root", None, ("_fixture/torch.json: missing",))
    build = f.get("torch_wsl_build") if isinstance(f.get("torch_wsl_build"), dict) else None
    installed = f.get("version") is not None
    nodes = probe_device_nodes(env)
    if check_device is None:
        check_device = nodes.any_gpu_node
    dev = f.get("device")
    if not check_device or not isinstance(dev, dict):
        reason = "no GPU device node (/dev/dxg, /dev/nvidia*)" if not nodes.any_gpu_node else "not requested"
        return TorchInfo(installed, f.get("version"), f.get("cuda"), False, None, None, None, None, None,
                         reason, build, ())
    return _torch_from_data(installed, f.get("version"), f.get("cuda"), dev, build, [])


# --------------------------------------------------------------------------- allocator config


@dataclass(frozen=True)
class AllocConfInfo:
    """PyTorch's CUDA caching-allocator configuration from the environment.

    ``variable`` is the one PyTorch reads (``PYTORCH_CUDA_ALLOC_CONF``, else
    ``PYTORCH_ALLOC_CONF``; c10/cuda/CUDAAllocatorConfig.h), None when unset.
    ``expandable_segments`` is the parsed value (None: not mentioned);
    ``malformed`` lists entries that are not ``key:value``.
    """

    variable: str | None
    raw: str | None
    options: dict[str, str]
    expandable_segments: bool | None
    malformed: tuple[str, ...]


def parse_alloc_conf(raw: str) -> tuple[dict[str, str], list[str]]:
    """Split ``"k1:v1,k2:[a,b]"`` into a dict; also return the entries that are not ``key:value``."""
    items: list[str] = []
    depth, cur = 0, ""
    for ch in raw:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    options: dict[str, str] = {}
    bad: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition(":")
        if not sep or not key.strip() or not value.strip():
            bad.append(item)
        else:
            options[key.strip()] = value.strip()
    return options, bad


def probe_alloc_conf(env: Env | None = None) -> AllocConfInfo:
    """Read and parse ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``)."""
    env = env or real_env()
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        raw = env.environ.get(var)
        if raw is not None:
            options, bad = parse_alloc_conf(raw)
            exp = options.get("expandable_segments")
            expandable = None if exp is None else exp.strip().lower() in ("true", "1")
            return AllocConfInfo(var, raw, options, expandable, tuple(bad))
    return AllocConfInfo(None, None, {}, None, ())


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryInfo:
    """The VM's memory in bytes (None: unknown): RAM, swap and the size of ``/dev/shm``."""

    mem_total: int | None
    mem_available: int | None
    swap_total: int | None
    shm_size: int | None
    shm_source: str | None
    errors: tuple[str, ...] = ()


def parse_size(text: str, mem_total: int | None = None) -> int | None:
    """Parse a tmpfs ``size=`` value (``65536k``, ``8g``, ``50%``) into bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT%]?)", text.strip())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).lower()
    if unit == "%":
        return None if mem_total is None else mem_total * n // 100
    return n << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


def probe_memory(env: Env | None = None) -> MemoryInfo:
    """``MemTotal``, ``MemAvailable``, ``SwapTotal`` from ``/proc/meminfo``; ``/dev/shm`` size from ``/proc/mounts``.

    A tmpfs mounted without ``size=`` gets half of RAM (the kernel default);
    on the real machine ``statvfs`` is the fallback.
    """
    env = env or real_env()
    errors: list[str] = []
    fields: dict[str, int] = {}
    mi = env.read("/proc/meminfo")
    _add(errors, mi.error)
    for line in (mi.text or "").splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            fields[m.group(1)] = int(m.group(2)) << 10
    if mi.text is not None and "MemTotal" not in fields:
        errors.append("/proc/meminfo: no MemTotal")
    total = fields.get("MemTotal")
    shm, source = None, None
    mounts = env.read("/proc/mounts")
    if mounts.text is None:
        _add(errors, mounts.error)
    for line in (mounts.text or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "/dev/shm":
            opts = dict((o.split("=", 1) + [""])[:2] for o in parts[3].split(","))
            if "size" in opts:
                shm, source = parse_size(opts["size"], total), "/proc/mounts"
            elif parts[2] == "tmpfs" and total is not None:
                shm, source = total // 2, "/proc/mounts, tmpfs default: half of RAM"
    if shm is None:
        size = env.statvfs_size("/dev/shm")
        if size is not None:
            shm, source = size, "statvfs"
    return MemoryInfo(total, fields.get("MemAvailable"), fields.get("SwapTotal"), shm, source, tuple(errors))


# --------------------------------------------------------------------------- NCCL


@dataclass(frozen=True)
class NcclInfo:
    """What NCCL will find: its environment variables (``NCCL_*``) as set now, and the InfiniBand devices.

    ``ib_devices`` are the entries of ``/sys/class/infiniband`` (the RDMA devices
    NCCL's IB transport would open): ``()`` when the directory is absent (no
    RDMA stack, as in a WSL2 VM), None when it exists but cannot be listed.
    """

    variables: dict[str, str]
    ib_devices: tuple[str, ...] | None = None
    errors: tuple[str, ...] = ()

    def get(self, name: str) -> str | None:
        return self.variables.get(name)


#: Where the kernel lists RDMA (InfiniBand/RoCE) devices.
INFINIBAND_SYSFS = "/sys/class/infiniband"


def probe_nccl(env: Env | None = None) -> NcclInfo:
    """Collect ``NCCL_*`` environment variables and list ``/sys/class/infiniband``."""
    env = env or real_env()
    variables = {k: v for k, v in sorted(env.environ.items()) if k.startswith("NCCL_")}
    present = env.exists(INFINIBAND_SYSFS)
    names = env.listdir(INFINIBAND_SYSFS) if present else None
    if present is False:
        return NcclInfo(variables, ())
    if names is None:
        return NcclInfo(variables, None, (f"{INFINIBAND_SYSFS}: cannot list",))
    return NcclInfo(variables, tuple(names))


# --------------------------------------------------------------------------- all


@dataclass(frozen=True)
class Probes:
    """The results of all cheap probes, as taken together by :func:`probe_all`."""

    root: str
    wsl: WslInfo
    devices: DeviceNodes
    libcuda: LibcudaInfo
    triton: TritonInfo
    driver: DriverInfo
    torch: TorchInfo
    alloc_conf: AllocConfInfo
    memory: MemoryInfo
    nccl: NcclInfo
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def gpu_count(self) -> int | None:
        """GPUs seen by torch if it was asked, else by the driver; None if unknown."""
        if self.torch.device_checked and self.torch.device_count is not None:
            return self.torch.device_count
        if self.driver.gpus is not None and self.driver.source is not None:
            return len(self.driver.gpus)
        return None

    @property
    def platform(self) -> str:
        """``"wsl2"``, ``"wsl1"``, ``"linux"`` or ``"unknown"``."""
        if self.wsl.is_wsl is None:
            return "unknown"
        if not self.wsl.is_wsl:
            return "linux"
        return {1: "wsl1", 2: "wsl2"}.get(self.wsl.version or 0, "unknown")


#: Environment variables that the checks and settings look at (kept in Probes.environ).
_ENV_OF_INTEREST = ("LD_LIBRARY_PATH", "LIBRARY_PATH", "TRITON_LIBCUDA_PATH", "WSL_DISTRO_NAME",
                    "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def probe_all(env: Env | None = None, *, check_device: bool | None = None) -> Probes:
    """Run every cheap probe once (see :func:`probe_torch` for ``check_device``)."""
    env = env or real_env()
    libcuda = probe_libcuda(env)
    return Probes(
        root=env.root,
        wsl=probe_wsl(env),
        devices=probe_device_nodes(env),
        libcuda=libcuda,
        triton=probe_triton(env, libcuda),
        driver=probe_driver(env),
        torch=probe_torch(env, check_device=check_device),
        alloc_conf=probe_alloc_conf(env),
        memory=probe_memory(env),
        nccl=probe_nccl(env),
        environ={k: env.environ[k] for k in _ENV_OF_INTEREST if k in env.environ},
    )
