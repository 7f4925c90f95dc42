"""The causal-LM loss rule: in training with labels, transformers' ``XForCausalLM`` runs its LM head
and loss as torch_wsl's ``linear_cross_entropy`` on the hidden states, so the ``[tokens, vocab]``
logits are never held (the output's ``logits`` is ``None`` then).

Why a forward of our own and not transformers' extension point: a model's loss hook
(``model.loss_function``, ``config.loss_type``, ``LOSS_MAPPING``) is called with the logits the
LM head already produced, so it cannot avoid materializing them, which is the whole point here.

The patched forward does what the class's forward does in the case it replaces: the base model
(``getattr(self, self.base_model_prefix)``: ``self.model``, GPT-2's ``self.transformer``) called
with every argument but ``labels`` / ``logits_to_keep`` / ``return_dict`` (the family forwards
all pass them on so), ``logits_to_keep`` applied to the hidden states, and the loss of
transformers' ``ForCausalLMLoss`` (labels shifted left with ``ignore_index`` padding, or
``shift_labels`` as given; mean over non-ignored tokens, or sum / ``num_items_in_batch``), Gemma
2's / 3's ``final_logit_softcapping`` as ``softcap=``. The output is the family's output type
with the base model's other fields (cache, hidden_states, attentions, cross_attentions).

Everything else runs the class's own forward unchanged: eval mode, no grad, no labels,
``return_dict=False``, a ``logits_to_keep`` tensor, an LM head that is not a plain
``nn.Linear`` (PEFT-wrapped, hooked), a replaced loss function, a device without kernels.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..ops.cross_entropy import linear_cross_entropy
from ._core import hf_class, on_kernel_device, qualname, register

__all__ = ["causal_lm_loss"]


@dataclasses.dataclass(frozen=True)
class _Family:
    output: str  # the output class's name, looked up in the family's modeling module
    softcap: bool = False  # applies config.final_logit_softcapping to the logits


_FAMILIES = {
    hf_class("llama", "LlamaForCausalLM"): _Family("CausalLMOutputWithPast"),
    hf_class("mistral", "MistralForCausalLM"): _Family("CausalLMOutputWithPast"),
    hf_class("qwen2", "Qwen2ForCausalLM"): _Family("CausalLMOutputWithPast"),
    hf_class("qwen3", "Qwen3ForCausalLM"): _Family("CausalLMOutputWithPast"),
    hf_class("gemma", "GemmaForCausalLM"): _Family("CausalLMOutputWithPast"),
    hf_class("gemma2", "Gemma2ForCausalLM"): _Family("CausalLMOutputWithPast", softcap=True),
    hf_class("gemma3", "Gemma3ForCausalLM"): _Family("CausalLMOutputWithPast", softcap=True),
    hf_class("phi3", "Phi3ForCausalLM"): _Family("CausalLMOutputWithPast"),
    hf_class("gpt2", "GPT2LMHeadModel"): _Family("CausalLMOutputWithCrossAttentions"),
}

# The arguments the patched forward consumes itself; every other one goes to the base model.
_OWN = ("labels", "logits_to_keep", "return_dict")


def causal_lm_loss(
    hidden_states: Tensor,
    lm_head: nn.Linear,
    labels: Optional[Tensor],
    *,
    shift_labels: Optional[Tensor] = None,
    num_items_in_batch: Optional[Union[Tensor, int]] = None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
) -> Tensor:
    """transformers' ``ForCausalLMLoss(lm_head(hidden_states), labels, ...)`` (with the softcap
    applied to the logits first) through ``linear_cross_entropy``, without the logits.

    hidden_states: ``[batch, seq, hidden]``; labels: ``[batch, seq]``, shifted here (position t
    predicts label t+1, the last position is ignored) unless ``shift_labels`` (already aligned
    with the positions) is given. ``num_items_in_batch``: the loss is the sum over tokens
    divided by it (gradient accumulation across micro-batches) instead of the mean. Under
    autocast the LM head runs in the autocast dtype, as ``nn.Linear`` would. The loss is
    float32, as transformers' (for 16-bit inputs its value carries the kernel's 16-bit rounding).
    """
    if shift_labels is None:
        padded = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    weight, bias = lm_head.weight, lm_head.bias
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    target = shift_labels.reshape(-1).to(x.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(x, weight, target, bias, ignore_index=ignore_index, reduction=reduction,
                                softcap=softcap).float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _lm_head_is_plain(head: object) -> bool:
    """A bare nn.Linear whose forward is nn.Linear's: no hooks, no instance forward (PEFT's
    LoRA / modules_to_save wrappers and accelerate's hooks all fail this)."""
    return (type(head) is nn.Linear and "forward" not in head.__dict__
            and not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks
                     or head._backward_pre_hooks))


def _loss_function(module: nn.Module):
    try:
        return module.loss_function
    except Exception:  # noqa: BLE001  (a version without the property, or a broken config)
        return None


def _build(module: nn.Module):
    cls = type(module)
    family = next((f for c in cls.__mro__ if (f := _FAMILIES.get(qualname(c)))), None)
    if family is None:  # pragma: no cover  (rule_for only hands us registered classes)
        return "not a causal-LM class torch_wsl knows"
    try:
        signature = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return "its forward has no signature to read"
    params = list(signature.parameters.values())[1:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not {"labels", "logits_to_keep"} <= set(names) or not any(p.kind == p.VAR_KEYWORD for p in params):
        return "its forward takes no labels / logits_to_keep / **kwargs (a transformers version torch_wsl does not know)"
    defaults = {p.name: p.default for p in params if p.name in names and p.default is not p.empty}
    prefix = getattr(module, "base_model_prefix", None)
    base = getattr(module, prefix, None) if isinstance(prefix, str) else None
    if not isinstance(base, nn.Module):
        return f"no base model at base_model_prefix {prefix!r}"
    if not isinstance(getattr(module, "lm_head", None), nn.Linear):
        return "lm_head is not an nn.Linear"
    output_cls = getattr(sys.modules.get(cls.__module__), family.output, None)
    if output_cls is None or not dataclasses.is_dataclass(output_cls):
        return f"no output class {family.output} in {cls.__module__}"
    fields = [f.name for f in dataclasses.fields(output_cls)]
    if fields[:2] != ["loss", "logits"]:
        return f"{family.output} does not start with (loss, logits)"
    carried = fields[2:]
    # transformers' causal-LM loss, resolved as the model resolves it (its loss_function property)
    causal_lm = getattr(sys.modules.get("transformers.loss.loss_utils"), "ForCausalLMLoss", None)
    if causal_lm is None or _loss_function(module) is not causal_lm:
        return "its loss function is not transformers' ForCausalLMLoss"
    # Checked again at run time without the property (whose warning path torch.compile cannot trace):
    # a loss function set on the instance after optimize(), or another loss_type, runs the class's forward.
    own_loss = getattr(module, "_loss_function", None)
    loss_type = getattr(module, "loss_type", None)
    prefix_name = prefix
    labels_at = names.index("labels")

    def forward(self, *args, **kwargs):
        config = self.config
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)
        labels = args[labels_at] if len(args) > labels_at else kwargs.get("labels")
        head = self.lm_head
        if (labels is None or not self.training or not torch.is_grad_enabled() or not return_dict
                or len(args) > len(names) or any(n in kwargs for n in names[:len(args)])
                or not _lm_head_is_plain(head) or head.out_features != config.vocab_size
                or not on_kernel_device(head.weight, labels)
                or getattr(self, "_loss_function", None) is not own_loss
                or getattr(self, "loss_type", None) != loss_type):
            return type(self).forward(self, *args, **kwargs)
        call = dict(defaults)
        call.update(zip(names, args))
        call.update(kwargs)
        logits_to_keep = call.get("logits_to_keep", 0)
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool):
            return type(self).forward(self, *args, **kwargs)
        for name in _OWN:
            call.pop(name, None)
        outputs = getattr(self, prefix_name)(**call)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        cap = getattr(config, "final_logit_softcapping", None) if family.softcap else None
        if on_kernel_device(hidden) and hidden.device == head.weight.device and (
                hidden.dtype == head.weight.dtype or torch.is_autocast_enabled(hidden.device.type)):
            loss = causal_lm_loss(hidden, head, labels, shift_labels=call.get("shift_labels"),
                                  num_items_in_batch=call.get("num_items_in_batch"),
                                  ignore_index=call.get("ignore_index", -100), softcap=cap)
            logits = None
        else:  # the class's own head and loss, on the hidden states already computed
            logits = head(hidden)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            loss = self.loss_function(logits, labels, config.vocab_size, **{k: v for k, v in call.items()
                                                                              if k not in names})
        return output_cls(loss=loss, logits=logits, **{f: getattr(outputs, f, None) for f in carried})

    return forward  # optimize() gives it the class forward's signature (Trainer and generate() read it)


register(list(_FAMILIES), "loss", _build)
