"""The registry of torch_wsl operators that the generic tests (tests/test_ops.py) loop over.

Each family module in this package (norm.py, activation.py, ...) appends
OpInfo entries to OPS; every module here is imported, so adding a family is
adding a file. An OpInfo names the public function, a plain-PyTorch (or
transformers) reference with the same signature, and generators of sample and
bad inputs. From it, test_ops.py checks every operator the same way: against
the reference in float32/float16/bfloat16 (forward and gradients), gradcheck in
float64, torch.library.opcheck on every torch_wsl operator the function
dispatches (forward and backward), torch.compile(fullgraph=True), every CPU
ISA, that the samples cover empty and non-contiguous inputs, that bad inputs
name the argument and leave the inputs untouched, and that the fake kernel
words an error exactly as the C++ kernel does.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch


@dataclass
class Sample:
    """One call: fn(*args, **kwargs). Floating tensors that should get gradients have requires_grad set."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = ""
    opcheck: bool = False  # also run torch.library.opcheck on the operators this call dispatches

    def tensors(self) -> list[torch.Tensor]:
        return [a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)]

    def is_empty(self) -> bool:
        return any(t.numel() == 0 for t in self.tensors())

    def is_noncontiguous(self) -> bool:
        return any(not t.is_contiguous() for t in self.tensors())


@dataclass
class BadInput:
    """A call that must raise a RuntimeError whose message matches `match` (a regex)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    match: str = ""
    name: str = ""
    # Depends on tensor values (e.g. a target out of range), which a fake
    # kernel cannot see: only the real kernel is checked.
    data_dependent: bool = False


SampleFn = Callable[[str, torch.dtype, bool], Iterable[Sample]]  # (device, dtype, requires_grad)


@dataclass
class OpInfo:
    name: str
    fn: Callable[..., Any]
    ref: Callable[..., Any]
    samples: SampleFn
    bad_inputs: Callable[[], Iterable[BadInput]] = lambda: ()
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    supports_grad: bool = True
    # The reference runs on floating inputs converted to this dtype (None: as
    # given), and its outputs are compared in float64 at the tolerance of the
    # input dtype times tol_scale (grad_tol_scale for gradients).
    ref_dtype: Optional[torch.dtype] = torch.float64
    tol_scale: float = 1.0
    grad_tol_scale: float = 4.0
    # Whole-function compile is tested unless this says why not.
    skip_compile: Optional[str] = None

    def __repr__(self) -> str:
        return self.name


OPS: list[OpInfo] = []


def register(*infos: OpInfo) -> None:
    for info in infos:
        assert all(o.name != info.name for o in OPS), f"duplicate OpInfo {info.name}"
        OPS.append(info)


def make(shape, dtype, device, *, requires_grad=False, noncontiguous=False, low=-2.0, high=2.0, generator=None):
    """A tensor of uniform values in [low, high); non-contiguous (every other element of a wider buffer) if asked."""
    shape = tuple(shape)
    if noncontiguous and len(shape) > 0:
        wide = shape[:-1] + (shape[-1] * 2,)
        t = torch.empty(wide, dtype=torch.float64).uniform_(low, high, generator=generator)
        t = t.to(device=device, dtype=dtype)[..., ::2]
    else:
        t = torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=generator).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
