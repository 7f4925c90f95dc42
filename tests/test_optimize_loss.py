"""The causal-LM loss rule (torch_wsl/patching/lm_loss.py): in training with labels the LM head and
loss run as linear_cross_entropy; the loss and every parameter gradient equal the unpatched
model's, ``logits`` is None; everything else is the class's own forward."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import torch_wsl
from causal_lm_fixtures import FAMILIES, tiny_causal_lm

pytest.importorskip("transformers")

ONLY_LOSS = dict(norms=False, residual=False, mlp=False, rope=False, loss=True)
CLASS_NAMES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel",
}


def _pair(family="llama", head_scale=1.0, **kw):
    """(patched, reference): the same weights; only the loss rule on the first. ``head_scale``
    multiplies the LM head's weight (random init gives logits too small for a softcap to matter)."""
    ref = tiny_causal_lm(family, **kw).train()
    with torch.no_grad():
        ref.lm_head.weight.mul_(head_scale)
    model = copy.deepcopy(ref)
    report = torch_wsl.optimize(model, **ONLY_LOSS)
    return model, ref, report


def _ids(vocab=128, shape=(2, 12), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out


def _assert_same_grads(model, ref, rtol=1e-5):
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        q = grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            scale = p.grad.abs().max().clamp_min(1e-30)
            err = ((q.grad - p.grad).abs().max() / scale).item()
            assert err <= rtol, f"{name}: gradient relative difference {err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_and_grads_equal_unpatched(family):
    model, ref, report = _pair(family)
    assert report.count("loss", CLASS_NAMES[family]) == 1
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second sequence
    out = _step(model, input_ids=ids, attention_mask=mask, labels=ids)
    expected = _step(ref, input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits is None and expected.logits is not None
    assert type(out) is type(expected)
    assert out.loss.dtype == expected.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)
    # the base model's other outputs are carried over (the cache, as the class's forward returns it)
    assert (getattr(out, "cache", None) is None) == (getattr(expected, "cache", None) is None)
    # eval: the class's forward, logits as usual
    model.eval(), ref.eval()
    with torch.no_grad():
        ev, ev_ref = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(ev.logits, ev_ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(ev.loss, ev_ref.loss, rtol=0, atol=0)
    # restore: the class's forward back, state_dict keys unchanged
    assert set(model.state_dict()) == set(ref.state_dict())
    assert torch_wsl.restore(model) >= 1
    assert "forward" not in model.__dict__
    model.train()
    assert model(input_ids=ids, labels=ids).logits is not None


def test_hidden_states_and_attentions_carried():
    model, ref, _ = _pair("llama", attn_implementation="eager")
    ids = _ids()
    out = model(input_ids=ids, labels=ids, output_hidden_states=True, output_attentions=True)
    expected = ref(input_ids=ids, labels=ids, output_hidden_states=True, output_attentions=True)
    assert out.logits is None
    assert len(out.hidden_states) == len(expected.hidden_states) and len(out.attentions) == len(expected.attentions)
    for a, b in zip(out.hidden_states + out.attentions, expected.hidden_states + expected.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_softcap_kept(family):
    model, ref, _ = _pair(family, head_scale=100.0, final_logit_softcapping=1.5)
    ids = _ids()
    out, expected = _step(model, input_ids=ids, labels=ids), _step(ref, input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)
    # the cap matters at this size (the test would notice it dropped)
    uncapped = copy.deepcopy(ref)
    uncapped.config.final_logit_softcapping = None
    assert abs(uncapped(input_ids=ids, labels=ids).loss.item() - expected.loss.item()) > 0.1


def test_padding_labels_ignored():
    model, ref, _ = _pair()
    ids = _ids()
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 7:] = -100
    out, expected = _step(model, input_ids=ids, labels=labels), _step(ref, input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)


@pytest.mark.parametrize("num_items", [7, "tensor"])
def test_num_items_in_batch(num_items):
    model, ref, _ = _pair()
    ids = _ids()
    n = torch.tensor(9) if num_items == "tensor" else num_items
    out, expected = _step(model, input_ids=ids, labels=ids, num_items_in_batch=n), \
        _step(ref, input_ids=ids, labels=ids, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)
    mean = ref(input_ids=ids, labels=ids).loss
    assert abs(out.loss.item() - mean.item()) > 1e-3  # sum / n, not the mean


def test_shift_labels_and_logits_to_keep():
    model, ref, _ = _pair()
    ids = _ids()
    shift = torch.roll(ids, -1, dims=1)
    shift[:, -1] = -100
    shift[0, 2] = -100
    kw = dict(input_ids=ids, labels=ids, shift_labels=shift)
    out, expected = _step(model, **kw), _step(ref, **kw)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)
    # logits_to_keep=k: the loss of the last k positions, against shift_labels of that length
    kw = dict(input_ids=ids, labels=ids, shift_labels=shift[:, -5:].contiguous(), logits_to_keep=5)
    out, expected = _step(model, **kw), _step(ref, **kw)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)


def test_positional_arguments():
    model, ref, _ = _pair("gpt2")
    ids = _ids()
    out, expected = model(ids, labels=ids), ref(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_embeddings_one_correct_gradient(family):
    model, ref, _ = _pair(family, tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = _ids()
    out, expected = _step(model, input_ids=ids, labels=ids), _step(ref, input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)
    assert len(list(model.parameters())) == len(list(ref.parameters()))


def test_bf16_within_reference_drift():
    """bf16 against float32 of the same weights: gradients as far from it as the unpatched bf16
    model's are. The loss value is linear_cross_entropy's bf16 scalar widened to float32, so it
    may be off by half a bf16 ulp more (transformers computes it in float32 from bf16 logits)."""
    fp32 = tiny_causal_lm("llama").train()
    ref = copy.deepcopy(fp32).bfloat16()
    model = copy.deepcopy(ref)
    torch_wsl.optimize(model, **ONLY_LOSS)
    ids = _ids()
    truth, expected, out = (_step(m, input_ids=ids, labels=ids) for m in (fp32, ref, model))
    assert out.logits is None and out.loss.dtype == torch.float32
    ref_drift = (expected.loss - truth.loss).abs().item()
    half_ulp = truth.loss.abs().item() * 2.0 ** -8
    assert (out.loss - truth.loss).abs().item() <= ref_drift + half_ulp
    truth_grads = dict(fp32.named_parameters())
    mine = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        g = truth_grads[name].grad.double()
        ref_err = (p.grad.double() - g).norm() / g.norm()
        err = (mine[name].grad.double() - g).norm() / g.norm()
        assert err <= 2 * ref_err + 1e-3, f"{name}: {err:.3g} vs the reference's {ref_err:.3g}"


def test_autocast_runs_head_in_autocast_dtype():
    model, ref, _ = _pair()
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = _step(model, input_ids=ids, labels=ids), _step(ref, input_ids=ids, labels=ids)
    assert out.logits is None
    assert abs(out.loss.item() - expected.loss.item()) <= 2e-2 * abs(expected.loss.item())
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=5e-2 * p.grad.abs().max().item(), msg=name)


def test_falls_back_to_class_forward():
    model, ref, _ = _pair()
    ids = _ids()
    expected = ref(input_ids=ids, labels=ids)
    # no labels, no grad, return_dict=False: the class's forward
    assert model(input_ids=ids).logits is not None
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).logits is not None
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, rtol=0, atol=0)
    # a hook on the LM head must run: the class's forward
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = model(input_ids=ids, labels=ids)
    handle.remove()
    assert seen and out.logits is not None
    # a loss function set after optimize(): it is used
    calls = []

    def my_loss(logits, labels, vocab_size, **kwargs):
        calls.append(vocab_size)
        return logits.float().mean()

    model.loss_function = my_loss
    out = model(input_ids=ids, labels=ids)
    assert calls == [128] and out.logits is not None
    torch.testing.assert_close(out.loss, expected.logits.float().mean())


def test_lm_head_wrapped_after_optimize_falls_back():
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.weight = inner.weight
            self.out_features = inner.out_features

        def forward(self, x):
            return self.inner(x) * 0.5

    model, ref, _ = _pair()
    model.lm_head, ref.lm_head = Wrapped(model.lm_head), Wrapped(ref.lm_head)
    ids = _ids()
    out, expected = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)


def test_signature_kept_for_introspection():
    model, ref, _ = _pair()
    assert list(inspect.signature(model.forward).parameters) == list(inspect.signature(ref.forward).parameters)
    assert model._supports_logits_to_keep()


def test_custom_loss_at_optimize_is_left_alone():
    ref = tiny_causal_lm("llama")
    ref.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    report = torch_wsl.optimize(ref, **ONLY_LOSS)
    assert report.count("loss") == 0
    assert any("ForCausalLMLoss" in why for _, _, why in report.left_alone)


def test_peak_memory_lower_than_unpatched():
    """A training step with a large vocabulary: the patched model never holds the [tokens, vocab]
    logits (nor their float32 copy and gradient), so its peak CPU allocation is far lower
    (every CPU allocation counted by torch_wsl's allocator)."""
    import torch_wsl.memory as twm

    vocab, hidden, batch, seq = 32000, 64, 4, 128
    ref = tiny_causal_lm("llama", vocab=vocab, hidden=hidden).train()
    model = copy.deepcopy(ref)
    torch_wsl.optimize(model, **ONLY_LOSS)
    ids = _ids(vocab, (batch, seq))

    def peak(m):
        twm.enable("cpu")
        try:
            alloc = twm._allocator("cpu")
            before = alloc.stats()["allocated_bytes.all.current"]
            alloc.reset_peak_stats()
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            grown = alloc.stats()["allocated_bytes.all.peak"] - before
            loss = out.loss.detach().clone()
            del out
            m.zero_grad(set_to_none=True)
        finally:
            twm.disable("cpu")
        return grown, loss

    mine, loss = peak(model)
    theirs, expected = peak(ref)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    logits_bytes = batch * seq * vocab * 4
    # the unpatched step holds at least the logits and their gradient; the patched one less than one copy of them
    assert theirs > 2 * logits_bytes
    print(f"peak: patched {mine / 2**20:.1f} MiB, unpatched {theirs / 2**20:.1f} MiB")
    assert mine < theirs - 2 * logits_bytes, f"patched peak {mine} bytes, unpatched {theirs}"
