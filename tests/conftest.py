"""Shared fixtures: devices and dtype tolerances. CUDA cases skip cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

import torch_wsl

HAS_CUDA_KERNELS = torch_wsl.build_info()["cuda_kernels"]
HAS_GPU = torch.cuda.is_available()

cuda_only = pytest.mark.skipif(
    not (HAS_GPU and HAS_CUDA_KERNELS),
    reason="needs a CUDA GPU and a build with CUDA kernels" if not HAS_GPU else "build has no CUDA kernels",
)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, cuda_only])]
TRAIN_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

# (atol, rtol) against a float64 reference rounded to the dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol * scale, "rtol": rtol * scale}


@pytest.fixture(params=["default", "avx2", "avx512"])
def cpu_isa(request):
    """Runs a CPU test once per SIMD level the machine supports."""
    best = torch_wsl.build_info()["cpu_simd_best"]
    order = ["default", "avx2", "avx512"]
    if order.index(request.param) > order.index(best):
        pytest.skip(f"CPU lacks {request.param}")
    previous = torch_wsl.set_cpu_isa(request.param)
    yield request.param
    torch_wsl.set_cpu_isa(previous)
