"""WSL environment probes, recommended settings and the doctor's checks.

Everything here reads the machine through an :class:`Env` (filesystem root +
environment), so tests can point it at a fixture tree. A missing or
unreadable file gives "unknown" (None), never an exception, and every
command or subprocess runs with a time bound. Nothing here imports
``torch_wsl._C``; ``torch`` is imported lazily, only by the torch probe.

Typical use::

    from torch_wsl import env
    env.recommended_settings().pinned_budget_bytes
    print(env.run_doctor().format_text())      # or: python -m torch_wsl doctor
"""

from __future__ import annotations

from ._fs import CommandResult, Env, FileRead, real_env
from .doctor import REPORT_SCHEMA, SCHEMA_VERSION, STATUSES, Check, Report, checks_from_probes, run_doctor, validate_schema
from .gpu import GpuProbeResult, probe_pinned_ceiling, probe_vmm
from .probes import (
    WSL_LIB_DIR,
    AllocConfInfo,
    DeviceNodes,
    DriverInfo,
    LibcudaInfo,
    MemoryInfo,
    NcclInfo,
    Probes,
    TorchInfo,
    TritonInfo,
    WslInfo,
    probe_all,
    probe_alloc_conf,
    probe_device_nodes,
    probe_driver,
    probe_libcuda,
    probe_memory,
    probe_nccl,
    probe_torch,
    probe_triton,
    probe_wsl,
)
from .settings import Settings, recommended_settings, settings_from_probes

__all__ = [
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "STATUSES",
    "WSL_LIB_DIR",
    "AllocConfInfo",
    "Check",
    "CommandResult",
    "DeviceNodes",
    "DriverInfo",
    "Env",
    "FileRead",
    "GpuProbeResult",
    "LibcudaInfo",
    "MemoryInfo",
    "NcclInfo",
    "Probes",
    "Report",
    "Settings",
    "TorchInfo",
    "TritonInfo",
    "WslInfo",
    "checks_from_probes",
    "probe_all",
    "probe_alloc_conf",
    "probe_device_nodes",
    "probe_driver",
    "probe_libcuda",
    "probe_memory",
    "probe_nccl",
    "probe_pinned_ceiling",
    "probe_torch",
    "probe_triton",
    "probe_vmm",
    "probe_wsl",
    "real_env",
    "recommended_settings",
    "run_doctor",
    "settings_from_probes",
    "validate_schema",
]
