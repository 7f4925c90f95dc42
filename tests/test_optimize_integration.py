"""torch_wsl.optimize() with the rest of a training stack: torch.compile(fullgraph=True), PEFT LoRA
(either order), gradient checkpointing, and a Hugging Face Trainer job. Whatever rules are
registered run (every optimize() switch on); each test compares the loss trajectory with the
unpatched model's."""

from __future__ import annotations

import copy

import pytest
import torch

import torch_wsl
from causal_lm_fixtures import tiny_causal_lm

pytest.importorskip("transformers")

STEPS = 3


def _batches(vocab=128, n=STEPS, shape=(2, 12)):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, shape, generator=gen) for _ in range(n)]


def _train(model, forward=None, steps=STEPS, optimizer=torch.optim.AdamW, **fwd_kwargs):
    """Loss per step of AdamW (lr 1e-2) on fixed batches; ``forward`` defaults to ``model``."""
    forward = model if forward is None else forward
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, lr=1e-2)
    losses = []
    for ids in _batches(n=steps):
        opt.zero_grad(set_to_none=True)
        out = forward(input_ids=ids, labels=ids, **fwd_kwargs)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def _assert_trajectory(losses, expected, rtol=1e-4):
    assert len(losses) == len(expected)
    for step, (a, b) in enumerate(zip(losses, expected)):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: {a} vs {b} (all: {losses} vs {expected})"


# ----------------------------------------------------------------------------- torch.compile
# backend aot_eager: it traces the whole step through dynamo and AOTAutograd with torch_wsl's fake
# kernels, as inductor does; inductor's own code generation took 78 s for this model with a cold
# cache on this 2-core machine (16 s warm), too slow for every test run.
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compile_fullgraph_after_optimize_trains(family):
    torch._dynamo.reset()
    eager = tiny_causal_lm(family).train()
    report = torch_wsl.optimize(eager)
    assert report.count("loss") == 1
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    ids = _batches()[0]
    assert compiled(input_ids=ids, labels=ids).logits is None
    compiled_model.zero_grad(set_to_none=True)
    losses = _train(compiled_model, compiled)
    _assert_trajectory(losses, _train(eager))
    ref = tiny_causal_lm(family).train()  # and the optimized eager model trains as the unpatched one
    _assert_trajectory(losses, _train(ref))
    # eval without labels through the same compiled module: the class's forward (the fallback traces too)
    compiled_model.eval(), eager.eval()
    with torch.no_grad():
        got, expected = compiled(input_ids=ids), eager(input_ids=ids)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PEFT LoRA
def _lora(model, seed, targets=("q_proj", "v_proj", "gate_proj")):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("order", ["peft_then_optimize", "optimize_then_peft"])
def test_peft_lora_trains_like_unpatched(order):
    ref = _lora(tiny_causal_lm("llama").train(), seed=5)
    if order == "peft_then_optimize":
        model = copy.deepcopy(ref)
        report = torch_wsl.optimize(model)
    else:
        base = tiny_causal_lm("llama").train()
        report = torch_wsl.optimize(base)
        model = _lora(base, seed=5)
    assert report.count("loss", "LlamaForCausalLM") == 1
    # LoRA's weights are the ones training (init_lora_weights=False: B is not zero, so they matter)
    assert sum(p.requires_grad for p in model.parameters()) == sum(p.requires_grad for p in ref.parameters()) > 0
    out = model(input_ids=_batches()[0], labels=_batches()[0])
    assert out.logits is None
    _assert_trajectory(_train(model), _train(ref))


def test_peft_lora_on_lm_head_falls_back():
    """LoRA on lm_head (after optimize) makes it a LoRA layer: the class's forward runs, logits included."""
    base = tiny_causal_lm("llama").train()
    ref = _lora(copy.deepcopy(base), seed=6, targets=("q_proj", "lm_head"))
    torch_wsl.optimize(base)
    model = _lora(base, seed=6, targets=("q_proj", "lm_head"))
    ids = _batches()[0]
    assert model(input_ids=ids, labels=ids).logits is not None
    _assert_trajectory(_train(model), _train(ref))


# ----------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing():
    ref = tiny_causal_lm("llama", layers=2).train()
    model = copy.deepcopy(ref)
    torch_wsl.optimize(model)
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.config.use_cache = False
    assert model.model.gradient_checkpointing
    _assert_trajectory(_train(model), _train(ref))


# ----------------------------------------------------------------------------- Hugging Face Trainer
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=6, seq=12, vocab=128):
        gen = torch.Generator().manual_seed(4)
        self.rows = [torch.randint(0, vocab, (seq,), generator=gen) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        # an extra column the model does not take: Trainer drops it by reading forward's signature
        return {"input_ids": self.rows[i], "labels": self.rows[i], "attention_mask": torch.ones_like(self.rows[i]),
                "source": "synthetic"}


def _trainer_run(tmp_path, model, optimizer_cls):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    opt = optimizer_cls(model.parameters(), lr=1e-2, weight_decay=0.0)
    seen = set()

    def collate(rows):
        seen.update(rows[0])
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), data_collator=collate,
                                   optimizers=(opt, None))
    logits = []
    handle = model.register_forward_hook(lambda m, args, out: logits.append(out.logits is None))
    result = trainer.train()
    handle.remove()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Trainer kept the columns forward's signature names (and dropped the one it does not)
    assert seen == {"input_ids", "labels", "attention_mask"}
    return result, losses, logits


def test_trainer_one_line(tmp_path):
    ref = tiny_causal_lm("llama").train()
    model = copy.deepcopy(ref)
    torch_wsl.optimize(model)  # the one line, before trainer.train()
    result, losses, no_logits = _trainer_run(tmp_path / "wsl", model, torch_wsl.optim.AdamW)
    ref_result, ref_losses, ref_no_logits = _trainer_run(tmp_path / "ref", ref, torch.optim.AdamW)
    assert no_logits == [True] * 3 and ref_no_logits == [False] * 3  # the fused loss ran in every step
    assert result.global_step == ref_result.global_step == 3
    assert len(losses) == 3
    # logged losses are rounded to 4 significant digits by Trainer's logging
    _assert_trajectory(losses, ref_losses, rtol=1e-3)
    assert abs(result.training_loss - ref_result.training_loss) <= 1e-4 * abs(ref_result.training_loss)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
