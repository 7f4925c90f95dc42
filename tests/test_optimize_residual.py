"""The residual fusion (torch_wsl/patching/residual.py): each layer structure of the known families,
patched, against its unpatched deepcopy: layer outputs, logits, loss and every parameter's gradient,
in eval, in train mode with dropout, under gradient checkpointing, and fewer dispatched ops."""

from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import torch_wsl  # noqa: E402
from torch_wsl.patching import _core  # noqa: E402
from torch_wsl.patching.residual import LayerParams  # noqa: E402

from benchmarks.harness import count_dispatched_ops  # noqa: E402
from conftest import DEVICES  # noqa: E402

VOCAB, SEQ, BATCH = 128, 12, 2
_LM = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def _config(family: str, dropout: float = 0.0):
    t = transformers
    if family == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(**_LM)
    if family == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(**_LM, sliding_window=None)
    if family == "qwen2":
        return t.Qwen2ForCausalLM, t.Qwen2Config(**_LM)
    if family == "qwen3":
        return t.Qwen3ForCausalLM, t.Qwen3Config(**_LM, head_dim=8)
    if family == "gemma":
        return t.GemmaForCausalLM, t.GemmaConfig(**_LM, head_dim=8)
    if family == "phi3":
        return t.Phi3ForCausalLM, t.Phi3Config(**_LM, resid_pdrop=dropout, embd_pdrop=0.0, attention_dropout=0.0)
    if family == "gemma2":
        return t.Gemma2ForCausalLM, t.Gemma2Config(**_LM, head_dim=8, query_pre_attn_scalar=8, sliding_window=8)
    if family == "gemma3":
        return t.Gemma3ForCausalLM, t.Gemma3TextConfig(**_LM, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                                       sliding_window_pattern=2)
    if family in ("gpt2", "gpt2_cross"):
        return t.GPT2LMHeadModel, t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                resid_pdrop=dropout, embd_pdrop=0.0, attn_pdrop=0.0,
                                                add_cross_attention=family == "gpt2_cross")
    bert = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    if family == "bert":
        return t.BertForMaskedLM, t.BertConfig(**bert)
    if family == "roberta":
        return t.RobertaForMaskedLM, t.RobertaConfig(**bert, pad_token_id=1)
    raise KeyError(family)


# family -> (patched class, how many in the model)
EXPECTED = {
    "llama": {"LlamaDecoderLayer": 2},
    "mistral": {"MistralDecoderLayer": 2},
    "qwen2": {"Qwen2DecoderLayer": 2},
    "qwen3": {"Qwen3DecoderLayer": 2},
    "gemma": {"GemmaDecoderLayer": 2},
    "phi3": {"Phi3DecoderLayer": 2},
    "gemma2": {"Gemma2DecoderLayer": 2},
    "gemma3": {"Gemma3DecoderLayer": 2},
    "gpt2": {"GPT2Block": 2},
    "gpt2_cross": {"GPT2Block": 2},
    "bert": {"BertSelfOutput": 2, "BertOutput": 2},
    "roberta": {"RobertaSelfOutput": 2, "RobertaOutput": 2},
}
FAMILIES = list(EXPECTED)
# The norm each patched class runs inside add_norm: called as a module only where the fusion fell back.
FUSED_NORM = {"Phi3DecoderLayer": "post_attention_layernorm", "Gemma2DecoderLayer": "pre_feedforward_layernorm",
              "Gemma3DecoderLayer": "pre_feedforward_layernorm", "GPT2Block": "ln_2", "BertSelfOutput": "LayerNorm",
              "BertOutput": "LayerNorm", "RobertaSelfOutput": "LayerNorm", "RobertaOutput": "LayerNorm"}
ENCODER_LEN = 5


def _randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Norm weights (and biases) far from their init, so a wrong weight, offset or order shows."""
    with torch.no_grad():
        for module in model.modules():
            name = type(module).__name__
            if not ("Norm" in name or isinstance(module, nn.LayerNorm)):
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                centre = 0.0 if name.startswith("Gemma") else 1.0  # Gemma's weight is an offset from 1
                weight.copy_(centre + 0.5 * torch.randn(weight.shape, generator=gen))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.3 * torch.randn(bias.shape, generator=gen))


def make(family: str, dtype=torch.float32, device="cpu", dropout: float = 0.0):
    cls, config = _config(family, dropout)
    torch.manual_seed(0)
    model = cls(config)
    _randomize_norms(model, torch.Generator().manual_seed(1))
    return model.to(device=device, dtype=dtype).eval()


def batch(family: str, device="cpu", dtype=torch.float32, cache: bool = True) -> dict:
    """A batch; ``cache=False``: no KV cache, so a layer's captured call can be replayed."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen).to(device)
    out = {"input_ids": ids, "labels": ids}
    if not cache and family not in ("bert", "roberta"):
        out["use_cache"] = False
    if family == "gpt2_cross":
        out["encoder_hidden_states"] = torch.randn(BATCH, ENCODER_LEN, 32, generator=gen).to(device, dtype)
    return out


def patched_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if _core.is_patched(m) and m.__dict__[_core._PATCH_ATTR] == "residual"]


def count_unfused_norm_calls(model: nn.Module) -> list:
    """A list that grows by one each time a fused norm (FUSED_NORM) runs as a module, i.e. unfused."""
    calls = []
    for m in model.modules():
        name = type(m).__name__
        if name in _ALL_CLASSES:
            norm = getattr(m, FUSED_NORM.get(name, "post_attention_layernorm"))
            norm.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def optimize(model: nn.Module, norms: bool = False):
    return torch_wsl.optimize(model, norms=norms, residual=True, mlp=False, rope=False, loss=False)


def run(model: nn.Module, inputs: dict, backward: bool = True):
    """Loss, logits, every residual-patched class's layer outputs (in order), and parameter gradients."""
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone()))
             for m in model.modules() if type(m).__name__ in _ALL_CLASSES]
    try:
        model.zero_grad(set_to_none=True)
        result = model(**inputs)
        if backward:
            result.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result.loss.detach(), result.logits.detach(), outputs, grads


_ALL_CLASSES = {c for per in EXPECTED.values() for c in per}


def assert_close_runs(got, want, **tol):
    (loss, logits, layers, grads), (loss0, logits0, layers0, grads0) = got, want
    assert len(layers) == len(layers0) > 0
    for i, (a, b) in enumerate(zip(layers, layers0)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"layer output {i}: {m}")
    torch.testing.assert_close(logits, logits0, **tol)
    torch.testing.assert_close(loss, loss0, **tol)
    assert grads.keys() == grads0.keys() and len(grads) > 0
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], **tol, msg=lambda m: f"grad of {name}: {m}")


FP32 = {"atol": 2e-5, "rtol": 2e-5}


# ------------------------------------------------------------------------- report, restore


@pytest.mark.parametrize("family", FAMILIES)
def test_report_counts_and_restore(family):
    model = make(family)
    keys = list(model.state_dict())
    report = optimize(model)
    assert report.replaced.get("residual") == EXPECTED[family], str(report)
    assert not [r for r in report.left_alone if r[1] in _ALL_CLASSES], str(report)
    assert len(patched_modules(model)) == sum(EXPECTED[family].values())
    assert list(model.state_dict()) == keys
    again = optimize(model)  # idempotent
    assert again.replaced["residual"] == EXPECTED[family] and again.already == sum(EXPECTED[family].values())
    assert torch_wsl.restore(model) == sum(EXPECTED[family].values())
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert m.forward.__func__ is type(m).forward
    assert list(model.state_dict()) == keys


# ------------------------------------------------------------------------- equality with the unpatched model


@pytest.mark.parametrize("norms", [False, True], ids=["residual", "residual+norms"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_equal(device, family, norms):
    ref = make(family, device=device)
    model = copy.deepcopy(ref)
    report = optimize(model, norms=norms)
    assert report.replaced["residual"] == EXPECTED[family]
    assert (report.count("norms") > 0) == norms
    inputs = batch(family, device)
    unfused, unfused0 = count_unfused_norm_calls(model), count_unfused_norm_calls(ref)
    assert_close_runs(run(model, inputs), run(ref, inputs), **FP32)
    assert unfused0 and not unfused, "the patched layers fell back to the unfused add and norm"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 units in the last place (same-sign values; 0 where bit-equal)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return torch.where(a == b, 0, (ia - ib).abs())


def _module_calls(model: nn.Module) -> dict:
    """Each residual-class module's path -> the (args, kwargs) of its first call in the next forward."""
    calls, handles = {}, []
    for path, m in model.named_modules():
        if type(m).__name__ in _ALL_CLASSES:
            handles.append(m.register_forward_pre_hook(
                lambda _m, a, k, path=path: calls.setdefault(path, (a, k)) and None, with_kwargs=True))
    return calls, handles


@pytest.mark.parametrize("norms", [False, True], ids=["residual", "residual+norms"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16(family, norms):
    """bf16: the fused add rounds the sum to bf16 as ``residual + x`` does and normalizes that rounded
    sum, so each patched layer, fed the reference's inputs, gives its output bit-equal or within 1 ulp
    (the norm kernel's float32 reduction order may round a last bit differently). End to end such a bit
    can grow through later layers: the model's outputs agree to bf16 accuracy. Gradients: the fused
    backward works in float32 where the class's chain of bf16 ops rounds at each op, so they agree to bf16
    accuracy too (relative to each gradient's largest entry)."""
    ref = make(family, dtype=torch.bfloat16)
    model = copy.deepcopy(ref)
    optimize(model, norms=norms)
    inputs = batch(family, dtype=torch.bfloat16, cache=False)
    calls, handles = _module_calls(ref)
    want = run(ref, inputs)
    for h in handles:
        h.remove()
    unfused = count_unfused_norm_calls(model)
    got = run(model, inputs)
    assert not unfused
    modules = dict(model.named_modules())
    assert calls.keys() == {p for p, m in modules.items() if _core.is_patched(m) and type(m).__name__ in _ALL_CLASSES}
    with torch.no_grad():
        for path, (args, kwargs) in calls.items():
            assert _ulps(modules[path](*args, **kwargs), dict(ref.named_modules())[path](*args, **kwargs)).max() <= 1, \
                path
    (loss, logits, layers, grads), (loss0, logits0, layers0, grads0) = got, want
    for i, (a, b) in enumerate(zip(layers, layers0)):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=lambda m: f"layer output {i}: {m}")
    torch.testing.assert_close(logits, logits0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, loss0, atol=0, rtol=1e-2)
    assert grads.keys() == grads0.keys()
    for name, g0 in grads0.items():
        scale = g0.float().abs().max().item() + 1e-6
        err = (grads[name].float() - g0.float()).abs().max().item()
        assert err <= 0.05 * scale, f"grad of {name}: {err} vs max {scale}"


# ------------------------------------------------------------------------- train mode, dropout


@pytest.mark.parametrize("family", ["phi3", "bert", "roberta", "gpt2"])
def test_train_dropout_same_rng_order(family):
    """Dropout > 0 in train mode: the patched forward draws the same masks in the same order (the
    fused add draws none), so a fixed seed gives the same results."""
    ref = make(family, dropout=0.3).train()
    model = copy.deepcopy(ref)
    optimize(model, norms=True)
    inputs = batch(family)
    unfused = count_unfused_norm_calls(model)
    torch.manual_seed(123)
    got = run(model, inputs)
    assert not unfused
    torch.manual_seed(123)
    want = run(ref, inputs)
    assert_close_runs(got, want, **FP32)
    torch.manual_seed(124)  # and the dropout is really on: another seed gives another loss
    assert not torch.allclose(run(ref, inputs)[0], want[0])


# ------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2", "gpt2", "bert"])
def test_gradient_checkpointing(family, reentrant):
    """Checkpointing on: equal losses and gradients, and the layers really are recomputed in the
    backward (transformers 5 checkpoints inside the class forward, which the patch replaces)."""
    ref = make(family).train()
    model = copy.deepcopy(ref)
    optimize(model)
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = {"ref": 0, "model": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    mlps = {key: [m for m in net.modules() if type(m).__name__.endswith(("MLP", "Intermediate"))]
            for key, net in (("ref", ref), ("model", model))}
    for key, modules in mlps.items():
        for m in modules:
            m.register_forward_pre_hook(counter(key))  # a post hook may not run: the recompute stops early
    inputs = batch(family)
    unfused = count_unfused_norm_calls(model)
    assert_close_runs(run(model, inputs), run(ref, inputs), **FP32)
    assert not unfused
    n_layers = len(mlps["ref"])
    assert calls["ref"] == 2 * n_layers, "reference is not recomputed: the test does not test checkpointing"
    assert calls["model"] == calls["ref"], "the patched layers are not checkpointed"


# ------------------------------------------------------------------------- dispatched ops


def _layer_call(model: nn.Module, inputs: dict, cls_name: str):
    """The (args, kwargs) the model passes to its first ``cls_name`` module."""
    layer = next(m for m in model.modules() if type(m).__name__ == cls_name)
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, a, k: seen.append((a, k)) if not seen else None,
                                             with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return layer, seen[0]


def _fwd_bwd_ops(layer: nn.Module, args: tuple, kwargs: dict) -> tuple:
    args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)
    kwargs = {k: v.detach().clone().requires_grad_() if k == "input_tensor" else v for k, v in kwargs.items()}
    def step():
        out = layer(*args, **kwargs)
        out.sum().backward()
        outs.append(out.detach())

    outs = []
    count, _ = count_dispatched_ops(step)  # the benchmarks' count: ops that reach a kernel, views excluded
    return count, outs[0]


OP_COUNTS: dict = {}


@pytest.mark.parametrize("norms", [False, True], ids=["residual", "residual+norms"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2", "gpt2", "bert"])
def test_fused_layer_dispatches_fewer_ops(family, norms):
    ref = make(family)
    model = copy.deepcopy(ref)
    inputs = batch(family, cache=False)
    if norms:  # compare against norms-only, so the count isolates the residual fusion
        torch_wsl.optimize(ref, norms=True, residual=False, mlp=False, rope=False, loss=False)
    optimize(model, norms=norms)
    for cls_name in EXPECTED[family]:
        layer0, (args, kwargs) = _layer_call(ref, inputs, cls_name)
        layer = next(m for m in model.modules() if type(m).__name__ == cls_name)
        assert _core.is_patched(layer) and not _core.is_patched(layer0)
        before, out0 = _fwd_bwd_ops(layer0, args, kwargs)
        after, out = _fwd_bwd_ops(layer, args, kwargs)
        torch.testing.assert_close(out, out0, **FP32)
        OP_COUNTS[(family, cls_name, norms)] = (before, after)
        print(f"{family} {cls_name} norms={norms}: {before} -> {after} ops (fwd+bwd)")
        assert after < before


# ------------------------------------------------------------------------- binding, fallbacks, other structures


def _llama_layer_and_call():
    model = make("llama")
    return model, _layer_call(model, batch("llama", cache=False), "LlamaDecoderLayer")


def test_positional_arguments_bound_by_signature():
    """Every argument given positionally (as GradientCheckpointingLayer may pass them) reaches the attention."""
    ref, (layer0, (args, kwargs)) = _llama_layer_and_call()
    model = copy.deepcopy(ref)
    optimize(model)
    layer = model.model.layers[0]
    names = LayerParams.of(type(layer).forward).names
    assert names[:6] == ("hidden_states", "attention_mask", "position_ids", "cache", "use_cache",
                         "position_embeddings")
    call = {**dict(zip(names, args)), **kwargs}
    positional = tuple(call.pop(n) for n in names)
    seen, unfused = [], []
    layer.self_attn.register_forward_pre_hook(lambda _m, a, k: seen.append(k), with_kwargs=True)
    layer.post_attention_layernorm.register_forward_hook(lambda *_: unfused.append(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(*positional, **call), layer0(*positional, **call), **FP32)
    assert not unfused, "fell back to the class forward"
    assert seen and seen[0]["position_embeddings"] is positional[names.index("position_embeddings")]


def test_unbindable_and_deprecated_calls_use_the_class_forward():
    ref, (layer0, (args, kwargs)) = _llama_layer_and_call()
    model = copy.deepcopy(ref)
    optimize(model)
    layer = model.model.layers[0]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    kwargs = {k: v for k, v in kwargs.items() if k != "cache"}
    ran = []
    layer.post_attention_layernorm.register_forward_hook(lambda *_: ran.append(1))  # unfused path only
    with torch.no_grad(), pytest.warns(Warning):
        out = layer(hidden, past_key_values=None, **kwargs)  # renamed by the class's @deprecate_kwarg
    assert ran and torch.equal(out, layer0(hidden, **kwargs))
    with pytest.raises(TypeError):  # the class forward's own error
        layer(hidden, hidden, hidden, hidden, hidden, hidden, hidden, hidden)
    with pytest.raises(TypeError):
        layer(**kwargs)  # no hidden_states


def test_layer_on_a_device_without_kernels_adds_unfused(monkeypatch):
    """add_norm's own fallback: where it cannot fuse, the add and the norm module's forward, same results."""
    ref, (layer0, (args, kwargs)) = _llama_layer_and_call()
    model = copy.deepcopy(ref)
    optimize(model)
    layer = model.model.layers[0]
    from torch_wsl.patching import norms as norms_mod
    monkeypatch.setattr(norms_mod, "on_kernel_device", lambda *t: False)
    ran = []
    layer.post_attention_layernorm.register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(*args, **kwargs), layer0(*args, **kwargs), atol=0, rtol=0)
    assert ran


def _foreign_layer(forward) -> nn.Module:
    """A module whose class has a registered name but another forward (another transformers version)."""
    cls = type("LlamaDecoderLayer", (nn.Module,), {"forward": forward})
    cls.__module__ = "transformers.models.llama.modeling_llama"
    layer = cls()
    for name in ("self_attn", "mlp"):
        setattr(layer, name, nn.Identity())
    layer.input_layernorm = nn.LayerNorm(8)
    layer.post_attention_layernorm = nn.LayerNorm(8)
    return layer


def test_other_structures_are_left_alone_with_a_reason():
    def older(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
              output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        return (hidden_states,)

    holder = nn.Module()
    holder.layer = _foreign_layer(older)
    report = optimize(holder)
    assert not patched_modules(holder)
    (path, cls, why), = [r for r in report.left_alone if r[1] == "LlamaDecoderLayer"]
    assert path == "layer" and "forward takes" in why and "output_attentions" in why

    def same(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
             position_embeddings=None, **kwargs):
        return hidden_states

    holder.layer = _foreign_layer(same)
    del holder.layer.post_attention_layernorm
    (_, _, why), = [r for r in optimize(holder).left_alone if r[1] == "LlamaDecoderLayer"]
    assert "post_attention_layernorm" in why

    holder.layer = _foreign_layer(same)
    holder.layer.post_attention_layernorm = nn.GroupNorm(1, 8)
    (_, _, why), = [r for r in optimize(holder).left_alone if r[1] == "LlamaDecoderLayer"]
    assert "post_attention_layernorm" in why and "GroupNorm" in why

    holder.layer = _foreign_layer(same)  # the structure it knows: patched
    assert optimize(holder).replaced["residual"] == {"LlamaDecoderLayer": 1}


def test_layer_params_binding():
    def f(self, a, b=2, c=None, **kw):
        pass

    p = LayerParams.of(f)
    assert p.shape == ("a", "b", "c", "**")
    assert p.bind((1,), {}) == {"a": 1, "b": 2, "c": None}
    assert p.bind((1, 5), {"x": 3}) == {"a": 1, "b": 5, "c": None, "x": 3}
    assert p.bind((1,), {"a": 1}) is None  # given twice
    assert p.bind((), {"b": 1}) is None  # a missing
    assert p.bind((1, 2, 3, 4), {}) is None  # too many
    assert isinstance(LayerParams.of(lambda self, *a: None), str)
    assert isinstance(LayerParams.of(lambda self, a, *, b: None), str)
    q = LayerParams.of(lambda self, a, b: None)
    assert q.bind((1,), {"z": 1}) is None  # no **kwargs: unknown keyword



@pytest.mark.parametrize("family", ["llama", "gpt2"])  # bert's two-line forward was checked by hand
def test_compiles_fullgraph(family):
    """The patched forwards trace without graph breaks (the binding is plain Python, no inspect at run
    time). aot_eager keeps the test quick; inductor was checked by hand (same results)."""
    ref = make(family)
    model = copy.deepcopy(ref)
    optimize(model, norms=True)
    inputs = batch(family, cache=False)
    inputs.pop("labels")  # transformers' loss logs a warning once, a graph break of its own
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).logits
    out.sum().backward()
    out0 = ref(**inputs).logits
    out0.sum().backward()
    torch.testing.assert_close(out, out0, **FP32)
    for (name, p), p0 in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p0.grad, **FP32, msg=lambda m: f"grad of {name}: {m}")


def test_checkpointing_mechanism_is_recognized():
    """transformers 5.24 checkpoints inside the class forward: recognized, so the patch checkpoints itself."""
    from torch_wsl.patching.residual import _checkpointing
    for family in ("llama", "gemma2", "gpt2"):
        layer = next(m for m in make(family).modules() if type(m).__name__ in _ALL_CLASSES)
        assert _checkpointing(type(layer)) == "forward"
    assert _checkpointing(transformers.models.bert.modeling_bert.BertOutput) is None

    class Flagged(nn.Module):
        gradient_checkpointing = False
    assert _checkpointing(Flagged) == "unknown"
