"""Python mirror of csrc/checks.h for the fake (meta) kernels.

Every message has the C++ side's format and wording,
``torch_wsl.<op>: expected <arg> <expectation>, got <what was given>``, so an
error reads the same eager and under ``torch.compile``; tests/test_ops.py
compares the two on every registered bad input. Keep the two files in step.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTEGER = (torch.int64, torch.int32)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32' (what csrc/checks.cpp's dtype_name prints)."""
    return str(dtype).removeprefix("torch.")


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def message(op: str, arg: str, expectation: str, got: str) -> str:
    return f"torch_wsl.{op}: expected {arg} {expectation}, got {got}"


def that(ok, op: str, arg: str, expectation: str, got) -> None:
    """torch._check with the one message format; `got` may be a callable, evaluated only on failure."""
    torch._check(ok, lambda: message(op, arg, expectation, got() if callable(got) else str(got)))


def fail(op: str, arg: str, expectation: str, got: str) -> None:
    raise RuntimeError(message(op, arg, expectation, got))


def floating(op: str, arg: str, t: Tensor) -> None:
    that(
        t.dtype in FLOATING,
        op,
        arg,
        "to have a floating dtype (float32, float16, bfloat16 or float64)",
        lambda: dtype_name(t.dtype),
    )


def integer(op: str, arg: str, t: Tensor) -> None:
    that(t.dtype in INTEGER, op, arg, "to have an integer dtype (int64 or int32)", lambda: dtype_name(t.dtype))


def same_device(op: str, arg: str, t: Tensor, ref_arg: str, ref: Tensor) -> None:
    that(t.device == ref.device, op, arg, f"to be on the same device as {ref_arg} ({ref.device})", lambda: str(t.device))


def same_dtype(op: str, arg: str, t: Tensor, ref_arg: str, ref: Tensor) -> None:
    that(
        t.dtype == ref.dtype,
        op,
        arg,
        f"to have the dtype of {ref_arg} ({dtype_name(ref.dtype)})",
        lambda: dtype_name(t.dtype),
    )


def same_shape(op: str, arg: str, t: Tensor, ref_arg: str, ref: Tensor) -> None:
    that(
        t.shape == ref.shape,
        op,
        arg,
        f"to have the shape of {ref_arg} {shape_str(ref.shape)}",
        lambda: shape_str(t.shape),
    )


def like(op: str, arg: str, t: Tensor, ref_arg: str, ref: Tensor) -> None:
    same_device(op, arg, t, ref_arg, ref)
    same_shape(op, arg, t, ref_arg, ref)
    same_dtype(op, arg, t, ref_arg, ref)


def dim_at_least(op: str, arg: str, t: Tensor, dims: int) -> None:
    that(t.dim() >= dims, op, arg, f"to have at least {dims} dimensions", lambda: "shape " + shape_str(t.shape))


def dim_is(op: str, arg: str, t: Tensor, dims: int) -> None:
    that(t.dim() == dims, op, arg, f"to have {dims} dimensions", lambda: "shape " + shape_str(t.shape))


def num_str(x: float) -> str:
    """A number as C++'s ostream prints a double (6 significant digits: 1e-05, -1, 0.5)."""
    return format(float(x), "g")
