"""Generic operator tests, driven by the registry in tests/opdb (one OpInfo per public function).

Family test files keep what is specific to a family (bit-exactness against a
model's own code, numerics at extremes, modules); everything every operator
must satisfy is here, once.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import torch_wsl
from conftest import DEVICES, tol
from opdb import OPS, BadInput, OpInfo, Sample

OP_PARAMS = [pytest.param(op, id=op.name) for op in OPS]
BAD_PARAMS = [
    pytest.param(op, bad, id=f"{op.name}-{bad.name or i}") for op in OPS for i, bad in enumerate(op.bad_inputs())
]


def _dtype_params(op_dtypes):
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return [pytest.param(d, id=names[d]) for d in op_dtypes]


ALL_DTYPES = [pytest.param(d, id=n) for d, n in ((torch.float32, "fp32"), (torch.float16, "fp16"),
                                                   (torch.bfloat16, "bf16"))]


# ------------------------------------------------------------------ helpers


def _tensors_out(out) -> list[torch.Tensor]:
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _convert(sample: Sample, dtype) -> Sample:
    """The sample with floating tensors as fresh leaves in `dtype` (None: same dtype), keeping requires_grad."""

    def conv(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.detach().to(dtype) if dtype is not None else a.detach().clone()
            return t.requires_grad_(a.requires_grad)
        return a

    return Sample(tuple(tree_map(conv, list(sample.args))), tree_map(conv, dict(sample.kwargs)), sample.name)


def _grad_inputs(sample: Sample) -> list[torch.Tensor]:
    flat, _ = tree_flatten((list(sample.args), dict(sample.kwargs)))
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def _forward_backward(fn, sample: Sample, cotangent_seed: int = 1):
    """Outputs, and the gradients of sum(out * g) for seeded random g, for the inputs that require grad."""
    out = fn(*sample.args, **sample.kwargs)
    outs = _tensors_out(out)
    inputs = _grad_inputs(sample)
    diff = [o for o in outs if o.requires_grad]
    if not inputs or not diff:
        return outs, None
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum() for o in diff)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return outs, grads


def _assert_close(got, want, dtype, scale, what):
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            assert (g is None or not g.count_nonzero()) and (w is None or not w.count_nonzero()), f"{what}[{i}]"
            continue
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        torch.testing.assert_close(g.double(), w.double(), **tol(dtype, scale), msg=lambda m: f"{what}[{i}]: {m}")


def _check_against_reference(op: OpInfo, sample: Sample, dtype):
    ref_sample = _convert(sample, op.ref_dtype)
    outs, grads = _forward_backward(op.fn, sample)
    ref_outs, ref_grads = _forward_backward(op.ref, ref_sample)
    assert len(outs) == len(ref_outs), f"{len(outs)} outputs, reference has {len(ref_outs)}"
    for o, r in zip(outs, ref_outs):
        assert o.dtype == (r.dtype if op.ref_dtype is None else o.dtype)
    _assert_close(outs, ref_outs, dtype, op.tol_scale, f"{sample.name}: output")
    if grads is not None:
        _assert_close(grads, ref_grads, dtype, op.grad_tol_scale, f"{sample.name}: grad")


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("op", OP_PARAMS)
def test_matches_reference(op, device, dtype):
    if dtype not in op.dtypes:
        pytest.skip(f"{op.name} does not take {dtype}")
    for sample in op.samples(device, dtype, op.supports_grad):
        _check_against_reference(op, sample, dtype)


@pytest.mark.parametrize("op", OP_PARAMS)
def test_samples_cover_empty_and_noncontiguous(op):
    samples = list(op.samples("cpu", torch.float32, False))
    assert any(s.is_empty() for s in samples), f"{op.name}: no sample with an empty input"
    assert any(s.is_noncontiguous() for s in samples), f"{op.name}: no sample with a non-contiguous input"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_PARAMS)
def test_gradcheck_float64(op, device):
    if not op.supports_grad:
        pytest.skip("not differentiable")
    checked = 0
    for sample in op.samples(device, torch.float64, True):
        if sample.is_empty() or sum(t.numel() for t in sample.tensors()) > 4096:
            continue
        inputs = _grad_inputs(sample)
        flat, spec = tree_flatten((list(sample.args), dict(sample.kwargs)))
        positions = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and a.requires_grad]

        def call(*grad_inputs):
            items = list(flat)
            for p, t in zip(positions, grad_inputs):
                items[p] = t
            args, kwargs = torch.utils._pytree.tree_unflatten(items, spec)
            return tuple(o for o in _tensors_out(op.fn(*args, **kwargs)) if o.requires_grad)

        assert torch.autograd.gradcheck(call, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4), sample.name
        checked += 1
        if checked == 3:
            break
    assert checked, "no sample small enough for gradcheck"


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("op", OP_PARAMS)
def test_every_cpu_isa(op, cpu_isa, dtype):
    if dtype != torch.float64 and dtype not in op.dtypes:
        pytest.skip(f"{op.name} does not take {dtype}")
    for sample in op.samples("cpu", dtype, op.supports_grad):
        _check_against_reference(op, sample, dtype)


# ------------------------------------------------------------------ the dispatcher and torch.compile


class _RecordTorchWslCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "torch_wsl":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _fresh(a, keep_grad: bool):
    if isinstance(a, torch.Tensor):
        t = a.detach().clone()
        return t.requires_grad_(a.requires_grad and keep_grad) if t.is_floating_point() else t
    return a


def _recorded_calls(op: OpInfo, device: str):
    """(operator, args, kwargs) of every torch_wsl operator op.fn dispatches on its opcheck samples, backward too."""
    seen = []
    for dtype in (torch.float32, torch.bfloat16):
        if dtype not in op.dtypes:
            continue
        samples = list(op.samples(device, dtype, op.supports_grad))
        for sample in [s for s in samples if s.opcheck] or samples[:3]:
            rec = _RecordTorchWslCalls()
            with rec:
                _forward_backward(op.fn, sample)
            for func, args, kwargs in rec.calls:
                # Backward operators are tested as the engine calls them: without grad-requiring inputs.
                fresh = lambda a: _fresh(a, keep_grad=not func.name().endswith("_backward"))  # noqa: E731
                seen.append((func, tree_map(fresh, args), tree_map(fresh, kwargs)))
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_PARAMS)
def test_opcheck(op, device):
    calls = _recorded_calls(op, device)
    assert calls, f"{op.name} dispatched no torch_wsl operator"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_PARAMS)
def test_compile_fullgraph(op, device, backend):
    if op.skip_compile:
        pytest.skip(op.skip_compile)
    torch._dynamo.reset()
    compiled = torch.compile(op.fn, fullgraph=True, backend=backend, dynamic=False)
    samples = [s for s in op.samples(device, torch.float32, op.supports_grad) if not s.is_empty()][:2]
    for sample in samples:
        outs, grads = _forward_backward(op.fn, sample)
        c_outs, c_grads = _forward_backward(compiled, _convert(sample, None))
        _assert_close(c_outs, outs, torch.float32, 1.0, f"{sample.name}: compiled output")
        if grads is not None:
            _assert_close(c_grads, grads, torch.float32, 4.0, f"{sample.name}: compiled grad")


# ------------------------------------------------------------------ bad input


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


@pytest.mark.parametrize("op,bad", BAD_PARAMS)
def test_bad_input_names_the_argument(op, bad: BadInput):
    before = [t.detach().clone() for t in Sample(bad.args, bad.kwargs).tensors()]
    with pytest.raises(RuntimeError, match=bad.match):
        op.fn(*bad.args, **bad.kwargs)
    after = Sample(bad.args, bad.kwargs).tensors()
    for b, a in zip(before, after):
        assert torch.equal(b, a), "an input was written before the error"


@pytest.mark.parametrize("op,bad", [p for p in BAD_PARAMS if not p.values[1].data_dependent])
def test_fake_kernel_words_errors_as_the_kernel(op, bad: BadInput):
    """The same bad call, traced with fake tensors, fails with the C++ kernel's exact message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(RuntimeError) as real:
        op.fn(*bad.args, **bad.kwargs)
    mode = FakeTensorMode()
    conv = lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    args, kwargs = tree_map(conv, list(bad.args)), tree_map(conv, dict(bad.kwargs))
    with mode, pytest.raises(RuntimeError) as fake:
        op.fn(*args, **kwargs)
    assert _first_line(fake.value) == _first_line(real.value)
    assert re.search(r"^torch_wsl\.\w+: expected ", _first_line(real.value)), _first_line(real.value)
