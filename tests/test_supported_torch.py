"""setup.py builds only against a torch in the supported range (SUPPORTED_TORCH), and says so before compiling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SETUP_PY = Path(__file__).resolve().parent.parent / "setup.py"
REFUSAL = "torch_wsl supports torch 2.8 to 2.14"


def _setup_py_with_torch(tmp_path: Path, version: str, **env: str) -> subprocess.CompletedProcess:
    """Runs setup.py with a stand-in `torch` package that has only a __version__.

    A supported version passes the check and then fails on the stand-in's missing
    torch.utils.cpp_extension, which shows the check let it through."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(f"__version__ = {version!r}\n")
    full_env = {k: v for k, v in os.environ.items() if k != "TORCH_WSL_ANY_TORCH"}
    full_env.update(PYTHONPATH=str(stub.parent), **env)
    return subprocess.run([sys.executable, str(SETUP_PY), "--name"], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", ["2.7.1", "2.7.0+cu126", "2.15.0", "2.15.0.dev20260301+cpu", "3.0.0", "1.13.1"])
def test_unsupported_torch_is_refused(tmp_path, version):
    r = _setup_py_with_torch(tmp_path, version)
    assert r.returncode != 0
    assert REFUSAL in r.stderr and f"but torch {version} is installed" in r.stderr, r.stderr
    assert "pip install 'torch>=2.8,<2.15'" in r.stderr and "TORCH_WSL_ANY_TORCH=1" in r.stderr
    assert "Traceback" not in r.stderr  # a message, not a crash


@pytest.mark.parametrize("version", ["2.8.0", "2.11.0+cu130", "2.13.0+cpu", "2.14.1", "2.14.1+cu130"])
def test_supported_torch_passes_the_check(tmp_path, version):
    r = _setup_py_with_torch(tmp_path, version)
    assert REFUSAL not in r.stderr
    assert "No module named 'torch.utils'" in r.stderr, r.stderr  # got as far as the build's imports


def test_any_torch_switch_lets_an_unsupported_torch_through(tmp_path):
    r = _setup_py_with_torch(tmp_path, "2.15.0", TORCH_WSL_ANY_TORCH="1")
    assert REFUSAL not in r.stderr
    assert "outside the supported range" in r.stdout
    assert "No module named 'torch.utils'" in r.stderr, r.stderr
