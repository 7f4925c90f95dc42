"""torch_wsl.nn.utils.clip_grad_norm_ (multi-tensor norm + scale) against torch.nn.utils's."""

from __future__ import annotations

import math

import pytest
import torch

import torch_wsl
from conftest import DEVICES, TRAIN_DTYPES, tol

SHAPES = [(769,), (33, 17), (5,), (3, 5, 7), (0,), (1,), (40000,)]
NORMS = [2.0, 1.0, math.inf]


def _params(device, dtype, scale=1.0, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.zeros(s, device=device, dtype=dtype, requires_grad=True)
        p.grad = (torch.randn(s, generator=g) * scale).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def _twins(device, dtype, scale=1.0, norm_type=2.0):
    # torch's inf norm raises on an empty tensor (no identity for max); torch_wsl's does not
    # (|x| >= 0, so 0 is one), see test_inf_norm_with_an_empty_gradient.
    shapes = [s for s in SHAPES if s != (0,)] if norm_type == math.inf else SHAPES
    return _params(device, dtype, scale, shapes=shapes), _params(device, dtype, scale, shapes=shapes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
def test_matches_torch(device, dtype, norm_type, max_norm):
    ours, ref = _twins(device, dtype, norm_type=norm_type)
    got = torch_wsl.nn.utils.clip_grad_norm_(ours, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type, foreach=False)
    assert got.dtype == want.dtype and got.device == want.device and got.dim() == 0
    # torch rounds each tensor's norm to the dtype before combining them; torch_wsl accumulates
    # all elements in float32/float64 and rounds once.
    torch.testing.assert_close(got, want, **tol(dtype, scale=4.0))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, **tol(dtype, scale=4.0))
    if max_norm > 1e5:
        for a, b in zip(ours, _twins(device, dtype, norm_type=norm_type)[0]):
            assert torch.equal(a.grad, b.grad)  # the coefficient clamps at exactly 1


@pytest.mark.parametrize("norm_type", NORMS)
def test_every_cpu_isa(cpu_isa, norm_type):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        ours, ref = _twins("cpu", dtype, scale=3.0, norm_type=norm_type)
        got = torch_wsl.nn.utils.clip_grad_norm_(ours, 1.0, norm_type)
        want = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type, foreach=False)
        torch.testing.assert_close(got, want, **tol(dtype, scale=4.0))
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, **tol(dtype, scale=4.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradients(device, norm_type, bad):
    ours, ref = _twins(device, torch.float32, norm_type=norm_type)
    for ps in (ours, ref):
        ps[1].grad[3, 4] = bad
    # error_if_nonfinite: the same error, and the gradients left as they were.
    before = [p.grad.clone() for p in ours]
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        torch_wsl.nn.utils.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type, error_if_nonfinite=True, foreach=False)
    for a, b in zip(ours, before):
        assert torch.equal(a.grad, b) or (a.grad.isnan() == b.isnan()).all()
    # Without: the same non-finite total and the same scaled gradients (NaN, or zeros for an inf norm).
    got = torch_wsl.nn.utils.clip_grad_norm_(ours, 1.0, norm_type)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type, foreach=False)
    torch.testing.assert_close(got, want, equal_nan=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_mixed_dtypes_and_non_dense_gradients():
    ours, ref = _twins("cpu", torch.float32, scale=2.0)
    for ps in (ours, ref):
        ps[2].grad = ps[2].grad.to(torch.bfloat16).float()
        ps[1].grad = torch.arange(17 * 33, dtype=torch.float32).reshape(17, 33).t() / 100  # a transposed grad
    extra_a = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    extra_a.grad = torch.linspace(-3, 3, 6, dtype=torch.float64)
    extra_b = extra_a.detach().clone().requires_grad_()
    extra_b.grad = extra_a.grad.clone()
    got = torch_wsl.nn.utils.clip_grad_norm_(ours + [extra_a], 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref + [extra_b], 1.0, foreach=False)
    assert got.dtype == want.dtype == torch.float64
    # torch rounds each float32 tensor's norm to float32 before combining: float32 precision.
    torch.testing.assert_close(got, want, **tol(torch.float32))
    assert not ours[1].grad.is_contiguous()
    for a, b in zip(ours + [extra_a], ref + [extra_b]):
        torch.testing.assert_close(a.grad, b.grad, **tol(torch.float32))


def test_inf_norm_with_an_empty_gradient():
    """torch raises here (max over no elements); torch_wsl takes the max over the other tensors."""
    ps = _params("cpu", torch.float32)
    assert ps[4].grad.numel() == 0
    want = max(p.grad.abs().max() for p in ps if p.grad.numel())
    torch.testing.assert_close(torch_wsl.nn.utils.get_total_norm([p.grad for p in ps], math.inf), want)


def test_edge_cases():
    # No gradients at all: a zero norm, nothing to do.
    p = torch.zeros(3, requires_grad=True)
    assert float(torch_wsl.nn.utils.clip_grad_norm_([p], 1.0)) == 0.0
    # A single tensor instead of a list; a generator.
    q = torch.zeros(4, requires_grad=True)
    q.grad = torch.full((4,), 3.0)
    torch.testing.assert_close(torch_wsl.nn.utils.clip_grad_norm_(q, 1.0), torch.tensor(6.0))
    torch.testing.assert_close(q.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-6)
    r = torch.zeros(4, requires_grad=True)
    r.grad = torch.full((4,), 3.0)
    torch_wsl.nn.utils.clip_grad_norm_((t for t in [r]), 1.0)
    torch.testing.assert_close(r.grad, q.grad)
    # Other norm orders fall back to torch's implementation.
    a, b = _twins("cpu", torch.float32)
    torch.testing.assert_close(torch_wsl.nn.utils.clip_grad_norm_(a, 1.0, 3.0),
                               torch.nn.utils.clip_grad_norm_(b, 1.0, 3.0))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_two_operators_and_no_host_read():
    """One reduction operator and one scaling operator; nothing else is dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    ps = _params("cpu", torch.float32)
    with Count() as c:
        torch_wsl.nn.utils.clip_grad_norm_(ps, 1.0)
    assert c.ops == ["torch_wsl.total_norm", "torch_wsl.clip_grads_with_norm_"]


def test_bad_input():
    ops = torch.ops.torch_wsl
    with pytest.raises(RuntimeError, match=r"norm_type to be 1, 2 or inf, got 3"):
        ops.total_norm([torch.ones(3)], 3.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] to have a floating dtype"):
        ops.total_norm([torch.ones(3), torch.ones(3, dtype=torch.int32)], 2.0)
    with pytest.raises(RuntimeError, match=r"total_norm to be a one-element floating tensor"):
        ops.clip_grads_with_norm_([torch.ones(3)], 1.0, torch.ones(2))
    with pytest.raises(RuntimeError, match=r"grads\[0\] to be a dense tensor"):
        ops.clip_grads_with_norm_([torch.ones(3).to_sparse()], 1.0, torch.ones(()))
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match=r"dense tensor"):
        torch_wsl.nn.utils.clip_grad_norm_([p], 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ts = [torch.randn(7, device=device), torch.randn(3, 5, device=device)]
    for norm_type in NORMS:
        torch.library.opcheck(torch.ops.torch_wsl.total_norm.default, ([t.clone() for t in ts], norm_type))
    torch.library.opcheck(torch.ops.torch_wsl.total_norm.default, ([ts[0].half(), ts[1].bfloat16()], 2.0))
    total = torch.tensor(9.0, device=device)
    torch.library.opcheck(torch.ops.torch_wsl.clip_grads_with_norm_.default, ([t.clone() for t in ts], 1.0, total))
