"""Loads the compiled library torch_wsl._C, refusing a mismatched torch with a clear message."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

REBUILD_HINT = "rebuild torch_wsl against the installed torch: pip install --no-build-isolation --force-reinstall ."


def check_torch_version(built: str, running: str) -> None:
    """Raise ImportError unless the running torch is the one the extension was built against.

    The C++ ABI of torch changes between releases (and between local builds of
    one release), so a mismatch would fail with undefined symbols or, worse,
    crash inside a kernel. The local version suffix (+cpu, +cu130) is compared too.
    """
    if built != running:
        raise ImportError(
            f"torch_wsl was built against torch {built}, but torch {running} is installed; {REBUILD_HINT}"
        )


def load() -> ModuleType:
    try:
        config = importlib.import_module("torch_wsl._build_config")
    except ImportError as e:
        raise ImportError(f"torch_wsl's compiled library is not built ({e}); {REBUILD_HINT}") from e
    check_torch_version(config.TORCH_VERSION, torch.__version__)
    try:
        return importlib.import_module("torch_wsl._C")
    except ImportError as e:
        raise ImportError(f"torch_wsl's compiled library failed to load: {e}; {REBUILD_HINT}") from e
