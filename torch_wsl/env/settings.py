"""The settings torch_wsl would apply on this machine, from the probes.

Used by the allocator (VRAM and pinned budgets, whether to use CUDA virtual
memory), by distributed helpers (NCCL variables) and by the doctor's
``--env`` output. Every number is a named constant below, with its source or
the reason for its value; they are policies a user can override, not facts.
"""

from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass, field

from ._fs import Env, real_env
from .gpu import GpuProbeResult
from .probes import WSL_LIB_DIR, Probes, parse_alloc_conf, probe_all

__all__ = [
    "DDP_BUCKET_CAP_MB_WSL2",
    "DISTRIBUTED_PREFIXES",
    "NCCL_SHM_MIN_BYTES",
    "PINNED_BUDGET_WSL2_BYTES",
    "PINNED_PROBED_FRACTION",
    "PINNED_RAM_FRACTION",
    "VRAM_BUDGET_FRACTION_NATIVE",
    "VRAM_BUDGET_FRACTION_WSL2",
    "Settings",
    "ddp_bucket_cap_mb",
    "kept_reason",
    "recommended_settings",
    "settings_from_probes",
]

#: Pinned-host budget on WSL2 without a measured ceiling: 512 MiB.
#: ``pin_memory()`` fails above ~500 MB in Docker on WSL2 (microsoft/WSL#14078)
#: and around 1 GB elsewhere; NVIDIA's CUDA on WSL guide says pinned memory
#: "availability for applications is limited".
PINNED_BUDGET_WSL2_BYTES = 512 << 20

#: Never budget more than this fraction of the VM's RAM for pinned memory
#: (page-locked memory cannot be swapped; the rest of the process needs RAM too).
PINNED_RAM_FRACTION = 0.25

#: With a measured pinned ceiling, budget this fraction of it (headroom for
#: other processes and for the driver's own pinned buffers).
PINNED_PROBED_FRACTION = 0.75

#: Fraction of the free VRAM measured at start-up that the allocator may use on WSL2.
#: WSL2's hidden per-context overhead is much larger than native
#: (pytorch/pytorch#182286, microsoft/WSL#40401) and oversized allocations spill
#: silently into system memory instead of failing (microsoft/WSL#11050), so
#: torch_wsl keeps 10% headroom and fails fast at the budget.
VRAM_BUDGET_FRACTION_WSL2 = 0.90

#: The same fraction on native Linux, where allocations past VRAM fail cleanly.
VRAM_BUDGET_FRACTION_NATIVE = 0.95

#: A /dev/shm smaller than this is too small for NCCL's shared-memory transport: 1 GiB.
#: NCCL creates its inter-process segments there and fails to initialize when they
#: do not fit ("failed to extend /dev/shm/nccl-... to 4194660 bytes"); its
#: troubleshooting guide ("Shared memory") gives containers ``--shm-size=1g``, and
#: Docker's 64 MiB default fails (NVIDIA/nccl#342).
NCCL_SHM_MIN_BYTES = 1 << 30

#: DDP gradient bucket on WSL2, MiB: 40 million float32 gradients (152 MiB), the
#: bucket Megatron-Core's DDP uses by default "to ensure collectives do not become
#: latency-bound" (megatron/core/distributed/distributed_data_parallel_config.py),
#: against torch's 25 MiB. Under WSL2 NCCL has no peer-to-peer and no shared memory
#: (see the NCCL rules below), so every all-reduce goes GPU -> host -> socket ->
#: host -> GPU and pays that path's fixed cost: fewer, larger buckets pay it
#: fewer times. The price is overlap: a bucket is reduced only once all its
#: gradients exist. torch_wsl's choice, not a measured optimum: measure yours with
#: ``torch_wsl.distributed.count_collectives`` and ``python -m benchmarks --suite dist``.
DDP_BUCKET_CAP_MB_WSL2 = 40_000_000 * 4 >> 20

#: Prefixes of the environment variables that torch.distributed's backends read
#: (NCCL itself, Gloo, PyTorch's NCCL process group): the part of ``Settings.env``
#: that ``torch_wsl.distributed`` applies before a process group starts.
DISTRIBUTED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_")


@dataclass(frozen=True)
class Settings:
    """What torch_wsl would apply here.

    ``use_expandable_segments``: whether the allocator may use CUDA virtual
    memory (never on WSL unless the VMM probe passed). ``vram_budget_fraction``
    applies to the free VRAM measured at start-up. ``pinned_budget_bytes``
    caps the pinned-host pool. ``env`` maps environment variables to the
    value to export (None: unset it); ``reasons`` says why, per variable and
    per setting. A variable the user already set is never in ``env``; where
    torch_wsl would have chosen another value, ``kept`` maps it to that value
    (the user's stays; the doctor reports it). ``ddp_bucket_cap_mb`` is the
    DistributedDataParallel bucket torch_wsl recommends (None: torch's default).
    """

    platform: str
    use_expandable_segments: bool
    vram_budget_fraction: float
    pinned_budget_bytes: int
    env: dict[str, str | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    ddp_bucket_cap_mb: int | None = None

    def distributed_env(self) -> dict[str, str | None]:
        """The variables of ``env`` that torch.distributed's backends read (:data:`DISTRIBUTED_PREFIXES`)."""
        return {k: v for k, v in self.env.items() if k.startswith(DISTRIBUTED_PREFIXES)}

    def exports(self) -> list[str]:
        """Shell lines (``export NAME=value`` / ``unset NAME``) for ``env``."""
        lines = []
        for name, value in self.env.items():
            lines.append(f"unset {name}" if value is None else f"export {name}={shlex.quote(value)}")
        return lines


def _without_expandable(raw: str) -> str:
    options, bad = parse_alloc_conf(raw)
    options.pop("expandable_segments", None)
    return ",".join([f"{k}:{v}" for k, v in options.items()] + bad)


def settings_from_probes(
    probes: Probes,
    *,
    pinned: GpuProbeResult | None = None,
    vmm: GpuProbeResult | None = None,
) -> Settings:
    """Derive :class:`Settings` from probe results (pure; no I/O)."""
    platform = probes.platform
    wsl = platform != "linux"  # WSL, or unknown: be conservative
    env: dict[str, str | None] = {}
    reasons: dict[str, str] = {}

    vmm_ok = vmm is not None and vmm.status == "ok"
    if wsl:
        use_vmm = vmm_ok
        reasons["use_expandable_segments"] = (
            "CUDA virtual memory probed OK on this driver" if vmm_ok
            else "expandable segments fail on some WSL drivers (pytorch/pytorch#192330); not probed OK here"
            if platform != "unknown" else "platform unknown: not relying on CUDA virtual memory"
        )
    else:
        use_vmm = not (vmm is not None and vmm.status == "failed")
        reasons["use_expandable_segments"] = "native driver: CUDA virtual memory supported" if use_vmm else "VMM probe failed"

    vram = VRAM_BUDGET_FRACTION_WSL2 if wsl else VRAM_BUDGET_FRACTION_NATIVE
    reasons["vram_budget_fraction"] = "WSL2: hidden context overhead, silent sysmem fallback" if wsl else "native Linux"

    ram = probes.memory.mem_total
    ram_cap = int(ram * PINNED_RAM_FRACTION) if ram else None
    if pinned is not None and pinned.status == "ok" and isinstance(pinned.value, int) and pinned.value > 0:
        budget = int(pinned.value * PINNED_PROBED_FRACTION)
        why = f"{PINNED_PROBED_FRACTION:.0%} of the measured ceiling"
    elif pinned is not None and pinned.status == "failed":
        budget, why = 0, "pinning failed in the probe: use pageable copies"
    elif wsl:
        budget, why = PINNED_BUDGET_WSL2_BYTES, "WSL default (microsoft/WSL#14078: pinning fails above ~500 MB)"
    elif ram_cap:
        budget, why = ram_cap, f"{PINNED_RAM_FRACTION:.0%} of RAM"
    else:
        budget, why = PINNED_BUDGET_WSL2_BYTES, "RAM unknown: the conservative WSL2 default"
    if ram_cap is not None and budget > ram_cap:
        budget, why = ram_cap, why + f", capped at {PINNED_RAM_FRACTION:.0%} of RAM"
    reasons["pinned_budget_bytes"] = why

    if platform == "wsl2":
        ac = probes.alloc_conf
        if ac.expandable_segments and not vmm_ok and ac.variable and ac.raw is not None:
            rest = _without_expandable(ac.raw)
            env[ac.variable] = rest or None
            reasons[ac.variable] = "expandable_segments:True fails on some WSL drivers (pytorch/pytorch#192330)"
        t = probes.triton
        lib = probes.libcuda
        if t.installed and t.finds is False and not t.libcuda_path_env:
            links = t.links or "libcuda.so"
            if lib.wsl_files.get("libcuda.so.1") and lib.wsl_files.get(links):
                env["TRITON_LIBCUDA_PATH"] = WSL_LIB_DIR
                reasons["TRITON_LIBCUDA_PATH"] = "torch.compile/Triton cannot find libcuda (pytorch/pytorch#97501)"
        if lib.loader_finds is False and lib.wsl_files.get("libcuda.so.1"):
            old = probes.environ.get("LD_LIBRARY_PATH", "")
            env["LD_LIBRARY_PATH"] = WSL_LIB_DIR + (":" + old if old else "")
            reasons["LD_LIBRARY_PATH"] = "the dynamic loader does not find libcuda.so.1"
    nccl_env, nccl_reasons, kept = _nccl_settings(probes)
    env.update(nccl_env)
    reasons.update(nccl_reasons)
    bucket, why = ddp_bucket_cap_mb(platform)
    reasons["ddp_bucket_cap_mb"] = why
    return Settings(platform, use_vmm, vram, budget, env, reasons, kept, bucket)


def ddp_bucket_cap_mb(platform: str) -> tuple[int | None, str]:
    """The DDP bucket size torch_wsl recommends on ``platform`` (None: torch's 25 MiB default), and why."""
    if platform == "wsl2":
        return DDP_BUCKET_CAP_MB_WSL2, (
            f"{DDP_BUCKET_CAP_MB_WSL2} MiB instead of torch's 25: under WSL2 every all-reduce goes through host "
            "memory and pays a fixed cost, so fewer, larger ones (Megatron-Core's 40M-gradient bucket)")
    return None, "torch's default (25 MiB): nothing WSL2-specific here"


def _nccl_settings(probes: Probes) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """NCCL's variables for WSL2 with several GPUs (or an unknown count): (to set, reasons, kept).

    Native Linux and single-GPU machines get nothing: NCCL's own detection is
    right there. A variable the user set stays as it is; if torch_wsl would have
    set another value it goes to ``kept`` (with the reason) instead of ``env``.
    """
    n = probes.gpu_count
    if probes.platform != "wsl2" or (n is not None and n <= 1):
        return {}, {}, {}
    wanted: dict[str, tuple[str, str]] = {}
    shm = [
        "NCCL's shared-memory transport fails with several GPUs under WSL2 "
        "('Error while creating shared memory segment', microsoft/WSL#12467, NVIDIA/nccl#1518)"
    ]
    size = probes.memory.shm_size
    if size is not None and size < NCCL_SHM_MIN_BYTES:
        shm.append(f"/dev/shm is {size >> 20} MiB, under the {NCCL_SHM_MIN_BYTES >> 30} GiB NCCL's troubleshooting "
                   "guide gives containers (--shm-size=1g)")
    wanted["NCCL_SHM_DISABLE"] = ("1", "; ".join(shm))
    wanted["NCCL_P2P_DISABLE"] = ("1", "no GPU peer-to-peer (P2P/NVLink) under WSL2 (NVIDIA CUDA on WSL guide): "
                                       "NCCL's P2P transport cannot work")
    ib = probes.nccl.ib_devices
    if ib is not None and not ib:
        wanted["NCCL_IB_DISABLE"] = ("1", "no InfiniBand/RoCE device in /sys/class/infiniband: NCCL need not probe "
                                          "for its IB transport and uses IP sockets (NCCL docs, NCCL_IB_DISABLE)")
    env: dict[str, str] = {}
    reasons: dict[str, str] = {}
    kept: dict[str, str] = {}
    for name, (value, why) in wanted.items():
        current = probes.nccl.get(name)
        if current is None:
            env[name] = value
            reasons[name] = why
        elif current != value:
            kept[name] = value
            reasons[name] = kept_reason(name, current, value, why)
    return env, reasons, kept


def kept_reason(name: str, current: str, value: str, why: str) -> str:
    """The reason recorded for a variable the user set to ``current`` where torch_wsl would set ``value``."""
    return f"kept your {name}={current}; torch_wsl would set {value}: {why}"


@functools.lru_cache(maxsize=1)
def _real_settings() -> Settings:
    return settings_from_probes(probe_all(real_env(), check_device=False))


def recommended_settings(env: Env | None = None, *, probes: Probes | None = None,
                         pinned: GpuProbeResult | None = None, vmm: GpuProbeResult | None = None) -> Settings:
    """The settings torch_wsl would apply on this machine.

    Cheap: it never starts CUDA or a torch subprocess (the GPU count comes
    from ``nvidia-smi``). Pass ``pinned``/``vmm`` results from
    :mod:`torch_wsl.env.gpu` to use measured values. For the real machine with
    no arguments the result is computed once and cached.
    """
    if env is None and probes is None and pinned is None and vmm is None:
        return _real_settings()
    if probes is None:
        probes = probe_all(env or real_env(), check_device=False)
    return settings_from_probes(probes, pinned=pinned, vmm=vmm)
