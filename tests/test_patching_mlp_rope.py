"""The MLP and RoPE rules of torch_wsl.optimize: which activations they fuse, when they fall back,
the per-instance attention clone (no global change, decorators rebuilt), PEFT LoRA, gradient
checkpointing and torch.compile(fullgraph=True). The families end to end: test_optimize_families.py."""

from __future__ import annotations

import copy
import functools
import sys
import types

import pytest
import torch
from torch import nn

import torch_wsl
from causal_lm_fixtures import OpNames as _Ops
from torch_wsl.patching import mlp as mlp_rules
from torch_wsl.patching import rope as rope_rules
from torch_wsl.patching._core import class_forward

transformers = pytest.importorskip("transformers")
activations = transformers.activations
modeling_llama = transformers.models.llama.modeling_llama




def _llama(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2, use_cache=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def _ids(seed=0, batch=2, seq=10):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ MLP


KNOWN = [
    ("silu", activations.ACT2FN["silu"], ("silu", "")),
    ("swish", activations.ACT2FN["swish"], ("silu", "")),  # torch.nn.SiLU
    ("gelu", activations.ACT2FN["gelu"], ("gelu", "none")),
    ("gelu_python", activations.ACT2FN["gelu_python"], ("gelu", "none")),
    ("gelu_pytorch_tanh", activations.ACT2FN["gelu_pytorch_tanh"], ("gelu", "tanh")),
    ("gelu_python_tanh", activations.ACT2FN["gelu_python_tanh"], ("gelu", "tanh")),
    ("gelu_new", activations.ACT2FN["gelu_new"], ("gelu", "tanh")),
    ("gelu_fast", activations.ACT2FN["gelu_fast"], ("gelu", "tanh")),
    ("nn.GELU", nn.GELU(), ("gelu", "none")),
    ("nn.GELU-tanh", nn.GELU(approximate="tanh"), ("gelu", "tanh")),
]


@pytest.mark.parametrize("name,act,kind", KNOWN, ids=[k[0] for k in KNOWN])
def test_activation_kind_and_the_fused_op_computes_the_activation(name, act, kind):
    assert mlp_rules.activation_kind(act) == kind
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(64, 48, generator=g) * 3
    up = torch.randn(64, 48, generator=g)
    op, approximate = kind
    got = torch_wsl.ops.silu_mul(gate, up) if op == "silu" else torch_wsl.ops.gelu_mul(gate, up, approximate)
    torch.testing.assert_close(got, act(gate) * up, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("act", [activations.ACT2FN["quick_gelu"], activations.ACT2FN["relu"], nn.Tanh(),
                                 activations.ACT2FN["gelu_10"], activations.ACT2FN["mish"]],
                         ids=["quick_gelu", "relu", "tanh", "gelu_10", "mish"])
def test_unknown_activations_have_a_reason(act):
    assert isinstance(mlp_rules.activation_kind(act), str)


def test_activation_configured_otherwise_has_a_reason():
    act = activations.ACT2FN["gelu_pytorch_tanh"]
    act.act = functools.partial(nn.functional.gelu, approximate="none", out=None)  # not what the class does
    assert isinstance(mlp_rules.activation_kind(act), str)
    act = activations.ACT2FN["silu"]
    act.forward = lambda x: x  # an instance forward of someone else's
    assert "replaced" in mlp_rules.activation_kind(act)


def test_mlp_with_an_unknown_activation_is_left_alone_with_the_reason():
    model = _llama(hidden_act="relu")
    report = torch_wsl.optimize(model)
    assert report.count("mlp") == 0
    reasons = {why for _, cls, why in report.left_alone if cls == "LlamaMLP"}
    assert len(reasons) == 1 and "ReLU" in reasons.pop()
    assert "forward" not in model.model.layers[0].mlp.__dict__


def test_mlp_falls_back_when_the_activation_changes_or_has_hooks():
    model = _llama()
    torch_wsl.optimize(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with _Ops() as seen:
        mlp(x)
    assert "torch_wsl::silu_mul" in seen.names
    # A forward hook on the activation is called: the class forward runs.
    calls = []
    handle = mlp.act_fn.register_forward_hook(lambda *a: calls.append(1))
    with _Ops() as seen:
        torch.testing.assert_close(mlp(x), class_forward(mlp)(x), rtol=0, atol=0)
    handle.remove()
    assert calls and "torch_wsl::silu_mul" not in seen.names
    # An activation swapped after optimize() is honored.
    mlp.act_fn = nn.Tanh()
    torch.testing.assert_close(mlp(x), mlp.down_proj(torch.tanh(mlp.gate_proj(x)) * mlp.up_proj(x)), rtol=0, atol=0)


def test_mlp_falls_back_when_the_projections_disagree():
    """gate and up in different dtypes (here a hook rounds up_proj's output to bfloat16, as a
    quantized or half-cast projection would): the plain product, as the class computes it."""
    model = _llama()
    torch_wsl.optimize(model)
    mlp = model.model.layers[0].mlp
    mlp.up_proj.register_forward_hook(lambda m, args, out: out.bfloat16())
    x = torch.randn(2, 5, 32)
    with _Ops() as seen:
        got = mlp(x)
    assert "torch_wsl::silu_mul" not in seen.names
    torch.testing.assert_close(got, class_forward(mlp)(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ RoPE


def _dispatch():
    return modeling_llama.LlamaAttention.forward, rope_rules.fused_forward(modeling_llama.LlamaAttention.forward)


def test_attention_clone_is_per_instance_and_rebuilds_the_decorators():
    original, clone = _dispatch()
    assert isinstance(clone, types.FunctionType) and clone is not original
    # The same code, decorators included: deprecate_kwarg's wrapper around the inner forward.
    assert clone.__code__ is original.__code__
    assert clone.__wrapped__.__code__ is original.__wrapped__.__code__
    inner = clone.__wrapped__
    assert isinstance(inner.__globals__["apply_rotary_pos_emb"], rope_rules._Dispatch)
    # Nothing global changed: the modeling module still has transformers' function.
    assert modeling_llama.apply_rotary_pos_emb is inner.__globals__["apply_rotary_pos_emb"].original
    assert modeling_llama.LlamaAttention.forward is original
    plain, patched = _llama(), _llama()
    torch_wsl.optimize(patched)
    with _Ops() as seen:
        plain(_ids())
    assert not any(n.startswith("torch_wsl::") for n in seen.names)


def test_attention_clone_keeps_the_deprecated_kwarg():
    """deprecate_kwarg("past_key_values" -> "cache") still works through the rebuilt wrapper."""
    model = _llama()
    torch_wsl.optimize(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 6, 32)
    pos = model.model.rotary_emb(x, torch.arange(6)[None].expand(2, -1))
    want = class_forward(attn)(x, pos, None, past_key_values=None)[0]
    with _Ops() as seen:
        got = attn(x, pos, None, past_key_values=None)[0]
    assert "torch_wsl::apply_rotary_pos_emb" in seen.names
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dispatch_fuses_only_what_the_kernel_computes_as_transformers_does():
    dispatch = rope_rules.fused_forward(modeling_llama.LlamaAttention.forward).__wrapped__.__globals__[
        "apply_rotary_pos_emb"]
    original = modeling_llama.apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 4, 8, generator=g).transpose(1, 2)  # the projections' view
    k = torch.randn(2, 6, 2, 8, generator=g).transpose(1, 2)
    cos = torch.randn(1, 6, 8, generator=g)
    sin = torch.randn(1, 6, 8, generator=g)
    cases = {
        "fused": ((q, k, cos, sin), {}, True),
        "fused, unsqueeze_dim by keyword": ((q.transpose(1, 2), k.transpose(1, 2), cos, sin), {"unsqueeze_dim": 2},
                                            True),
        "fused, unsqueeze_dim positional": ((q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2), {}, True),
        "tables in float32, q in bfloat16 (autocast)": ((q.bfloat16(), k.bfloat16(), cos, sin), {}, False),
        "tables that require grad": ((q, k, cos.clone().requires_grad_(), sin), {}, False),
        "partial tables, Llama's function has no partial rotary": ((q, k, cos[..., :4], sin[..., :4]), {}, False),
    }
    for name, (args, kwargs, fused) in cases.items():
        with _Ops() as seen:
            try:
                got = dispatch(*args, **kwargs)
            except RuntimeError as e:  # transformers' own error for what it cannot compute either
                with pytest.raises(RuntimeError):
                    original(*args, **kwargs)
                assert not fused, (name, e)
                continue
        assert ("torch_wsl::apply_rotary_pos_emb" in seen.names) == fused, name
        want = original(*args, **kwargs)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _fake_modeling(name: str, source: str):
    """A module named like a modeling file, with an attention class calling its apply_rotary_pos_emb."""
    mod = types.ModuleType(name)
    mod.__dict__["torch"] = torch
    exec(source + """

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Attention(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)
""", mod.__dict__)
    sys.modules[name] = mod
    return mod


@pytest.mark.parametrize("body,accepted", [
    ("""
def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
""", True),  # transformers 4.4x: position_ids accepted and unused
    ("""
def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    cos, sin = cos[position_ids].unsqueeze(unsqueeze_dim), sin[position_ids].unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
""", False),  # older: the tables gathered by position_ids
    ("""
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    def every_two(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return q * cos + every_two(q) * sin, k * cos + every_two(k) * sin
""", False),  # another pair layout
    ("""
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, scale=1.0):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
""", False),  # a signature torch_wsl does not know
], ids=["position_ids-unused", "position_ids-gather", "interleaved", "extra-arg"])
def test_the_probe_accepts_only_transformers_semantics(body, accepted):
    name = f"torch_wsl_test_fake_modeling_{abs(hash(body))}"
    mod = _fake_modeling(name, body)
    try:
        clone = rope_rules.fused_forward(mod.Attention.forward)
        assert isinstance(clone, types.FunctionType) == accepted, clone
        if accepted:
            g = torch.Generator().manual_seed(1)
            q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
            cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
            with _Ops() as seen:
                got = clone(mod.Attention(), q, k, cos, sin)
            assert "torch_wsl::apply_rotary_pos_emb" in seen.names
            for a, b in zip(got, mod.Attention()(q, k, cos, sin)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        del sys.modules[name]


def test_a_replaced_global_is_left_alone():
    """Another library rebound the modeling file's apply_rotary_pos_emb: its function stays."""
    mod = _fake_modeling("torch_wsl_test_fake_modeling_rebound", """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
""")
    try:
        mod.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)
        assert "another library" in rope_rules.fused_forward(mod.Attention.forward)
    finally:
        del sys.modules["torch_wsl_test_fake_modeling_rebound"]


# ------------------------------------------------------------------------------------------ integrations


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_peft_lora_wrapped_projections():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"],
                          lora_dropout=0.0, init_lora_weights=False)
    plain = peft.get_peft_model(_llama(), cfg)
    patched = copy.deepcopy(plain)
    report = torch_wsl.optimize(patched)
    assert report.count("mlp", "LlamaMLP") == 2 and report.count("rope", "LlamaAttention") == 2
    ids = _ids()
    with _Ops() as seen:
        loss, grads = _train_step(patched, ids)
    assert {"torch_wsl::silu_mul", "torch_wsl::apply_rotary_pos_emb"} <= seen.names
    want_loss, want_grads = _train_step(plain, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(want_grads) and any("lora" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_gradient_checkpointing():
    plain = _llama()
    patched = copy.deepcopy(plain)
    torch_wsl.optimize(patched)
    for m in (plain, patched):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids = _ids()
    loss, grads = _train_step(patched, ids)
    want_loss, want_grads = _train_step(plain, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_compile_fullgraph_traces_the_patched_attention_and_mlp():
    """Phi-3 (partial rotary, packed MLP) after optimize(), under torch.compile(fullgraph=True):
    one graph holding the fused operators, the same loss and gradients as eager."""
    from torch._dynamo.backends.debugging import aot_eager

    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, partial_rotary_factor=0.5, use_cache=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    eager = copy.deepcopy(model)
    torch_wsl.optimize(model)
    torch_wsl.optimize(eager)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    ids = _ids()
    loss, grads = _train_step(compiled, ids)
    assert len(graphs) == 1
    for op in ("apply_rotary_pos_emb", "silu_mul_packed", "rms_norm"):
        assert f"torch_wsl.{op}" in graphs[0], op
    want_loss, want_grads = _train_step(eager, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-5, atol=1e-5, msg=n)
    torch._dynamo.reset()
