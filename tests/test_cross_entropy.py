"""Cross-entropy family: what the generic registry tests (tests/test_ops.py) do not cover.

Gemma 2's softcapped loss against transformers' own model, tied LM-head/embedding weights, chunk-size
invariance, bfloat16 against eager bfloat16, torch's exact label-smoothing/weight/ignore semantics, extreme
logits, the in-place operator's aliasing, and the CrossEntropyLoss module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_wsl  # noqa: F401
from conftest import DEVICES, tol
from torch_wsl.nn.loss import CrossEntropyLoss
from torch_wsl.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_loss_grad_,
    default_chunk_size,
    linear_cross_entropy,
)


def _targets(n, classes, gen, ignore_every=5):
    t = torch.randint(0, classes, (n,), generator=gen)
    t[::ignore_every] = -100
    return t


def _ref(x, t, **kw):
    cap = kw.pop("softcap", None)
    z = cap * torch.tanh(x / cap) if cap is not None else x
    return F.cross_entropy(z, t, **kw)


# ------------------------------------------------------------------ torch's exact semantics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_weights_ignore_match_torch(device, reduction, smoothing, weighted):
    """torch's formula for label smoothing with class weights and ignored rows, checked in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 11, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    t = _targets(37, 11, gen).to(device)
    w = (torch.rand(11, dtype=torch.float64, generator=gen) + 0.2).to(device) if weighted else None
    got = cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing)
    want = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    g = torch.randn(got.shape, dtype=torch.float64, generator=gen).to(device)
    (gx,) = torch.autograd.grad((got * g).sum(), x)
    (wx,) = torch.autograd.grad((want * g).sum(), x)
    torch.testing.assert_close(gx, wx, **tol(torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_and_empty_batches_match_torch(device, weighted):
    """A mean over no valid target is nan (as torch gives) with zero gradients; sum is 0."""
    w = torch.rand(5, dtype=torch.float64).to(device) + 0.5 if weighted else None
    for rows in (0, 4):
        x = torch.randn(rows, 5, dtype=torch.float64, device=device, requires_grad=True)
        t = torch.full((rows,), -100, dtype=torch.long, device=device)
        for reduction in ("mean", "sum", "none"):
            got = cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
            want = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
            torch.testing.assert_close(got, want, equal_nan=True)
            if rows:
                (gx,) = torch.autograd.grad(got.sum(), x)
                (wx,) = torch.autograd.grad(want.sum(), x)
                assert torch.equal(gx, wx) and not gx.count_nonzero()
        assert torch.isnan(cross_entropy(x, t, w)).item()


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    """Masked (-inf) logits, a large common offset with label smoothing, NaN propagation."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, dtype=torch.float64, generator=gen)
    x[:, 5:9] = -float("inf")  # masked vocabulary entries
    x[0, 0] = -float("inf")  # the smoothing sum's reference logit is masked too
    t = torch.tensor([1, 2, 3, 30, 39, 0])
    for dtype in (torch.float32, torch.float64):
        got = cross_entropy(x.to(device, dtype), t.to(device), reduction="none")
        want = F.cross_entropy(x, t, reduction="none")
        # row 5's target is masked: torch gives inf, so must we
        torch.testing.assert_close(got.double().cpu(), want, **tol(dtype))
    offset = torch.randn(6, 40, dtype=torch.float64, generator=gen) + 1000.0
    for dtype in (torch.float32, torch.float64):
        got = cross_entropy(offset.to(device, dtype), t.to(device), label_smoothing=0.3, reduction="none")
        want = F.cross_entropy(offset.to(dtype).double(), t, label_smoothing=0.3, reduction="none")
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-3 if dtype == torch.float32 else 1e-9, rtol=0)
    nan = torch.randn(3, 9)
    nan[1, 4] = float("nan")
    got = cross_entropy(nan.to(device), torch.tensor([0, 1, 2], device=device), reduction="none")
    assert torch.isnan(got[1]) and torch.isfinite(got[0]) and torch.isfinite(got[2])


@pytest.mark.parametrize("device", DEVICES)
def test_input_layouts(device):
    """[C] with a 0-dim target and [N, C, d1, d2] with [N, d1, d2] targets, as torch takes them."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 4, 5, generator=gen).to(device)
    t = torch.randint(0, 7, (3, 4, 5), generator=gen).to(device)
    t[0, 0, 0] = -100
    for reduction in ("none", "mean", "sum"):
        torch.testing.assert_close(cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction))
    v = torch.randn(9, generator=gen).to(device)
    for reduction in ("none", "mean", "sum"):
        got = cross_entropy(v, torch.tensor(4, device=device), reduction=reduction)
        assert got.shape == torch.Size([])
        torch.testing.assert_close(got, F.cross_entropy(v, torch.tensor(4, device=device), reduction=reduction))


def test_weight_gradient_is_refused():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.rand(6, requires_grad=True)
    loss = cross_entropy(x, torch.tensor([0, 1, 2, 3]), w)
    with pytest.raises(RuntimeError, match=r"gradient of weight is not implemented"):
        loss.backward()


def test_backward_is_first_order_only():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(cross_entropy(x, torch.tensor([0, 1, 2, 3])), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward is not supported"):
        g.sum().backward()


# ------------------------------------------------------------------ softcap (Gemma 2)


def _tiny_gemma2(dtype):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0, tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # larger logits, so the softcap's slope matters
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemma2_softcapped_loss_and_tied_gradients_match_transformers(dtype):
    """transformers' Gemma2ForCausalLM loss (softcap 30, tied LM head) against torch_wsl's fused path,
    through the real model: loss, and gradients of every parameter (the tied embedding included)."""
    model = _tiny_gemma2(dtype)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100

    out = model(input_ids=ids, labels=labels)
    want_grads = torch.autograd.grad(out.loss, list(model.parameters()))

    hidden = model.model(input_ids=ids).last_hidden_state
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    cap = model.config.final_logit_softcapping
    loss = linear_cross_entropy(hidden, model.lm_head.weight, shift, softcap=cap, chunk_size=5)
    got_grads = torch.autograd.grad(loss, list(model.parameters()))

    scale = 1.0 if dtype == torch.float32 else 2.0
    torch.testing.assert_close(loss.float(), out.loss.float(), **tol(dtype, scale))
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        # bf16: transformers softcaps in bf16 (three roundings), torch_wsl in float32
        torch.testing.assert_close(g.float(), w.float(), atol=tol(dtype, 8 * scale)["atol"] * w.abs().max().item(),
                                   rtol=tol(dtype, 8 * scale)["rtol"], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_gradient_against_gemma2_formula(device):
    """cross_entropy(softcap=c) against transformers' Gemma 2 recipe (logits / c, tanh, * c, then the loss in
    float32), with logits large enough that the cap bends them."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(16, 300, generator=gen) * 40).to(device)
    t = _targets(16, 300, gen).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype).requires_grad_()
        got = cross_entropy(x, t, softcap=30.0)
        (gx,) = torch.autograd.grad(got, x)
        xr = x.detach().requires_grad_()
        capped = torch.tanh(xr / 30.0) * 30.0
        want = F.cross_entropy(capped.float(), t)
        (wx,) = torch.autograd.grad(want, xr)
        torch.testing.assert_close(got.float(), want, **tol(dtype))
        torch.testing.assert_close(gx.float(), wx.float(), **tol(dtype, 4))


# ------------------------------------------------------------------ linear cross-entropy


class _TiedLM(torch.nn.Module):
    def __init__(self, vocab, hidden, dtype):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, hidden, dtype=dtype)
        self.proj = torch.nn.Linear(hidden, hidden, dtype=dtype)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as many LMs do

    def hidden(self, ids):
        return torch.tanh(self.proj(self.embed_tokens(ids)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tied_embedding_gets_one_correct_gradient(device, reduction):
    torch.manual_seed(0)
    model = _TiedLM(50, 24, torch.float64).to(device)
    ids = torch.randint(0, 50, (3, 7), device=device)
    labels = torch.randint(0, 50, (3, 7), device=device)
    labels[1, 2] = -100

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model.hidden(ids))
        (loss if reduction != "none" else (loss * torch.linspace(0.5, 2, 7, device=device, dtype=loss.dtype)).sum()
         ).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    got = grads(lambda h: linear_cross_entropy(h, model.lm_head.weight, labels, reduction=reduction, chunk_size=4))
    want = grads(lambda h: F.cross_entropy(model.lm_head(h).flatten(0, 1), labels.flatten(), reduction=reduction)
                 .reshape(labels.shape if reduction == "none" else ()))
    assert set(got) == {"embed_tokens.weight", "proj.weight", "proj.bias"}  # the tied weight is one parameter
    for name in got:
        torch.testing.assert_close(got[name], want[name], **tol(torch.float64), msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_any_chunk_size_gives_the_same_result(device, dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 48, generator=gen) * 0.5).to(device, dtype)
    w = (torch.randn(301, 48, generator=gen) * 0.2).to(device, dtype)
    b = (torch.randn(301, generator=gen) * 0.1).to(device, dtype)
    t = _targets(37, 301, gen).to(device)
    results = []
    for chunk in (1, 3, 7, 16, 36, 37, 1000, None):
        xs, ws, bs = (v.detach().requires_grad_() for v in (x, w, b))
        loss = linear_cross_entropy(xs, ws, t, bs, label_smoothing=0.1, softcap=8.0, chunk_size=chunk)
        loss.backward()
        results.append((chunk, loss.detach(), xs.grad, ws.grad, bs.grad))
    _, *first = results[0]
    for chunk, *rest in results[1:]:
        for a, b_ in zip(rest, first):
            if dtype == torch.float32:  # float32 rounding only
                torch.testing.assert_close(a, b_, atol=1e-6, rtol=1e-5, msg=lambda m, c=chunk: f"chunk {c}: {m}")
            else:  # each chunk's product is rounded to bf16 once before the float32 sum
                torch.testing.assert_close(a.float(), b_.float(), atol=2e-3 * b_.abs().max().item(), rtol=2e-2,
                                           msg=lambda m, c=chunk: f"chunk {c}: {m}")


def test_default_chunk_size():
    assert default_chunk_size(4096, 2048, 128256) == 512  # Llama 3: at least 512 tokens
    assert default_chunk_size(65536, 4096, 32000) == 8389  # logits of a chunk = size of the hidden states
    assert default_chunk_size(100, 2048, 128256) == 100  # never more than the tokens
    assert default_chunk_size(0, 16, 16) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_linear_bf16_matches_eager_bf16(device):
    """bfloat16 end to end against eager bfloat16 (F.linear + F.cross_entropy), the weight gradient included."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 33, 64, generator=gen)).to(device, torch.bfloat16)
    w = (torch.randn(1000, 64, generator=gen) * 0.125).to(device, torch.bfloat16)
    t = _targets(4 * 33, 1000, gen).reshape(4, 33).to(device)

    def run(fn):
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        loss = fn(xs, ws)
        loss.backward()
        return loss.detach().float(), xs.grad.float(), ws.grad.float()

    got = run(lambda a, b: linear_cross_entropy(a, b, t, chunk_size=20))
    want = run(lambda a, b: F.cross_entropy(F.linear(a, b).flatten(0, 1), t.flatten()))
    ref = run(lambda a, b: F.cross_entropy(F.linear(a.double(), b.double()).flatten(0, 1), t.flatten()))
    for g, e, r, name in zip(got, want, ref, ("loss", "grad_input", "grad_weight")):
        # no further from the float64 truth than eager bf16 is, give or take bf16's own rounding
        err_ours = (g.double() - r.double()).abs().max().item()
        err_eager = (e.double() - r.double()).abs().max().item()
        assert err_ours <= 2 * err_eager + 1e-2 * r.abs().max().item(), f"{name}: {err_ours} vs eager {err_eager}"
        torch.testing.assert_close(g, e, atol=2e-2 * e.abs().max().item(), rtol=4e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_linear_cross_entropy_outputs_and_grad_modes():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(11, 8, generator=gen, requires_grad=True)
    t = torch.randint(0, 11, (2, 5), generator=gen)
    # no_grad: the loss only (the operator computes no gradient)
    with torch.no_grad():
        out = torch.ops.torch_wsl.linear_cross_entropy(x.reshape(10, 8), w, t.reshape(10), grad_mask=[False] * 3)
        assert all(o.numel() == 0 for o in out[1:])
        torch.testing.assert_close(linear_cross_entropy(x, w, t), F.cross_entropy(F.linear(x, w).flatten(0, 1),
                                                                                  t.flatten()))
    # per-token losses keep the input's leading shape; their gradient follows each token's upstream gradient
    loss = linear_cross_entropy(x, w, t, reduction="none")
    assert loss.shape == (2, 5)
    g = torch.randn(2, 5, generator=gen)
    gx, gw = torch.autograd.grad(loss, (x, w), g)
    ref = F.cross_entropy(F.linear(x, w).flatten(0, 1), t.flatten(), reduction="none").reshape(2, 5)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert gx.shape == x.shape
    torch.testing.assert_close(gx, rx, **tol(torch.float32))
    torch.testing.assert_close(gw, rw, **tol(torch.float32))
    # the operator called directly without asking for a gradient it is later differentiated for
    loss = torch.ops.torch_wsl.linear_cross_entropy(x.reshape(10, 8), w, t.reshape(10), grad_mask=[False, True, False])[0]
    with pytest.raises(RuntimeError, match=r"the gradient of input was not computed in the forward"):
        torch.autograd.grad(loss, x)


def test_linear_cross_entropy_retain_graph_backward_twice():
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    loss = linear_cross_entropy(x, w, t, reduction="sum")
    (a,) = torch.autograd.grad(loss, w, retain_graph=True)
    (b,) = torch.autograd.grad(loss, w, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(b, 2 * a)


# ------------------------------------------------------------------ the in-place operator


@pytest.mark.parametrize("device", DEVICES)
def test_loss_grad_in_place_aliasing(device):
    """The gradient lands in the input's own storage (rows of a wider buffer: only the classes are written),
    the losses are a new tensor, and the input's version counter moves."""
    gen = torch.Generator().manual_seed(8)
    wide = torch.randn(6, 40, generator=gen).to(device)
    sentinel = wide[:, 33:].clone()
    x = wide[:, :33]
    t = _targets(6, 33, gen, ignore_every=4).to(device)
    ref_x = x.detach().clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_x, t, reduction="none", label_smoothing=0.1)
    (ref_g,) = torch.autograd.grad((ref_loss * 0.5).sum(), ref_x)
    ptr, version = x.data_ptr(), x._version
    loss = cross_entropy_loss_grad_(x, t, 0.5, label_smoothing=0.1)
    assert x.data_ptr() == ptr and x._version > version
    assert loss.data_ptr() != ptr and loss.dtype == torch.float32 and loss.shape == (6,)
    torch.testing.assert_close(loss, ref_loss.detach(), **tol(torch.float32))
    torch.testing.assert_close(x, ref_g, **tol(torch.float32))
    assert torch.equal(wide[:, 33:], sentinel), "columns beyond the rows were written"
    assert not x[t == -100].count_nonzero(), "ignored rows get a zero gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_loss_grad_per_row_scale(device):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 17, generator=gen).to(device)
    t = _targets(5, 17, gen).to(device)
    scale = torch.rand(5, generator=gen).to(device)
    ref_x = x.detach().clone().requires_grad_()
    (ref_g,) = torch.autograd.grad((F.cross_entropy(ref_x, t, reduction="none") * scale).sum(), ref_x)
    cross_entropy_loss_grad_(x, t, scale)
    torch.testing.assert_close(x, ref_g, **tol(torch.float32))


def test_target_out_of_range_writes_nothing_cpu():
    x = torch.randn(4, 9)
    before = x.clone()
    with pytest.raises(RuntimeError, match=r"target values to be class indices in \[0, 9\).*got 9 at position 3"):
        cross_entropy_loss_grad_(x, torch.tensor([0, 1, 2, 9]))
    assert torch.equal(x, before)
    w = torch.randn(9, 4)
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy: expected target values .* got -3 at position 0"):
        linear_cross_entropy(torch.randn(2, 4), w, torch.tensor([-3, 1]))


# ------------------------------------------------------------------ the module


def test_cross_entropy_loss_module_is_drop_in():
    w = torch.rand(7) + 0.5
    ours = CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.05)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(10, 7, requires_grad=True)
    t = torch.randint(0, 7, (10,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    # torch's legacy arguments resolve the reduction the same way
    assert CrossEntropyLoss(size_average=False).reduction == torch.nn.CrossEntropyLoss(size_average=False).reduction
    capped = CrossEntropyLoss(softcap=2.0)
    assert "softcap=2.0" in repr(capped)
    torch.testing.assert_close(capped(x, t), F.cross_entropy(2.0 * torch.tanh(x / 2.0), t))
    with pytest.raises(RuntimeError, match="class probabilities are not supported"):
        capped(x, torch.softmax(x, 1).detach())


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_module_fullgraph(device):
    loss_fn = CrossEntropyLoss(softcap=5.0, label_smoothing=0.1).to(device)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 13, device=device, requires_grad=True)
    t = torch.randint(0, 13, (8,), device=device)
    got = compiled(x, t)
    (gx,) = torch.autograd.grad(got, x)
    want = loss_fn(x, t)
    (wx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)


def test_loss_grad_refuses_inputs_that_require_grad_and_bumps_versions():
    x = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"cross_entropy_loss_grad_: expected input not to require grad"):
        cross_entropy_loss_grad_(x, torch.tensor([0, 1, 2]))
    # logits that autograd saved are refused after they were overwritten
    a = torch.randn(3, 5, requires_grad=True)
    logits = a * 2
    y = logits.detach()  # shares the storage and version counter
    out = (logits * logits).sum()  # mul saves logits
    cross_entropy_loss_grad_(y, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        out.backward()
