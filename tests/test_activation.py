"""Gated MLP activations beyond the registry's generic tests (tests/opdb/activation.py):
transformers' own MLP modules, bf16/fp16 against eager at a derived tolerance, accuracy over
the whole range against stable float64 formulas, extremes and non-finite values, the layouts
read in place, and argument validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, TRAIN_DTYPES
from torch_wsl.ops import activation as act

OPS = torch.ops.torch_wsl
KINDS = ["silu", "gelu", "gelu_tanh"]
B = math.sqrt(2.0 / math.pi)
K = 0.044715


def ours(kind, gate, up):
    if kind == "silu":
        return act.silu_mul(gate, up)
    return act.gelu_mul(gate, up, approximate="tanh" if kind == "gelu_tanh" else "none")


def ours_backward(kind, dy, gate, up):
    if kind == "silu":
        return OPS.silu_mul_backward(dy, gate, up)
    return OPS.gelu_mul_backward(dy, gate, up, "tanh" if kind == "gelu_tanh" else "none")


def eager_act(kind, x):
    if kind == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


def stable_reference(kind, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) and act'(x) in float64 by formulas without cancellation: eager float64 forms
    Phi(x) as (1 + erf) / 2 and (1 + tanh) / 2, which lose every digit in the far negative tail."""
    x = x.double()
    if kind == "silu":
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * torch.sigmoid(-x))
    if kind == "gelu":
        p = 0.5 * torch.special.erfc(-x / math.sqrt(2.0))
        return x * p, p + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    z = 2 * B * (x + K * x**3)
    h, c = torch.sigmoid(z), torch.sigmoid(-z)
    return x * h, h + x * c * h * 2 * B * (1 + 3 * K * x * x)


def ulps(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at |t| (float64 result)."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


# ------------------------------------------------------------------ transformers' modules


def _mlps():
    from transformers import GemmaConfig, LlamaConfig, Phi3Config
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    return {
        "llama": LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=77, hidden_act="silu")),
        "gemma": GemmaMLP(GemmaConfig(hidden_size=32, intermediate_size=48, hidden_act="gelu_pytorch_tanh")),
        # Gemma's config turns "gelu" into the tanh form; the erf GELU through LlamaMLP's configurable act.
        "llama-gelu": LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="gelu")),
        "phi3": Phi3MLP(Phi3Config(hidden_size=32, intermediate_size=40, hidden_act="silu")),
    }


def _fused_forward(name, mlp, x):
    """The module's forward with its activation product replaced by ours."""
    if name == "phi3":
        return mlp.down_proj(act.silu_mul_packed(mlp.gate_up_proj(x)))
    approx = {"llama": None, "gemma": "tanh", "llama-gelu": "none"}[name]
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    h = act.silu_mul(gate, up) if approx is None else act.gelu_mul(gate, up, approximate=approx)
    return mlp.down_proj(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama", "gemma", "llama-gelu", "phi3"])
def test_transformers_mlp_float32(name, device):
    """Output and every parameter gradient of LlamaMLP / GemmaMLP / Phi3MLP match with our activation."""
    torch.manual_seed(0)
    mlp = _mlps()[name].to(device)
    x = torch.randn(3, 5, 32, device=device)
    dy = torch.randn(3, 5, 32, device=device)
    want = mlp(x)
    want_grads = torch.autograd.grad(want, list(mlp.parameters()), dy)
    got = _fused_forward(name, mlp, x)
    got_grads = torch.autograd.grad(got, list(mlp.parameters()), dy)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama", "gemma", "llama-gelu", "phi3"])
def test_transformers_activation_product_bf16(name, device):
    """act_fn(gate) * up as the bf16 module computes it, against ours: within the rounding bound below."""
    torch.manual_seed(0)
    mlp = _mlps()[name].to(device=device, dtype=torch.bfloat16)
    x = torch.randn(64, 32, device=device, dtype=torch.bfloat16)
    if name == "phi3":
        gate_up = mlp.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        want, got = up * mlp.activation_fn(gate), act.silu_mul_packed(gate_up)
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        want = mlp.act_fn(gate) * up
        got = ours({"llama": "silu", "gemma": "gelu_tanh", "llama-gelu": "gelu"}[name], gate, up)
    _assert_within_eager_rounding(got, want, torch.bfloat16)


# ------------------------------------------------------------------ low precision against eager


def _assert_within_eager_rounding(got: torch.Tensor, eager: torch.Tensor, dtype, atol: float = 1e-5):
    """Ours rounds act(gate) * up once; eager rounds act(gate) to the dtype, then the product. Each
    rounding is within half an ulp, and act(gate)'s error moves the product by at most an ulp of
    the product, so eager is within 1.5 ulps of the exact value and ours within 0.5 (plus float32
    evaluation error): the two are at most 2 ulps apart (ulps of the larger). atol covers float32's
    absolute error where a result is near 0 because its factors cancel (the zero of silu')."""
    assert got.dtype == eager.dtype == dtype
    g, e = got.double(), eager.double()
    bound = 2 * torch.maximum(ulps(got), ulps(eager)) + atol
    diff = (g - e).abs()
    assert bool((diff <= bound).all()), f"max excess {(diff - bound).max().item()} at {(diff - bound).argmax()}"
    # The two agree bit for bit on most elements; a systematic offset would not.
    assert (g == e).double().mean() > 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_against_eager(kind, dtype, device):
    """Forward and both gradients against eager in the same dtype (fused: one rounding; eager: two)."""
    g = torch.Generator().manual_seed(1)
    mk = lambda: (torch.randn(257, 131, generator=g) * 2).to(device=device, dtype=dtype)  # noqa: E731
    gate, up, dy = mk(), mk(), mk()
    _assert_within_eager_rounding(ours(kind, gate, up), eager_act(kind, gate) * up, dtype)
    gg, gu = ours_backward(kind, dy, gate, up)
    gate_e, up_e = gate.clone().requires_grad_(), up.clone().requires_grad_()
    want_gg, want_gu = torch.autograd.grad(eager_act(kind, gate_e) * up_e, (gate_e, up_e), dy)
    _assert_within_eager_rounding(gu, want_gu, dtype)
    # eager's grad_gate is act'(gate) times dy * up rounded first: the same two-rounding bound; |dy * up|
    # reaches ~40 here, so float32's absolute error near act'(x) = 0 is scaled by it.
    _assert_within_eager_rounding(gg, want_gg, dtype, atol=4e-5)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_more_accurate_than_eager(kind, dtype):
    """Against float64, the fused single rounding is at least as close as eager's double rounding."""
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(4096, generator=g) * 2).to(dtype)
    up = torch.randn(4096, generator=g).to(dtype)
    exact = stable_reference(kind, gate)[0] * up.double()
    err_ours = (ours(kind, gate, up).double() - exact).abs().mean()
    err_eager = ((eager_act(kind, gate) * up).double() - exact).abs().mean()
    assert err_ours <= err_eager


# ------------------------------------------------------------------ accuracy over the range (every ISA)


# Observed maxima (AVX-512, AVX2, portable): silu 3.5 ulp, gelu 5.8 ulp (at x = -8, where
# exp, the reciprocal, the fit and three products each add theirs), gelu_tanh 4 ulp plus its
# conditioning (below); gradients within 2 float32 epsilons of max(|act'|, 1).
FWD_ULPS = {"silu": 5, "gelu": 8, "gelu_tanh": 5}


def _conditioning_ulps(kind, x: torch.Tensor) -> torch.Tensor:
    """Extra ulps a float32 evaluation cannot avoid: gelu_tanh is x * sigmoid(z), z = 2u(x) formed
    in float32 with an error of ~2 ulps of z, which exp(z) turns into 2 |z| ulps of the result for
    z < 0 (at x = -8.7, z = -60: ~140 ulps; eager float32 returns 0 there)."""
    if kind != "gelu_tanh":
        return torch.zeros_like(x, dtype=torch.float64)
    z = 2 * B * (x.double() + K * x.double() ** 3)
    return 3 * torch.clamp(-z, min=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_float32_accuracy_over_the_range(kind, device, cpu_isa):
    """fp32 forward within a few ulps and gradient within a few epsilons of stable float64 formulas,
    on a dense grid (vector bodies and scalar tails) where the results are normal floats; on CUDA
    the same formulas on CUDA's float functions."""
    if device == "cuda" and cpu_isa != "default":
        pytest.skip("the CPU ISA does not matter on CUDA")
    x = torch.cat([torch.linspace(-9.0, 9.0, 180_007), torch.logspace(-30, 0.9, 4001), -torch.logspace(-30, 0.9, 4001)])
    one = torch.ones_like(x)
    value, grad = stable_reference(kind, x)
    got = ours(kind, x.to(device), one.to(device)).cpu()
    normal = value.abs() > 1e-30
    err = (got.double() - value).abs() / ulps(value.float())
    excess = (err - FWD_ULPS[kind] - _conditioning_ulps(kind, x))[normal]
    assert excess.max() <= 0, f"{err[normal][excess.argmax()]:.1f} ulp at x={x[normal][excess.argmax()]}"
    gg, gu = (t.cpu() for t in ours_backward(kind, one.to(device), x.to(device), one.to(device)))
    torch.testing.assert_close(gu, got, atol=0, rtol=0)  # grad_up is act(gate) * dy
    gerr = (gg.double() - grad).abs() / (torch.clamp(grad.abs(), min=1.0) * 2.0**-23)
    assert gerr.max() <= 4, f"{gerr.max():.1f} eps at x={x[gerr.argmax()]}"


@pytest.mark.parametrize("kind", KINDS)
def test_float64_accuracy(kind):
    """float64 (gradcheck's dtype) is computed at float64 accuracy, not the float kernels' fit."""
    x = torch.linspace(-12, 12, 10_001, dtype=torch.float64)
    one = torch.ones_like(x)
    value, grad = stable_reference(kind, x)
    torch.testing.assert_close(ours(kind, x, one), value, atol=1e-15, rtol=1e-13)
    torch.testing.assert_close(ours_backward(kind, one, x, one)[0], grad, atol=1e-15, rtol=1e-13)


# ------------------------------------------------------------------ extremes and non-finite values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_large_magnitudes(kind, device):
    """Large |gate|: no overflow into NaN, and the float64 values (eager float32 overflows silu's
    exp(-x) below x = -88 and gives -0; the fused form keeps the tiny true values, as subnormal
    floats: hence the absolute tolerance, 70 of their spacings)."""
    x = torch.tensor([-1e4, -1000.0, -100.0, -89.0, -88.0, -50.0, -20.0, 20.0, 50.0, 88.0, 89.0, 100.0, 1000.0, 1e4,
                      3e38, -3e38], device=device)
    one = torch.ones_like(x)
    value, grad = stable_reference(kind, x.cpu())
    got = ours(kind, x, one).cpu()
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), value, atol=1e-43, rtol=1e-6)
    gg = ours_backward(kind, one, x, one)[0].cpu()
    # gelu_tanh's derivative has x^2 overflow to inf times 0 beyond |x| ~ 1.8e19, as eager's formula does.
    finite = x.cpu().abs() < 1e19 if kind == "gelu_tanh" else torch.ones_like(x.cpu(), dtype=torch.bool)
    torch.testing.assert_close(gg[finite].double(), grad[finite], atol=1e-43, rtol=1e-6)
    if kind == "gelu_tanh":
        xe = x.clone().requires_grad_()
        (eager_grad,) = torch.autograd.grad(eager_act(kind, xe), xe, one)
        assert torch.equal(gg[~finite].isnan(), eager_grad.cpu()[~finite].isnan())


SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 3e38]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_propagate_like_eager(kind, dtype, device, cpu_isa):
    """Every (gate, up) pair of special values, as eager float64 computes it (NaN where it gives NaN,
    the same infinities). Eager float32 on CPU differs once: its vectorized erf GELU gives
    gelu(+inf) = NaN, where float64 (and the fused kernel) give +inf. One exception the other way,
    shared with eager float32 and bfloat16: gelu_tanh's derivative at |gate| = 3e38 is NaN (x^2
    overflows in float32)."""
    if device == "cuda" and cpu_isa != "default":
        pytest.skip("the CPU ISA does not matter on CUDA")
    vals = torch.tensor(SPECIAL, dtype=torch.float64)
    gate, up = (t.reshape(-1) for t in torch.meshgrid(vals, vals, indexing="ij"))
    # 64 pairs, then the specials again as gates of a scalar tail: vector bodies and tails both see them.
    gate, up = torch.cat([gate, vals[:7]]), torch.cat([up, torch.ones(7, dtype=torch.float64)])
    want = (eager_act(kind, gate) * up).to(dtype)
    got = ours(kind, gate.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)).cpu()
    assert torch.equal(got.isnan(), want.isnan()), (gate[got.isnan() != want.isnan()], up[got.isnan() != want.isnan()])
    ok = ~want.isnan()
    torch.testing.assert_close(got[ok].double(), want[ok].double(), atol=0, rtol=2**-7)
    # Gradients: eager float64's, through autograd.
    dy = torch.ones_like(gate)
    g64, u64 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    want_gg, want_gu = (t.to(dtype) for t in torch.autograd.grad(eager_act(kind, g64) * u64, (g64, u64), dy))
    on = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    gg, gu = (t.cpu() for t in ours_backward(kind, on(dy), on(gate), on(up)))
    if kind == "gelu_tanh":
        huge = gate.abs() == 3e38
        ge = gate.to(dtype).requires_grad_()
        eager_same_dtype = torch.autograd.grad(eager_act(kind, ge) * up.to(dtype), ge, dy.to(dtype))[0]
        assert gg[huge].isnan().all() and eager_same_dtype[huge].isnan().all()
        gg, want_gg = gg[~huge], want_gg[~huge]
    for name, a, b in (("grad_gate", gg, want_gg), ("grad_up", gu, want_gu)):
        assert torch.equal(a.isnan(), b.isnan()), name
        ok = ~b.isnan()
        torch.testing.assert_close(a[ok].double(), b[ok].double(), atol=0, rtol=2**-7, msg=name)


# ------------------------------------------------------------------ layouts


def _aten_ops_inside(fn) -> set[str]:
    """Names of the aten operators that run while fn runs (inside our kernel too), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


def test_views_with_a_row_stride_are_read_in_place():
    """The packed halves, row slices and column slices are read where they are; only views whose last
    dimension is strided (or whose rows do not collapse into one stride) are copied first."""
    copies = {"aten::copy_", "aten::clone", "aten::contiguous"}
    gate_up = torch.randn(6, 2 * 40)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not copies & _aten_ops_inside(lambda: act.silu_mul(gate, up))
    assert not copies & _aten_ops_inside(lambda: act.silu_mul_packed(gate_up))
    wide = torch.randn(6, 100)
    assert not copies & _aten_ops_inside(lambda: act.gelu_mul_packed(wide[:, 10:90]))
    rows = torch.randn(12, 40)
    assert not copies & _aten_ops_inside(lambda: act.gelu_mul(rows[::2], rows[1::2]))
    expanded = torch.randn(1, 40).expand(6, 40)  # row stride 0: every row reads the same gate
    assert not copies & _aten_ops_inside(lambda: act.silu_mul(expanded, up))
    # The awkward ones are copied, and still right.
    t = torch.randn(40, 6).t()
    assert copies & _aten_ops_inside(lambda: act.silu_mul(t, up))
    torch.testing.assert_close(act.silu_mul(t, up), F.silu(t) * up)
    bt = torch.randn(3, 2, 40).transpose(0, 1)  # [2, 3, 40] with strides (40, 80, 1): no single row stride
    assert copies & _aten_ops_inside(lambda: act.silu_mul(bt, bt))


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_gate_gradient(device):
    """A stride-0 gate (one row broadcast by expand, the caller's choice: shapes still match exactly)
    gets the summed gradient."""
    g = torch.randn(1, 33, device=device, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 33, device=device, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(act.silu_mul(g.expand(5, 33), up).sum(), (g, up))
    want = torch.autograd.grad((F.silu(g.expand(5, 33)) * up).sum(), (g, up))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_packed_gradient_is_one_tensor(approximate, dtype, device):
    """The packed backward returns one [..., 2*I] gradient equal to eager's through chunk (no
    concatenation of two halves), in one torch_wsl operator."""
    torch.manual_seed(0)
    gate_up = torch.randn(2, 3, 2 * 45, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 3, 45, device=device, dtype=dtype)
    if approximate is None:
        out, fn = act.silu_mul_packed(gate_up), F.silu
    else:
        out, fn = act.gelu_mul_packed(gate_up, approximate), lambda t: F.gelu(t, approximate=approximate)
    (got,) = torch.autograd.grad(out, gate_up, dy)
    ref = gate_up.detach().double().requires_grad_()
    gate, up = ref.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(up * fn(gate), ref, dy.double())
    assert got.shape == gate_up.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, atol=4e-2 if dtype == torch.bfloat16 else 4e-3, rtol=1e-2)


def test_unused_input_gets_no_gradient():
    gate = torch.randn(4, 9, requires_grad=True)
    up = torch.randn(4, 9)
    (g,) = torch.autograd.grad(act.silu_mul(gate, up).sum(), gate)
    torch.testing.assert_close(g, torch.autograd.grad((F.silu(gate) * up).sum(), gate)[0])


def test_double_backward_is_refused():
    gate = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act.silu_mul(gate, up).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


# ------------------------------------------------------------------ argument validation


@pytest.mark.parametrize("bad", ["sigmoid", "", "Tanh", "None", "erf"])
def test_approximate_is_validated(bad):
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=rf"torch_wsl\.gelu_mul: expected approximate to be 'none' or 'tanh', "
                       rf"got '{bad}'"):
        act.gelu_mul(x, x, approximate=bad)
    with pytest.raises(RuntimeError, match=r"torch_wsl\.gelu_mul_packed: expected approximate"):
        act.gelu_mul_packed(x, approximate=bad)


def test_backward_operators_check_their_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"torch_wsl\.silu_mul_backward: expected grad_output to have the shape "
                       r"of gate \[4, 8\], got \[4, 7\]"):
        OPS.silu_mul_backward(torch.randn(4, 7), x, x)
    with pytest.raises(RuntimeError, match=r"torch_wsl\.silu_mul_packed_backward: expected grad_output to have "
                       r"shape \[4, 4\] \(gate_up's with its last dimension halved\), got \[4, 8\]"):
        OPS.silu_mul_packed_backward(x, x)
    with pytest.raises(RuntimeError, match=r"torch_wsl\.gelu_mul_packed_backward: expected grad_output to have the "
                       r"dtype of gate_up \(float32\), got bfloat16"):
        OPS.gelu_mul_packed_backward(torch.randn(4, 4).bfloat16(), x, "none")


def test_fake_kernels_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        gate_up = torch.empty(3, 5, 2 * 11)
        assert act.silu_mul_packed(gate_up).shape == (3, 5, 11)
        assert OPS.gelu_mul_packed_backward(torch.empty(3, 5, 11), gate_up, "tanh").shape == (3, 5, 22)
        gate = torch.empty(7, 13).t()
        gg, gu = OPS.silu_mul_backward(torch.empty(13, 7), gate, torch.empty(13, 7))
        assert gg.shape == gu.shape == (13, 7) and gg.is_contiguous()
