"""Residual fusion: in the transformer layers of the known families, the residual add and the norm
that follows it run as one ``add_rms_norm`` / ``add_layer_norm`` call (``norms.add_norm``).

One forward per layer *structure*, shared by the families that have it:

- pre-norm (Llama, Mistral, Qwen2, Qwen3, Gemma; Phi-3 with its branch dropouts):
  ``h = residual + attn(...)`` then ``post_attention_layernorm(h)``;
- sandwich (Gemma 2, Gemma 3): ``residual + post_attention_layernorm(attn(...))`` then
  ``pre_feedforward_layernorm``;
- GPT-2's block: ``attn + residual`` then ``ln_cross_attn`` (with cross-attention) or ``ln_2``;
- post-norm outputs (BERT, RoBERTa ``*SelfOutput`` / ``*Output``): ``LayerNorm(dropout(dense(h)) + input_tensor)``.

Each rule knows the forward signature(s) it was written against (transformers 5.24); a layer whose
forward takes other arguments, or lacks a submodule the structure needs, is left alone with the reason.
The patched forward binds its arguments by the class forward's signature and passes every one of
them on to the attention / MLP submodules as the class does. It runs the class's own forward when
it cannot bind the call the same way (a deprecated keyword such as ``past_key_values``, a missing
argument), and where ``add_norm`` cannot fuse (device, dtypes) it adds and norms as the class does.

transformers 5.x checkpoints a ``GradientCheckpointingLayer`` inside the class's ``forward``
(a wrapper installed by ``__init_subclass__``), which an instance forward bypasses; the patched
forward of such a layer checkpoints itself under the same condition, through the layer's own
``_gradient_checkpointing_func``. Calls the class would first rewrite for checkpointing (a cache,
``use_cache=True``) run the class's forward.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Union

import torch
from torch import nn

from ._core import class_forward, hf_class, register
from .norms import NormSpec, add_norm, norm_spec

__all__ = ["LayerParams", "STRUCTURES"]

_VAR = "**"  # marks a signature that ends in **kwargs

# Keywords the class forward renames before running (transformers' @deprecate_kwarg): the class handles them.
_RENAMED = frozenset({"past_key_values"})


class LayerParams:
    """A forward's named parameters (after ``self``), bound the way Python would bind a call.

    Only plain positional-or-keyword parameters and an optional trailing ``**kwargs``; ``bind``
    returns ``None`` for a call Python would reject (the class forward then raises its own error).
    Written out rather than ``inspect.Signature.bind`` so that torch.compile traces it."""

    def __init__(self, names: tuple, defaults: dict, var_keyword: bool) -> None:
        self.names = names
        self.defaults = defaults
        self.var_keyword = var_keyword

    @classmethod
    def of(cls, fn: Callable) -> Union["LayerParams", str]:
        try:
            sig = inspect.signature(fn)  # follows functools.wraps' __wrapped__ to the written forward
        except (TypeError, ValueError) as e:
            return f"forward's signature cannot be read ({e})"
        params = list(sig.parameters.values())[1:]  # self
        var_keyword = bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD
        if var_keyword:
            params = params[:-1]
        if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            return "forward has positional-only, keyword-only or *args parameters"
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        return cls(tuple(p.name for p in params), defaults, var_keyword)

    @property
    def shape(self) -> tuple:
        return self.names + ((_VAR,) if self.var_keyword else ())

    def bind(self, args: tuple, kwargs: dict) -> Optional[dict]:
        if len(args) > len(self.names):
            return None
        bound = dict(self.defaults)
        for name, value in zip(self.names, args):
            bound[name] = value
        for name, value in kwargs.items():
            if name in self.names[: len(args)] or (not self.var_keyword and name not in self.names):
                return None
            bound[name] = value
        if any(name not in bound for name in self.names):
            return None
        return bound


def _checkpointing(cls: type) -> Optional[str]:
    """Where ``cls`` checkpoints: "forward" (transformers 5's wrapper of the class forward, which an
    instance forward bypasses), "call" (a ``GradientCheckpointingLayer.__call__`` around any forward),
    "unknown" (a ``gradient_checkpointing`` flag, mechanism not recognized), or None."""
    code = getattr(cls.forward, "__code__", None)
    if code is not None and code.co_name == "forward_with_checkpointing":
        return "forward"
    if any(base.__name__ == "GradientCheckpointingLayer" and "__call__" in vars(base) for base in cls.__mro__):
        return "call"
    return "unknown" if hasattr(cls, "gradient_checkpointing") else None


def _wrap(module: nn.Module, params: LayerParams, body: Callable) -> Callable:
    """The instance forward: binds the call, checkpoints where the class's wrapper would, and runs
    ``body(self, bound)``; anything it cannot bind the class's way goes to the class forward, and so
    does a checkpointed call where the class checkpoints in a way this module does not know."""
    checkpointing = _checkpointing(type(module))
    checkpoints = checkpointing in ("forward", "unknown")

    def run(self, *args, **kwargs):
        bound = params.bind(args, kwargs)
        if bound is None:
            return class_forward(self)(*args, **kwargs)
        return body(self, bound)

    def forward(self, *args, **kwargs):
        if _RENAMED.intersection(kwargs):
            return class_forward(self)(*args, **kwargs)
        if checkpoints and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if checkpointing == "unknown":
                return class_forward(self)(*args, **kwargs)
            # The class would first drop a cache (and use_cache) here, with a warning: let it.
            if kwargs.get("use_cache") or (not getattr(self, "_can_checkpoint_with_cache", False) and (
                    kwargs.get("cache") is not None or kwargs.get("layer_past") is not None)):
                return class_forward(self)(*args, **kwargs)
            return self._gradient_checkpointing_func(functools.partial(run, self, **kwargs), *args)
        return run(self, *args, **kwargs)

    return forward


def _check(module: nn.Module, params: LayerParams, signatures: tuple, submodules: tuple, norms: tuple) -> Optional[str]:
    """Why ``module`` is not the structure a rule was written for, or None."""
    if params.shape not in signatures:
        known = " or ".join("(" + ", ".join(s) + ")" for s in signatures)
        return f"forward takes ({', '.join(params.shape)}); the residual rule knows {known}"
    for name in submodules + norms:
        if not isinstance(getattr(module, name, None), nn.Module):
            return f"no submodule {name!r}: not the layer structure the residual rule knows"
    for name in norms:
        spec = norm_spec(getattr(module, name))
        if not isinstance(spec, NormSpec):
            return f"{name}: {spec}"
    return None


def _others(bound: dict, first: str = "hidden_states") -> dict:
    return {k: v for k, v in bound.items() if k != first}


# ------------------------------------------------------------------------- structures


def _pre_norm(dropouts: bool):
    """Llama-style pre-norm layer; ``dropouts``: Phi-3's resid_attn_dropout / resid_mlp_dropout on each branch."""

    def body(self, bound):
        residual = bound["hidden_states"]
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(residual), **_others(bound))
        if dropouts:
            hidden_states = self.resid_attn_dropout(hidden_states)
        hidden_states, residual = add_norm(self.post_attention_layernorm, hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        if dropouts:
            hidden_states = self.resid_mlp_dropout(hidden_states)
        return residual + hidden_states

    submodules = ("self_attn", "mlp") + (("resid_attn_dropout", "resid_mlp_dropout") if dropouts else ())
    signatures = (("hidden_states", "attention_mask", "position_ids", "cache", "use_cache", "position_embeddings",
                   _VAR),)
    return body, signatures, submodules, ("input_layernorm", "post_attention_layernorm")


def _sandwich():
    """Gemma 2 / 3: norms before and after each branch; the attention branch's add feeds pre_feedforward_layernorm."""

    def body(self, bound):
        residual = bound["hidden_states"]
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(residual), **_others(bound))
        hidden_states, residual = add_norm(self.pre_feedforward_layernorm,
                                           self.post_attention_layernorm(hidden_states), residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return residual + hidden_states

    signatures = (("hidden_states", "position_embeddings", "attention_mask", "position_ids", "cache", _VAR),)
    return body, signatures, ("self_attn", "mlp"), ("input_layernorm", "post_attention_layernorm",
                                                   "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _gpt2():
    """GPT-2's block: the attention add feeds ln_cross_attn (cross-attention) or ln_2; the cross add feeds ln_2."""

    def body(self, bound):
        encoder_hidden_states = bound["encoder_hidden_states"]
        if encoder_hidden_states is not None and not hasattr(self, "crossattention"):
            return class_forward(self)(**bound)  # the class raises its error
        residual = bound["hidden_states"]
        extra = {k: v for k, v in bound.items() if k not in _GPT2_NAMED}
        attn_output, _ = self.attn(self.ln_1(residual), cache=bound["cache"], attention_mask=bound["attention_mask"],
                                   use_cache=bound["use_cache"], **extra)
        if encoder_hidden_states is not None:
            hidden_states, residual = add_norm(self.ln_cross_attn, attn_output, residual)
            cross_attn_output, _ = self.crossattention(
                hidden_states, cache=bound["cache"], attention_mask=bound["attention_mask"],
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=bound["encoder_attention_mask"])
            hidden_states, residual = add_norm(self.ln_2, cross_attn_output, residual)
        else:
            hidden_states, residual = add_norm(self.ln_2, attn_output, residual)
        return residual + self.mlp(hidden_states)

    return body, (_GPT2_NAMED + (_VAR,),), ("attn", "mlp"), ("ln_1", "ln_2")


_GPT2_NAMED = ("hidden_states", "cache", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
               "use_cache")


def _post_norm():
    """BERT / RoBERTa ``LayerNorm(dropout(dense(h)) + input_tensor)``: only the normed output is kept."""

    def body(self, bound):
        hidden_states = self.dropout(self.dense(bound["hidden_states"]))
        return add_norm(self.LayerNorm, hidden_states, bound["input_tensor"])[0]

    return body, (("hidden_states", "input_tensor"),), ("dense", "dropout"), ("LayerNorm",)


def _hf(family: str, *classes: str) -> list:
    return [hf_class(family, cls) for cls in classes]


#: structure name -> (its forward's maker, the classes that have it)
STRUCTURES: dict[str, tuple[Callable, list]] = {
    "pre_norm": (functools.partial(_pre_norm, False),
                 _hf("llama", "LlamaDecoderLayer") + _hf("mistral", "MistralDecoderLayer")
                 + _hf("qwen2", "Qwen2DecoderLayer") + _hf("qwen3", "Qwen3DecoderLayer")
                 + _hf("gemma", "GemmaDecoderLayer")),
    "pre_norm_dropout": (functools.partial(_pre_norm, True), _hf("phi3", "Phi3DecoderLayer")),
    "sandwich": (_sandwich, _hf("gemma2", "Gemma2DecoderLayer") + _hf("gemma3", "Gemma3DecoderLayer")),
    "gpt2": (_gpt2, _hf("gpt2", "GPT2Block")),
    "post_norm": (_post_norm, _hf("bert", "BertSelfOutput", "BertOutput")
                  + _hf("roberta", "RobertaSelfOutput", "RobertaOutput")),
}


def _builder(make: Callable) -> Callable:
    body, signatures, submodules, norms = make()

    def build(module: nn.Module):
        params = LayerParams.of(type(module).forward)
        if isinstance(params, str):
            return params
        why = _check(module, params, signatures, submodules, norms)
        if why is not None:
            return why
        return _wrap(module, params, body)

    return build


for _make, _classes in STRUCTURES.values():
    register(_classes, "residual", _builder(_make))
