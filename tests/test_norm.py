"""LayerNorm / RMSNorm family against a float64 plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_wsl
import torch_wsl.nn.functional as TF
from conftest import DEVICES, TRAIN_DTYPES, tol

KINDS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]

# (batch shape, normalized_shape, affine): hidden sizes 1, 7, 769, 5125, 8192;
# one to three normalized dims; with and without weight and bias.
CASES = [
    ((5,), (1,), "wb"),
    ((3, 4), (7,), "wb"),
    ((13,), (769,), "w"),
    ((2,), (5125,), "wb"),
    ((3,), (8192,), "wb"),
    ((4,), (6, 7), "wb"),
    ((2, 3), (3, 5, 7), "b"),
    ((), (33,), "none"),
    ((0, 3), (16,), "wb"),
    ((4,), (0,), "wb"),
    # Many rows: several row groups in the CUDA weight/bias gradient's first
    # stage, so its second stage runs (and a short last group); the
    # warp-per-row / block-per-row boundary at 256 / 257 columns.
    ((1000,), (96,), "wb"),
    ((513,), (7,), "b"),
    ((4097,), (33,), "wb"),
    ((65,), (8192,), "wb"),
    ((3,), (256,), "wb"),
    ((5,), (257,), "w"),
]


def _case_id(case):
    batch, shape, affine = case
    return f"b{'x'.join(map(str, batch)) or 'scalar'}-n{'x'.join(map(str, shape))}-{affine}"


def make_input(shape, dtype, device, noncontiguous=False, scale=1.0, offset=0.0):
    if noncontiguous and len(shape) > 0:
        # Every other element of a wider tensor: strides that are not row-major.
        wide = torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64) * scale + offset
        return wide[..., ::2].to(device=device, dtype=dtype)
    return (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)


def make_params(kind, shape, affine, dtype, device):
    has_bias = "layer" in kind and "b" in affine
    w = make_input(shape, dtype, device, offset=1.0, scale=0.5) if "w" in affine else None
    b = make_input(shape, dtype, device, scale=0.5) if has_bias else None
    return w, b


def run_kind(kind, x, r, shape, w, b, eps=1e-5):
    """torch_wsl's result as (output, residual_out or None)."""
    if kind == "layer_norm":
        return TF.layer_norm(x, shape, w, b, eps), None
    if kind == "rms_norm":
        return TF.rms_norm(x, shape, w, eps), None
    if kind == "add_layer_norm":
        return TF.add_layer_norm(x, r, shape, w, b, eps)
    return TF.add_rms_norm(x, r, shape, w, eps)


def reference(kind, x, r, shape, w, b, eps=1e-5, round_sum=True):
    """float64 reference; the fused add's sum is rounded to the input dtype first, as the kernels do."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    s = d(x)
    if r is not None:
        s = x.double() + r.double()
        if round_sum:
            s = s.to(x.dtype).double()
    if "layer" in kind:
        out = F.layer_norm(s, shape, d(w), d(b), eps)
    else:
        out = F.rms_norm(s, shape, d(w), eps)
    return out, (s if r is not None else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_reference(device, dtype, kind, case):
    batch, shape, affine = case
    full = batch + shape
    x = make_input(full, dtype, device, offset=0.3)
    r = make_input(full, dtype, device) if kind.startswith("add") else None
    w, b = make_params(kind, shape, affine, dtype, device)
    out, res_out = run_kind(kind, x, r, shape, w, b)
    ref_out, ref_sum = reference(kind, x, r, shape, w, b)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    torch.testing.assert_close(out.double(), ref_out, **tol(dtype))
    if r is not None:
        assert res_out.dtype == dtype
        torch.testing.assert_close(res_out.double(), ref_sum, atol=0, rtol=0)


def _grads(kind, x, r, shape, w, b, fn, go, gres):
    leaves = [t for t in (x, r, w, b) if t is not None]
    out, res_out = fn(kind, x, r, shape, w, b)
    loss = (out.double() * go).sum()
    if res_out is not None:
        loss = loss + (res_out.double() * gres).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_reference(device, dtype, kind, case):
    batch, shape, affine = case
    full = batch + shape
    x = make_input(full, dtype, device, offset=0.3).requires_grad_()
    r = make_input(full, dtype, device).requires_grad_() if kind.startswith("add") else None
    w, b = make_params(kind, shape, affine, dtype, device)
    w = w.requires_grad_() if w is not None else None
    b = b.requires_grad_() if b is not None else None
    go = make_input(full, torch.float64, device)
    gres = make_input(full, torch.float64, device)
    got = _grads(kind, x, r, shape, w, b, run_kind, go, gres)

    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, r, w, b)]
    ref_fn = lambda k, x_, r_, s_, w_, b_: reference(k, x_, r_, s_, w_, b_, round_sum=False)  # noqa: E731
    want = _grads(kind, *leaves64[:2], shape, *leaves64[2:], ref_fn, go, gres)
    # Gradients of weight/bias sum over rows, each term carrying the rounding
    # of the incoming gradient to the dtype: allow for a random walk of that
    # many roundings (sqrt(rows)).
    rows = max(1, x.numel() // max(1, w.numel() if w is not None else (b.numel() if b is not None else 1)))
    for g, ref in zip(got, want):
        assert g.dtype == dtype
        is_param = g.shape == tuple(shape) and g.numel() != x.numel()
        scale = 4.0 * max(1.0, (rows / 16) ** 0.5) if is_param else 4.0
        torch.testing.assert_close(g.double(), ref, **tol(dtype, scale=scale))


def _at_offset(shape, dtype, device, offset, scale=1.0, base=0.0):
    """A contiguous tensor that starts `offset` elements into its storage (misaligned for vector loads)."""
    n = 1
    for d in shape:
        n *= d
    buf = (torch.randn(n + offset, dtype=torch.float64) * scale + base).to(device=device, dtype=dtype)
    return buf[offset:].view(shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cols", [7, 256, 257])
@pytest.mark.parametrize("where", ["1elem", "16bytes"])
def test_inputs_at_storage_offsets(device, dtype, kind, cols, where):
    # One element in: the CUDA kernels' pointers differ in misalignment, so
    # rows go scalar; 16 bytes in: aligned again (the vector path).
    offset = 1 if where == "1elem" else 16 // torch.empty((), dtype=dtype).element_size()
    shape = (cols,)
    full = (6, cols)
    x = _at_offset(full, dtype, device, offset, base=0.3).requires_grad_()
    r = _at_offset(full, dtype, device, offset).requires_grad_() if kind.startswith("add") else None
    w, b = make_params(kind, shape, "wb", dtype, device)
    w = w.requires_grad_()
    b = b.requires_grad_() if b is not None else None
    out, res_out = run_kind(kind, x, r, shape, w, b)
    ref_out, ref_sum = reference(kind, x, r, shape, w, b)
    torch.testing.assert_close(out.double(), ref_out, **tol(dtype))
    go = _at_offset(full, dtype, device, offset)
    leaves = [t for t in (x, r, w, b) if t is not None]
    outs, grads_out = [out], [go]
    if res_out is not None:
        outs.append(res_out)
        grads_out.append(_at_offset(full, dtype, device, offset))
    got = torch.autograd.grad(outs, leaves, grads_out)
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, r, w, b)]
    ref_o, ref_s = reference(kind, *leaves64[:2], shape, *leaves64[2:], round_sum=False)
    ref_outs = [ref_o] + ([ref_s] if ref_s is not None else [])
    want = torch.autograd.grad(ref_outs, [t for t in leaves64 if t is not None], [g.double() for g in grads_out])
    for g, ref in zip(got, want):
        torch.testing.assert_close(g.double(), ref, **tol(dtype, scale=4.0))


def test_isa_paths_agree_bitwise_on_conversions():
    """bf16/fp16 rounding in the vector bodies equals c10's scalar rounding, NaN and Inf included."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 65504.0, 1e-8, 3.0e38])
    outs = {}
    best = torch_wsl.build_info()["cpu_simd_best"]
    isas = ["default", "avx2", "avx512"][: ["default", "avx2", "avx512"].index(best) + 1]
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.cat([torch.randn(64, 61) * 100, special.repeat(64, 1)], dim=1).to(dtype)
        r = torch.randn(64, 69).to(dtype)
        for isa in isas:
            prev = torch_wsl.set_cpu_isa(isa)
            try:
                outs[(dtype, isa)] = TF.add_rms_norm(x, r, (69,))[1]
            finally:
                torch_wsl.set_cpu_isa(prev)
        for isa in isas:
            torch.testing.assert_close(outs[(dtype, isa)], x + r, atol=0, rtol=0, equal_nan=True)
            assert torch.equal(outs[(dtype, isa)].view(torch.int16), outs[(dtype, "default")].view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16])
def test_mixed_dtype_params(device, w_dtype):
    """bf16 activations with float32 (or other) parameters, as torch accepts them; output keeps input's dtype."""
    x = make_input((6, 96), torch.bfloat16, device, offset=0.3).requires_grad_()
    w = make_input((96,), w_dtype, device, offset=1.0).requires_grad_()
    b = make_input((96,), w_dtype, device).requires_grad_()
    out = TF.layer_norm(x, (96,), w, b)
    assert out.dtype == torch.bfloat16
    ref = F.layer_norm(x.double(), (96,), w.double(), b.double())
    torch.testing.assert_close(out.double(), ref, **tol(torch.bfloat16))
    out.float().sum().backward()
    assert w.grad.dtype == w_dtype and b.grad.dtype == w_dtype and x.grad.dtype == torch.bfloat16
    out2 = TF.rms_norm(x, (96,), w)
    assert out2.dtype == torch.bfloat16
    torch.testing.assert_close(out2.double(), F.rms_norm(x.double(), (96,), w.double()), **tol(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_rows_give_nan_like_eager(device, kind):
    """Rows with Inf or NaN give what eager gives (NaN for LayerNorm); other rows are unaffected."""
    x = torch.randn(3, 8, device=device)
    x[0, 2] = float("inf")
    x[1, 5] = float("nan")
    r = torch.zeros_like(x) if "add" in kind else None
    out, _ = run_kind(kind, x, r, (8,), None, None)
    ref, _ = reference(kind, x, r, (8,), None, None)
    assert torch.isnan(out[1]).all()
    if "layer" in kind:
        assert torch.isnan(out[0]).all()
    torch.testing.assert_close(out.double(), ref, equal_nan=True, **tol(torch.float32))


def test_rms_norm_default_eps_matches_torch():
    x = torch.full((2, 8), 1e-4)
    torch.testing.assert_close(TF.rms_norm(x, (8,)), F.rms_norm(x, (8,)))
    xb = x.bfloat16()
    torch.testing.assert_close(TF.rms_norm(xb, (8,)), F.rms_norm(xb, (8,)), atol=0, rtol=0)


def test_fused_add_gradients_are_independent_tensors():
    """input.grad and residual.grad are equal in value but must not alias."""
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32, requires_grad=True)
    out, res_out = TF.add_rms_norm(x, r, (32,))
    (out.sum() + res_out.sum()).backward()
    torch.testing.assert_close(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    before = r.grad.clone()
    x.grad.add_(1.0)
    torch.testing.assert_close(r.grad, before)


def test_only_needed_gradients_are_computed():
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32)  # frozen
    b = torch.randn(32, requires_grad=True)
    TF.layer_norm(x, (32,), w, b).sum().backward()
    assert w.grad is None and b.grad is not None and x.grad is not None
    torch.testing.assert_close(b.grad, torch.full((32,), 4.0))


def test_parameters_on_another_device_are_rejected():
    x = torch.randn(4, 8)
    if torch.cuda.is_available() and torch_wsl.build_info()["cuda_kernels"]:
        with pytest.raises(RuntimeError, match=r"weight.*same device as input"):
            TF.layer_norm(x.cuda(), (8,), torch.randn(8))
    # The fake (meta) kernels check devices too, so a traced program fails the same way.
    with pytest.raises(RuntimeError, match=r"weight.*same device as input"):
        TF.layer_norm(x.to("meta"), (8,), torch.randn(8))


# ------------------------------------------------------------------ modules


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_module_is_drop_in(affine, bias):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm((6, 10), eps=1e-6, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            if bias:
                ref.bias.normal_()
    ours = torch_wsl.nn.LayerNorm((6, 10), eps=1e-6, elementwise_affine=affine, bias=bias)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 10)
    torch.testing.assert_close(ours(x), ref(x))
    r = torch.randn(3, 6, 10)
    out, res = ours(x, r)
    torch.testing.assert_close(out, ref(x + r))
    torch.testing.assert_close(res, x + r)


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_module_is_drop_in(affine):
    ref = torch.nn.RMSNorm(12, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
    ours = torch_wsl.nn.RMSNorm(12, elementwise_affine=affine)
    assert isinstance(ours, torch.nn.RMSNorm)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), ref(x))


def test_swap_norms_switches_a_model_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
        torch.nn.RMSNorm(32),
        torch.nn.Linear(32, 8),
    ).train()  # eval + no_grad would take the encoder's fused fast path, which bypasses its norm modules
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
        keys = list(model.state_dict())
        assert torch_wsl.nn.swap_norms(model) is model
        kinds = [type(m) for m in model.modules()]
        assert torch.nn.LayerNorm not in kinds and torch_wsl.nn.LayerNorm in kinds and torch_wsl.nn.RMSNorm in kinds
        assert list(model.state_dict()) == keys
        seen = []
        from torch.utils._python_dispatch import TorchDispatchMode

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(str(func))
                return func(*args, **(kwargs or {}))

        with Spy():
            out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert any("torch_wsl.layer_norm" in s for s in seen) and any("torch_wsl.rms_norm" in s for s in seen)


def test_build_info():
    info = torch_wsl.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cpu_simd"] in ("default", "avx2", "avx512")
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_version"] and info["cuda_archs"]
    else:
        assert info["cuda_version"] is None


def test_import_under_another_torch_fails_cleanly(tmp_path):
    """A build for another torch: `import torch_wsl` raises ImportError naming both versions; no crash."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    package = Path(torch_wsl.__file__).parent
    copy = tmp_path / "torch_wsl"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "_build_config.py").write_text('TORCH_VERSION = "2.0.0+cu118"\nWITH_CUDA = True\nCUDA_ARCHS = "8.6"\n')
    code = "import torch_wsl"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # an exception, not a signal
    assert "ImportError: torch_wsl was built against torch 2.0.0+cu118" in proc.stderr
    assert f"but torch {torch.__version__} is installed" in proc.stderr
    assert "pip install --no-build-isolation" in proc.stderr


def test_version_mismatch_is_a_clear_import_error():
    from torch_wsl._extension import check_torch_version

    check_torch_version("2.14.1", "2.14.1")
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0.*torch 2\.14\.1 is installed.*rebuild"):
        check_torch_version("2.13.0", "2.14.1")


@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("kind", ["add_layer_norm", "rms_norm"])
def test_large_outputs_use_streaming_stores_correctly(cpu_isa, dtype, kind):
    """Outputs of 16 MiB and more take the non-temporal store path; results must not change."""
    rows = (16 << 20) // (4096 * torch.tensor([], dtype=dtype).element_size())
    shape = (4096,)
    x = make_input((rows,) + shape, dtype, "cpu", offset=0.3).requires_grad_()
    r = make_input((rows,) + shape, dtype, "cpu").requires_grad_() if "add" in kind else None
    w, b = make_params(kind, shape, "wb", dtype, "cpu")
    out, res_out = run_kind(kind, x, r, shape, w, b)
    ref_out, ref_sum = reference(kind, x.detach(), None if r is None else r.detach(), shape, w, b)
    torch.testing.assert_close(out.double(), ref_out, **tol(dtype))
    go = torch.randn(x.shape, dtype=dtype)
    leaves = [t for t in (x, r) if t is not None]
    grads = torch.autograd.grad(out, leaves, go)
    # The input gradient against the small-tensor path on the same rows (no streaming there).
    for lo in (0, rows - 3):
        xs = x.detach()[lo : lo + 3].clone().requires_grad_()
        rs = None if r is None else r.detach()[lo : lo + 3].clone().requires_grad_()
        out_s, _ = run_kind(kind, xs, rs, shape, w, b)
        (g_small,) = torch.autograd.grad(out_s, [xs], go[lo : lo + 3])
        assert torch.equal(grads[0][lo : lo + 3], g_small)


@pytest.mark.parametrize("kind", ["add_layer_norm", "add_rms_norm"])
def test_gradient_when_only_one_output_is_used(kind):
    """Unused outputs get no materialized zero gradients, and the math still holds."""
    x = torch.randn(4, 16, requires_grad=True)
    r = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True) if "layer" in kind else None
    out, res = run_kind(kind, x, r, (16,), w, b)
    gx, gr = torch.autograd.grad(res.sum(), [x, r])  # only residual_out
    torch.testing.assert_close(gx, torch.ones_like(x))
    torch.testing.assert_close(gr, torch.ones_like(r))
    out, res = run_kind(kind, x, r, (16,), w, b)
    got = torch.autograd.grad(out.square().sum(), [x, r, w])  # only the normalized output
    ref_out, _ = reference(kind, x, r, (16,), w, b, round_sum=False)
    want = torch.autograd.grad(ref_out.square().sum(), [x, r, w])
    for g, ref in zip(got, want):
        torch.testing.assert_close(g.double(), ref.double(), **tol(torch.float32, scale=4.0))


# ------------------------------------------------------------------ RMSNorm as Hugging Face models compute it


def _hf_rms_norm(family: str, dim: int, dtype, device):
    """A transformers RMSNorm module of `family` with random weights in `dtype`."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    cls = {"llama": LlamaRMSNorm, "qwen2": Qwen2RMSNorm, "gemma": GemmaRMSNorm}[family]
    m = cls(dim, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(torch.randn(dim, dtype=torch.float64).mul(0.5).add(0 if family == "gemma" else 1))
    return m


_HF_MODES = {"llama": dict(casting_mode="llama"), "qwen2": dict(casting_mode="llama"),
             "gemma": dict(offset=1.0, casting_mode="gemma")}


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of a's dtype (both finite, same dtype)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    ia, ib = a.view(bits).long(), b.view(bits).long()
    # Map sign-magnitude to a monotonic integer line.
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("cols", [7, 769, 4096])
def test_rms_norm_matches_hf_modules_to_one_ulp(device, dtype, family, cols):
    torch.manual_seed(0)
    m = _hf_rms_norm(family, cols, dtype, device)
    x = torch.randn(33, cols, device=device, dtype=dtype) * 3
    want = m(x)
    got = TF.rms_norm(x, (cols,), m.weight, 1e-6, **_HF_MODES[family])
    assert got.dtype == want.dtype
    _assert_ulps(got, want, family)


def _assert_ulps(got, want, family):
    """bf16/fp16: the float32 row statistic differs from torch's by float32 ulps (summation order, rsqrt), so a
    rounding rarely falls the other way: one ulp, or two for llama's two roundings (x̂, then x̂ * w). float32
    results carry those few float32 ulps themselves (up to 8 for long rows)."""
    ulps = _ulps_apart(got, want)
    if got.dtype == torch.float32:
        limit, share = 8, 1.0
    else:
        limit, share = (2 if family in ("llama", "qwen2") else 1), 0.02
    assert ulps.max() <= limit, f"max {ulps.max().item()} ulp"
    assert (ulps > 0).float().mean() <= share, f"{(ulps > 0).float().mean().item():.3%} of elements differ"


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_casting_modes_differ_where_the_models_differ(family):
    """The modes are not the same computation: in bf16, llama's early rounding changes results."""
    torch.manual_seed(0)
    m = _hf_rms_norm(family, 1024, torch.bfloat16, "cpu")
    x = torch.randn(64, 1024, dtype=torch.bfloat16)
    other = {"llama": dict(casting_mode="torch"), "gemma": dict(offset=1.0, casting_mode="llama")}[family]
    assert not torch.equal(TF.rms_norm(x, (1024,), m.weight, 1e-6, **other), m(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_rms_norm_modes_gradients_match_hf(device, family):
    torch.manual_seed(0)
    m = _hf_rms_norm(family, 96, torch.float32, device)
    x = torch.randn(10, 96, device=device, requires_grad=True)
    go = torch.randn(10, 96, device=device)
    (m(x) * go).sum().backward()
    want_x, want_w = x.grad.clone(), m.weight.grad.clone()
    x.grad = None
    m.weight.grad = None
    (TF.rms_norm(x, (96,), m.weight, 1e-6, **_HF_MODES[family]) * go).sum().backward()
    torch.testing.assert_close(x.grad, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.weight.grad, want_w, atol=1e-4, rtol=1e-5)


def test_llama_mode_with_float32_weight_promotes_like_transformers():
    """Mixed precision: a float32 weight on bfloat16 activations gives float32, as LlamaRMSNorm does."""
    torch.manual_seed(0)
    m = _hf_rms_norm("llama", 256, torch.float32, "cpu")
    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
    want = m(x)
    got = TF.rms_norm(x, (256,), m.weight, 1e-6, casting_mode="llama")
    assert got.dtype == torch.float32
    _assert_ulps(got, want, "llama")
    got.sum().backward()
    assert x.grad is not None and m.weight.grad is not None


@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
def test_add_rms_norm_llama_mode_matches_hf_after_the_add(dtype):
    torch.manual_seed(0)
    m = _hf_rms_norm("llama", 512, dtype, "cpu")
    x = torch.randn(16, 512, dtype=dtype)
    r = torch.randn(16, 512, dtype=dtype)
    out, res = TF.add_rms_norm(x, r, (512,), m.weight, 1e-6, casting_mode="llama")
    assert torch.equal(res, x + r)
    _assert_ulps(out, m(x + r), "llama")
