"""torch_wsl: faster, sturdier PyTorch training on NVIDIA GPUs under WSL2.

`import torch_wsl` loads the compiled operators (``torch.ops.torch_wsl.*``,
with CPU and CUDA kernels, autograd and fake kernels for ``torch.compile``)
and the runtime services. Drop-in modules live in ``torch_wsl.nn``.
"""

from __future__ import annotations

import sys
from typing import Any

from . import _extension

try:
    _C = _extension.load()
except ImportError:
    # `python -m torch_wsl doctor` must run to diagnose a missing or mismatched
    # build; Python imports this package first, with sys.argv[0] == "-m" while
    # it locates the __main__ module. Everywhere else a broken build is an
    # ImportError at `import torch_wsl`.
    if sys.argv[:1] != ["-m"]:
        raise
    _C = None

if _C is not None:
    # Python-side registrations (fake kernels, autograd) only once the library
    # that defines the operators has loaded.
    from . import memory, nn, ops, optim  # noqa: F401
    from .ops import _dtensor

    _dtensor.install()  # DTensor sharding strategies for torch.ops.torch_wsl, once torch.distributed.tensor is imported
    from .patching import optimize, restore  # noqa: F401

__version__ = "0.1.0"

__all__ = ["build_info", "memory", "nn", "ops", "optim", "optimize", "restore", "set_cpu_isa", "__version__"]


def build_info() -> dict[str, Any]:
    """What this build of torch_wsl contains.

    Keys: ``torch_version`` (the torch it was built against), ``cuda_version``
    (CUDA runtime the kernels were compiled with, or None), ``cuda_archs``
    (e.g. "7.5;8.0;8.6"), ``cuda_kernels`` (bool), ``cpu_simd`` (the SIMD
    level the CPU kernels use now: "avx512", "avx2" or "default") and
    ``cpu_simd_best`` (the best this CPU supports).
    """
    return dict(_C._build_info())


def set_cpu_isa(name: str) -> str:
    """Select the CPU kernels' SIMD level ("default", "avx2", "avx512"); returns the previous one.

    The best level the CPU supports is chosen at start-up (or the one named by
    the ``TORCH_WSL_CPU_ISA`` environment variable); asking for a level the CPU
    lacks raises RuntimeError.
    """
    return _C.set_cpu_isa(name)
