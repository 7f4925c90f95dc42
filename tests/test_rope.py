"""Rotary position embeddings against transformers' own code: bit for bit in float32 (forward and backward),
rounded once in 16-bit, every CPU ISA, the layouts the attention projections produce, a real LlamaAttention,
special values, and errors (the generic checks are in test_ops.py through tests/opdb/rope.py)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.cohere import modeling_cohere as cohere
from transformers.models.glm import modeling_glm as glm
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.gptj import modeling_gptj as gptj
from transformers.models.llama import modeling_llama as llama

import torch_wsl  # noqa: F401
from conftest import DEVICES
from torch_wsl.ops.rope import apply_rotary_pos_emb

HEAD_DIMS = [64, 80, 96, 128, 256]
_ops = torch.ops.torch_wsl


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def projection_view(b, s, h, d, dtype, device, g):
    """q as LlamaAttention makes it: q_proj(x).view(b, s, h, d).transpose(1, 2)."""
    return torch.randn(b, s, h * d, generator=g).to(device=device, dtype=dtype).view(b, s, h, d).transpose(1, 2)


def llama_tables(b, s, rotary, dtype, device, base=10000.0, scaling=1.0):
    """cos/sin as LlamaRotaryEmbedding computes them (cat(freqs, freqs)), positions offset per batch row."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary, 2, dtype=torch.int64).float() / rotary))
    pos = torch.arange(s).float()[None] + 100.0 * torch.arange(b).float()[:, None]
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device=device, dtype=dtype), (emb.sin() * scaling).to(device=device, dtype=dtype)


def run_both(fn_ours, fn_ref, inputs, grads):
    """Outputs and input gradients of both functions on fresh leaves of the same inputs."""
    results = []
    for fn in (fn_ours, fn_ref):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        outs = fn(*leaves)
        torch.autograd.backward(outs, grads)
        results.append((outs, [t.grad for t in leaves]))
    return results


def assert_bitwise(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]"
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}[{i}]: {m}")


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The bfloat16 ulp at each value (subnormals: the smallest normal's)."""
    e = torch.floor(torch.log2(t.abs().double().clamp_min(2.0**-126)))
    return 2.0 ** (e - 7)


# ------------------------------------------------------------------ bit-exactness


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bhsd-view", "bshd"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_float32_bitwise_equals_llama(device, head_dim, layout):
    """Products rounded before the add: float32 results and gradients are transformers' exactly."""
    g = _gen(head_dim)
    b, s, hq, hk = 2, 13, 4, 2  # GQA
    q = projection_view(b, s, hq, head_dim, torch.float32, device, g)
    k = projection_view(b, s, hk, head_dim, torch.float32, device, g)
    unsqueeze_dim = 1
    if layout == "bshd":
        q, k, unsqueeze_dim = q.transpose(1, 2), k.transpose(1, 2), 2
    cos, sin = llama_tables(b, s, head_dim, torch.float32, device)
    grads = [torch.randn(t.shape, generator=g).to(device) for t in (q, k)]
    (o, go), (r, gr) = run_both(
        lambda q, k: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim),
        lambda q, k: llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim),
        [q, k],
        grads,
    )
    assert_bitwise(o, r, "output")
    assert_bitwise(go, gr, "grad")


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("head_dim,rotary", [(128, 128), (80, 80), (96, 32), (18, 18)])
def test_float32_bitwise_on_every_cpu_isa(cpu_isa, head_dim, rotary, interleaved):
    """Vector bodies and scalar tails (80 = 2 x 16 + 8 per half; 18: tails only) compute the same bits."""
    g = _gen(1)
    q = projection_view(2, 7, 3, head_dim, torch.float32, "cpu", g)
    k = projection_view(2, 7, 1, head_dim, torch.float32, "cpu", g)
    cos, sin = llama_tables(2, 7, rotary, torch.float32, "cpu")
    if interleaved:
        cos, sin = cos[..., : rotary // 2].repeat_interleave(2, -1), sin[..., : rotary // 2].repeat_interleave(2, -1)

    def ref(q, k):
        if not interleaved:
            return neox.apply_rotary_pos_emb(q, k, cos, sin)

        def one(x):
            x_rot = x[..., :rotary]
            out = x_rot * cos[:, None] + gptj.rotate_every_two(x_rot) * sin[:, None]
            return torch.cat([out, x[..., rotary:]], -1)

        return one(q), one(k)

    grads = [torch.randn(t.shape, generator=g) for t in (q, k)]
    (o, go), (r, gr) = run_both(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved), ref,
                                [q, k], grads)
    assert_bitwise(o, r, f"{cpu_isa} output")
    assert_bitwise(go, gr, f"{cpu_isa} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["rotate-half", "interleaved", "partial"])
def test_large_outputs_with_streaming_stores(cpu_isa, kind, dtype):
    """Outputs of 16 MiB and more go out with non-temporal stores on CPU (the pass-through of a partial
    rotary too): the same bits, forward and backward."""
    g = _gen(16)
    b, s, h, d = 1, 2048 if dtype == torch.bfloat16 else 1024, 32, 128
    rotary = 32 if kind == "partial" else d
    q = projection_view(b, s, h, d, dtype, "cpu", g)
    k = projection_view(b, s, 8, d, dtype, "cpu", g)
    cos, sin = llama_tables(b, s, rotary, dtype, "cpu")
    interleaved = kind == "interleaved"
    if interleaved:
        cos, sin = cos[..., : rotary // 2].repeat_interleave(2, -1), sin[..., : rotary // 2].repeat_interleave(2, -1)
    assert (q.numel() + k.numel()) * q.element_size() >= 16 << 20

    def ref(q, k, c, s):
        if not interleaved:
            return neox.apply_rotary_pos_emb(q, k, c, s)
        return tuple(x * c[:, None] + gptj.rotate_every_two(x) * s[:, None] for x in (q, k))

    args = [t.float() for t in (q, k, cos, sin)]
    want = [t.to(dtype) for t in ref(*args)]
    assert_bitwise(apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved), want, "output")
    gq = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    gk = torch.randn(b, s, 8, d, generator=g).to(dtype).transpose(1, 2)
    got = _ops.apply_rotary_pos_emb_backward(gq, gk, cos, sin, 1, interleaved, q.stride(), k.stride())
    leaves = [t.detach().requires_grad_() for t in args[:2]]
    torch.autograd.backward(list(ref(*leaves, *args[2:])), [gq.float(), gk.float()])
    assert_bitwise(got, [t.grad.to(dtype) for t in leaves], "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_is_float32_math_rounded_once(device, dtype):
    """16-bit inputs: exactly transformers' float32 computation on the same values, rounded once."""
    g = _gen(2)
    q = projection_view(2, 9, 4, 128, dtype, device, g)
    k = projection_view(2, 9, 2, 128, dtype, device, g)
    cos, sin = llama_tables(2, 9, 128, dtype, device)
    gq, gk = (torch.randn(t.shape, generator=g).to(device=device, dtype=dtype) for t in (q, k))
    (o, go), _ = run_both(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), lambda q, k: (q, k), [q, k], [gq, gk])
    (r, gr), _ = run_both(
        lambda q, k: llama.apply_rotary_pos_emb(q, k, cos.float(), sin.float()),
        lambda q, k: (q, k),
        [q.float(), k.float()],
        [gq.float(), gk.float()],
    )
    assert_bitwise(o, [t.to(dtype) for t in r], "output")
    assert_bitwise(go, [t.to(dtype) for t in gr], "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_against_transformers_in_ulps(device):
    """transformers in bf16 rounds q*cos and rotate_half(q)*sin before adding them (up to thousands of ulps
    off where they cancel); ours is the correctly rounded result, so it is never farther from the truth."""
    g = _gen(3)
    b, s, h, d = 2, 257, 8, 128
    q = projection_view(b, s, h, d, torch.bfloat16, device, g)
    k = projection_view(b, s, 2, d, torch.bfloat16, device, g)
    cos, sin = llama_tables(b, s, d, torch.bfloat16, device)
    ours = apply_rotary_pos_emb(q, k, cos, sin)
    hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    truth = llama.apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    for o, r, t in zip(ours, hf, truth):
        ulp = bf16_ulp(t.to(torch.bfloat16))
        err_ours = (o.double() - t).abs() / ulp
        err_hf = (r.double() - t).abs() / ulp
        assert err_ours.max().item() <= 0.5, "not correctly rounded"
        assert torch.equal(o, t.to(torch.bfloat16))
        assert bool((err_ours <= err_hf).all()), "farther from the truth than transformers' bf16"
        same = (o == r).double().mean().item()
        assert 0.5 < same < 1.0, f"{same:.3f} of elements equal to transformers' bf16"
        assert err_hf.max().item() > 1.0  # the comparison can tell the two apart


# ------------------------------------------------------------------ the models' own functions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotary_dim", [64, 256], ids=["partial", "full"])
def test_interleaved_matches_gptj_attention(device, rotary_dim):
    """GPT-J's tables (one sin/cos per pair, [b, s, h, d] layout, rotary_dim slicing) through repeat_interleave."""
    g = _gen(4)
    b, s, h, d = 2, 11, 4, 256
    table = gptj.create_sinusoidal_positions(64, rotary_dim)
    pos = torch.arange(s)[None].expand(b, s) + torch.tensor([[0], [17]])
    sincos = table[pos].to(device)
    sin_h, cos_h = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
    q = torch.randn(b, s, h * d, generator=g).to(device).view(b, s, h, d)
    k = torch.randn(b, s, h * d, generator=g).to(device).view(b, s, h, d)

    def gptj_ref(q, k):
        outs = []
        for x in (q, k):
            x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
            outs.append(torch.cat([gptj.apply_rotary_pos_emb(x_rot, sin_h, cos_h), x_pass], dim=-1))
        return tuple(outs)

    cos, sin = cos_h.repeat_interleave(2, -1), sin_h.repeat_interleave(2, -1)
    grads = [torch.randn(t.shape, generator=g).to(device) for t in (q, k)]
    (o, go), (r, gr) = run_both(
        lambda q, k: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2, interleaved=True), gptj_ref, [q, k], grads
    )
    assert_bitwise(o, r, "output")
    assert_bitwise(go, gr, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_interleaved_matches_cohere_in_bfloat16(device):
    """Cohere rotates in float32 and rounds once, as we do: bit for bit in bf16."""
    g = _gen(5)
    q = projection_view(2, 7, 4, 64, torch.bfloat16, device, g)
    k = projection_view(2, 7, 1, 64, torch.bfloat16, device, g)
    cos, sin = llama_tables(2, 7, 64, torch.bfloat16, device)
    cos, sin = cos[..., :32].repeat_interleave(2, -1), sin[..., :32].repeat_interleave(2, -1)  # CohereRotaryEmbedding
    ours = apply_rotary_pos_emb(q, k, cos, sin, interleaved=True)
    assert_bitwise(ours, cohere.apply_rotary_pos_emb(q, k, cos, sin), "output")


@pytest.mark.parametrize("device", DEVICES)
def test_glm_partial_interleaved(device):
    """GLM: Llama-form tables of half the head, of which it interleaves the first half: a view and a repeat."""
    g = _gen(6)
    q = projection_view(1, 9, 4, 128, torch.float32, device, g)
    k = projection_view(1, 9, 2, 128, torch.float32, device, g)
    cos, sin = llama_tables(1, 9, 64, torch.float32, device)  # partial_rotary_factor 0.5
    want = glm.apply_rotary_pos_emb(q, k, cos, sin)
    c, s = cos[..., :32].repeat_interleave(2, -1), sin[..., :32].repeat_interleave(2, -1)
    assert_bitwise(apply_rotary_pos_emb(q, k, c, s, interleaved=True), want, "output")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_attention_with_its_rotary_module(device, attn, monkeypatch):
    """A tiny LlamaAttention (GQA, random config and weights) forward and backward, transformers' rotary
    embedding module feeding cos/sin: patched onto torch_wsl, the same outputs and parameter gradients."""
    g = _gen(7)
    config = llama.LlamaConfig(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, intermediate_size=64,
        num_hidden_layers=1, vocab_size=32, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    attention = llama.LlamaAttention(config, layer_idx=0).to(device)
    rotary = llama.LlamaRotaryEmbedding(config).to(device)
    hidden = torch.randn(2, 11, 96, generator=g).to(device)
    position_ids = torch.arange(11, device=device)[None].expand(2, -1) + torch.tensor([[0], [5]], device=device)
    mask = torch.full((11, 11), float("-inf"), device=device).triu(1)[None, None].expand(2, 1, 11, 11)
    dy = torch.randn(2, 11, 96, generator=g).to(device)

    def run():
        attention.zero_grad()
        x = hidden.clone().requires_grad_(True)
        cos, sin = rotary(x, position_ids)
        out, _ = attention(x, position_embeddings=(cos, sin), attention_mask=mask)
        out.backward(dy)
        return out.detach(), x.grad, [p.grad.clone() for p in attention.parameters()]

    want = run()
    calls = []

    def ours(q, k, cos, sin, *args, **kwargs):
        calls.append((q.stride(), k.shape))
        return apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs)

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", ours)
    got = run()
    assert calls and calls[0][1][1] == 2, "the patched function was not called with the GQA key"
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_and_gradients_keep_the_projection_layout(device):
    """q_embed is laid out like q ([b, s, h, d] in memory for the transposed view), and so is q's gradient:
    the view back to the projection's output is free and AccumulateGrad on a leaf does not copy."""
    g = _gen(8)
    x = torch.randn(2, 5, 3 * 32, generator=g).to(device).requires_grad_(True)
    q = x.view(2, 5, 3, 32).transpose(1, 2)
    k = torch.randn(2, 1, 5, 32, generator=g).to(device).requires_grad_(True)  # contiguous [b, h, s, d]
    cos, sin = llama_tables(1, 5, 32, torch.float32, device)
    seen = {}

    def record(name):
        def hook(grad):
            seen[name] = grad.stride()

        return hook

    q.register_hook(record("q"))
    k.register_hook(record("k"))
    qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
    assert qe.stride() == q.stride() and ke.stride() == k.stride()
    (qe.sum() + ke.sum()).backward()
    assert seen == {"q": q.stride(), "k": k.stride()}
    assert x.grad.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_qkv_split_and_expanded_inputs(device):
    """Views that are not dense: q and k split from one fused projection, a k expanded over heads."""
    g = _gen(9)
    b, s, h, d = 2, 6, 4, 16
    qkv = torch.randn(b, s, (h + 2 * 2) * d, generator=g).to(device)
    q = qkv[..., : h * d].view(b, s, h, d).transpose(1, 2)
    k = qkv[..., h * d : (h + 2) * d].view(b, s, 2, d).transpose(1, 2)
    k_expanded = k[:, :1].expand(b, 3, s, d)
    cos, sin = llama_tables(b, s, d, torch.float32, device)
    for qq, kk in ((q, k), (q, k_expanded)):
        got = apply_rotary_pos_emb(qq, kk, cos, sin)
        assert_bitwise(got, llama.apply_rotary_pos_emb(qq, kk, cos, sin), "output")
        assert got[0].stride() == (s * h * d, d, h * d, 1)  # dense, in q's memory order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("which", ["q", "k", "cos"])
def test_inputs_at_storage_offsets(device, dtype, which):
    """One operand one element past an aligned address: the CUDA kernel falls back to element-wise access."""
    g = _gen(13)
    b, s, h, d = 2, 5, 4, 64
    q = projection_view(b, s, h, d, dtype, device, g)
    k = projection_view(b, s, 2, d, dtype, device, g)
    cos, sin = llama_tables(b, s, d, dtype, device)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=dtype, device=device)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    args = {"q": q, "k": k, "cos": cos}
    args[which] = shifted(args[which].contiguous())
    got = apply_rotary_pos_emb(args["q"], args["k"], args["cos"], sin)
    want = llama.apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
    assert_bitwise(got, [t.to(dtype) for t in want], "output")


@pytest.mark.parametrize("device", DEVICES)
def test_negative_unsqueeze_dim_and_different_head_dims(device):
    """unsqueeze_dim counts from the end as in torch.unsqueeze; q and k may differ in head_dim around a
    common rotary part (GPT-NeoX's slicing accepts it)."""
    g = _gen(15)
    q = projection_view(2, 5, 4, 128, torch.float32, device, g)
    k = projection_view(2, 5, 1, 64, torch.float32, device, g)
    cos, sin = llama_tables(2, 5, 64, torch.float32, device)
    want = neox.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=-3)
    assert_bitwise(apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=-3), want, "output")


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("device", DEVICES)
def test_special_values_propagate_as_in_transformers(device):
    g = _gen(10)
    q = torch.randn(1, 2, 4, 8, generator=g)
    q[0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    q[0, 1, 1, 0] = 3e38  # the product overflows
    q, k = q.to(device), q[:, :1].clone().to(device)
    cos, sin = llama_tables(1, 4, 8, torch.float32, device)
    assert_bitwise(apply_rotary_pos_emb(q, k, cos, sin), llama.apply_rotary_pos_emb(q, k, cos, sin), "output")


@pytest.mark.parametrize("device", DEVICES)
def test_position_ids_are_accepted_and_ignored(device):
    g = _gen(11)
    q = projection_view(1, 3, 2, 16, torch.float32, device, g)
    cos, sin = llama_tables(1, 3, 16, torch.float32, device)
    want = apply_rotary_pos_emb(q, q, cos, sin)
    got = apply_rotary_pos_emb(q, q, cos, sin, torch.arange(3, device=device)[None], unsqueeze_dim=1)
    assert_bitwise(got, want, "output")


# ------------------------------------------------------------------ autograd


def test_tables_that_require_grad_raise_unless_no_grad():
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = llama_tables(1, 3, 8, torch.float32, "cpu")
    learned = cos.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"expected cos not to require grad \(cos and sin are not differentiated"):
        apply_rotary_pos_emb(q, q, learned, sin)
    with torch.no_grad():
        out = apply_rotary_pos_emb(q, q, learned, sin)
    assert_bitwise(out, apply_rotary_pos_emb(q, q, cos, sin), "no_grad output")
    out = apply_rotary_pos_emb(q, q, learned.detach(), sin)
    assert out[0].requires_grad


class _RecordBackwardCalls(TorchDispatchMode):
    """The (grad_q_embed, grad_k_embed) arguments of each apply_rotary_pos_emb_backward call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _ops.apply_rotary_pos_emb_backward.default:
            self.calls.append((args[0], args[1]))
        return func(*args, **(kwargs or {}))


def test_one_output_and_one_input_needing_grad():
    """Only q_embed used, or k not requiring grad: the other gradient is neither computed nor returned."""
    g = _gen(12)
    q = torch.randn(1, 2, 5, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, generator=g, requires_grad=True)
    cos, sin = llama_tables(1, 5, 16, torch.float32, "cpu")
    qe, _ = apply_rotary_pos_emb(q, k, cos, sin)
    with _RecordBackwardCalls() as rec:
        qe.sum().backward()
    assert k.grad is None
    assert len(rec.calls) == 1 and rec.calls[0][0] is not None and rec.calls[0][1] is None
    q2 = q.detach().clone().requires_grad_(True)
    llama.apply_rotary_pos_emb(q2, k.detach(), cos, sin)[0].sum().backward()
    assert torch.equal(q.grad, q2.grad)
    k.grad = None
    qd = q.detach()
    qe, ke = apply_rotary_pos_emb(qd, k, cos, sin)
    with _RecordBackwardCalls() as rec:
        (qe.sum() + ke.sum()).backward()
    assert k.grad is not None and k.grad.shape == k.shape
    assert len(rec.calls) == 1 and rec.calls[0][0] is None and rec.calls[0][1] is not None


def test_double_backward_is_refused():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = llama_tables(1, 3, 8, torch.float64, "cpu")
    qe, _ = apply_rotary_pos_emb(q, q, cos, sin)
    (gq,) = torch.autograd.grad((qe**2).sum(), q, create_graph=True)  # a cotangent that depends on q
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gq.sum().backward()


def test_compile_keeps_the_sequence_length_dynamic():
    """One graph for every sequence length: the fake kernels' checks and layout do not specialize sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(apply_rotary_pos_emb, backend=counter, fullgraph=True, dynamic=True)
    g = _gen(14)
    for s in (7, 13, 21):
        x = torch.randn(2, s, 4 * 16, generator=g, requires_grad=True)
        q = x.view(2, s, 4, 16).transpose(1, 2)
        k = torch.randn(2, 2, s, 16, generator=g, requires_grad=True)
        cos, sin = llama_tables(2, s, 16, torch.float32, "cpu")
        got = fn(q, k, cos, sin)
        assert_bitwise(got, llama.apply_rotary_pos_emb(q, k, cos, sin), f"seq {s}")
        assert got[0].stride() == q.stride()
        (got[0].sum() + got[1].sum()).backward()
    assert counter.frame_count == 1


# ------------------------------------------------------------------ the backward operator's checks


def _backward_bad_calls():
    g = torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    st = list(g.stride())
    yield (g, g, cos, sin, 1, False, st[:3], st), r"expected q_stride to have one entry per dimension of grad_q_embed " \
        r"\(4\), got 3 entries"
    yield (g, g.double(), cos, sin, 1, False, st, st), r"expected grad_k_embed to have the dtype of grad_q_embed"
    yield (None, g, cos.half(), sin, 1, False, st, st), r"expected cos to have the dtype of grad_k_embed \(float32\)"
    yield (g, None, cos[:, :2], sin, 1, False, st, st), r"expected sin to have the last dimension|expected cos " \
        r"unsqueezed at dim 1 to broadcast to the shape of grad_q_embed"


@pytest.mark.parametrize("case", list(range(4)))
def test_backward_operator_errors_match_its_fake(case):
    args, match = list(_backward_bad_calls())[case]
    with pytest.raises(RuntimeError, match=match) as real:
        _ops.apply_rotary_pos_emb_backward(*args)
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, pytest.raises(RuntimeError) as fake:
        _ops.apply_rotary_pos_emb_backward(*fake_args)
    assert str(fake.value).splitlines()[0] == str(real.value).splitlines()[0]


def test_backward_operator_without_gradients_returns_empties():
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    gq, gk = _ops.apply_rotary_pos_emb_backward(None, None, cos, sin, 1, False, [], [])
    assert gq.shape == (0,) and gk.shape == (0,)
