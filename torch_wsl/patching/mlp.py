"""MLP rules: the Hugging Face families' gated MLPs onto torch_wsl's fused SwiGLU / GeGLU.

``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` becomes ``down_proj(silu_mul(gate_proj(x),
up_proj(x)))`` (or ``gelu_mul`` with the activation's ``approximate``); Phi-3's packed MLP
(``gate, up = gate_up_proj(x).chunk(2, -1)``) becomes ``silu_mul_packed(gate_up_proj(x))``.
The activation and the product run in one pass forward and one backward, and the
activation's output is never stored.

The projections are called as modules (never through their weights), so PEFT's LoRA
wrappers, quantized linears and hooks on them keep working. Which fused op to use is read
from the module's activation object when optimize() runs (``activation_kind``); an activation
torch_wsl does not compute (QuickGELU, ReLU², ...) leaves the module alone, with the reason in
the report. At run time the patched forward falls back to the plain product when the
projections' outputs are not what the kernels take (other dtypes or devices), and to the
class's forward when the activation was swapped for another kind or carries hooks after
optimize(). The patch holds no reference to the module's objects, so a deepcopy of an
optimized model runs fused too.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..ops import activation as ops
from ._core import hf_class, on_kernel_device, qualname, register

__all__ = ["activation_kind"]

#: dtypes the fused activation kernels take.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_TF = "transformers.activations"


def _gelu_mode(fn) -> Optional[str]:
    """``"none"``/``"tanh"`` when ``fn`` is ``F.gelu`` (or a partial of it that sets only ``approximate``)."""
    if fn is nn.functional.gelu:
        return "none"
    if isinstance(fn, functools.partial) and fn.func is nn.functional.gelu and not fn.args \
            and set(fn.keywords) <= {"approximate"}:
        mode = fn.keywords.get("approximate", "none")
        return mode if mode in ("none", "tanh") else None
    return None


def _transformers_gelu(act: nn.Module, python_formula: str, approximate: str) -> Union[str, None]:
    """GELUActivation / GELUTanh: their ``act`` attribute is F.gelu (a partial for tanh) or the
    class's Python formula of the same function (``python_formula``), which computes
    ``approximate``'s GELU op by op; an older class without ``act`` calls F.gelu itself."""
    if not hasattr(act, "act"):
        return approximate
    fn = act.act
    mode = _gelu_mode(fn)
    if mode is not None:
        return mode
    if getattr(fn, "__self__", None) is act and getattr(fn, "__func__", None) is getattr(type(act), python_formula, 0):
        return approximate
    return None


# Activation class -> function of the instance returning "silu", "gelu:none", "gelu:tanh" or None (unknown).
# The formula classes (NewGELU, FastGELU and the *_python variants) compute the same function
# as F.gelu op by op; the kernel computes it in float32 and rounds once.
_ACTIVATIONS: dict[str, Callable[[nn.Module], Optional[str]]] = {
    "torch.nn.modules.activation.SiLU": lambda a: "silu",
    "torch.nn.modules.activation.GELU": lambda a: f"gelu:{a.approximate}" if a.approximate in ("none", "tanh")
    else None,
    f"{_TF}.SiLUActivation": lambda a: "silu",
    f"{_TF}.GELUActivation": lambda a: _prefixed(_transformers_gelu(a, "_gelu_python", "none")),
    f"{_TF}.GELUTanh": lambda a: _prefixed(_transformers_gelu(a, "_gelu_tanh_python", "tanh")),
    f"{_TF}.PytorchGELUTanh": lambda a: _prefixed(_transformers_gelu(a, "_gelu_tanh_python", "tanh")),
    f"{_TF}.NewGELUActivation": lambda a: "gelu:tanh",
    f"{_TF}.FastGELUActivation": lambda a: "gelu:tanh",
}


def _prefixed(mode: Optional[str]) -> Optional[str]:
    return None if mode is None else f"gelu:{mode}"


def activation_kind(act: object) -> Union[tuple[str, str], str]:
    """``("silu", "")`` or ``("gelu", approximate)`` for an activation module torch_wsl fuses,
    otherwise the reason it does not (a string)."""
    if not isinstance(act, nn.Module):
        return f"activation {type(act).__name__} is not a module torch_wsl knows"
    name = type(act).__name__
    classify = _ACTIVATIONS.get(qualname(type(act)))
    if classify is None:
        return f"activation {name} has no fused torch_wsl kernel (SiLU and GELU have)"
    if "forward" in vars(act):
        return f"activation {name}'s forward is replaced on the instance"
    kind = classify(act)
    if kind is None:
        return f"activation {name} is configured in a way torch_wsl does not know"
    op, _, approximate = kind.partition(":")
    return op, approximate


def _same_as(act: nn.Module) -> Callable[[object], bool]:
    """A run-time test that an activation (the same one, a deepcopy of it, or a replacement) still
    computes what ``act`` did when optimize() classified it: its class and the attribute that
    configures it. Cheap, and traceable by torch.compile."""
    cls = type(act)
    if cls is nn.GELU:
        approximate = act.approximate
        return lambda a: type(a) is cls and a.approximate == approximate
    fn = getattr(act, "act", None) if qualname(cls).startswith(_TF) else None
    if fn is nn.functional.gelu:
        return lambda a: type(a) is cls and a.act is nn.functional.gelu
    if isinstance(fn, functools.partial):
        keywords = dict(fn.keywords)
        return lambda a: type(a) is cls and isinstance(a.act, functools.partial) and \
            a.act.func is nn.functional.gelu and not a.act.args and a.act.keywords == keywords
    if fn is not None:  # the class's Python formula, bound to the activation
        formula = fn.__func__
        return lambda a: type(a) is cls and getattr(a.act, "__func__", None) is formula
    return lambda a: type(a) is cls


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _fusable(a: Tensor, b: Optional[Tensor] = None) -> bool:
    if a.dtype not in _DTYPES or not on_kernel_device(a):
        return False
    return b is None or (b.dtype == a.dtype and b.shape == a.shape and b.device == a.device)


def _submodules(module: nn.Module, names: tuple) -> Optional[str]:
    for n in names:
        if not isinstance(getattr(module, n, None), nn.Module):
            return f"no submodule {n!r} (not the structure torch_wsl's rule expects)"
    return None


def _choose(module: nn.Module, projections: tuple, act_name: str, silu_op: Callable, gelu_op: Callable):
    """(the fused op for the module's activation, a test that a later activation is still of that
    kind), or why the module stays as it is."""
    why = _submodules(module, projections + (act_name,))
    if why:
        return why
    act = getattr(module, act_name)
    kind = activation_kind(act)
    if isinstance(kind, str):
        return kind
    op, approximate = kind
    fused = silu_op if op == "silu" else functools.partial(gelu_op, approximate=approximate)
    return fused, _same_as(act)  # not `act` itself: a deepcopy of the model has its own


def _build_gated(module: nn.Module):
    """gate_proj / up_proj / down_proj / act_fn (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3)."""
    chosen = _choose(module, ("gate_proj", "up_proj", "down_proj"), "act_fn", ops.silu_mul, ops.gelu_mul)
    if isinstance(chosen, str):
        return chosen
    fused, same = chosen

    def forward(self, x: Tensor) -> Tensor:
        act_fn = self.act_fn
        if not same(act_fn) or _has_hooks(act_fn):
            return type(self).forward(self, x)  # the class's (traceable, unlike a bound MethodType)
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        h = fused(gate, up) if _fusable(gate, up) else act_fn(gate) * up
        return self.down_proj(h)

    return forward


def _build_packed(module: nn.Module):
    """gate_up_proj (gate half first) / down_proj / activation_fn (Phi-3)."""
    chosen = _choose(module, ("gate_up_proj", "down_proj"), "activation_fn", ops.silu_mul_packed,
                     ops.gelu_mul_packed)
    if isinstance(chosen, str):
        return chosen
    fused, same = chosen

    def forward(self, hidden_states: Tensor) -> Tensor:
        act_fn = self.activation_fn
        if not same(act_fn) or _has_hooks(act_fn):
            return type(self).forward(self, hidden_states)
        gate_up = self.gate_up_proj(hidden_states)
        if _fusable(gate_up) and gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0:
            h = fused(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = up * act_fn(gate)
        return self.down_proj(h)

    return forward


GATED = [hf_class(f, c) for f, c in (("llama", "LlamaMLP"), ("mistral", "MistralMLP"), ("qwen2", "Qwen2MLP"),
                                 ("qwen3", "Qwen3MLP"), ("gemma", "GemmaMLP"), ("gemma2", "Gemma2MLP"),
                                 ("gemma3", "Gemma3MLP"))]
PACKED = [hf_class("phi3", "Phi3MLP")]

register(GATED, "mlp", _build_gated)
register(PACKED, "mlp", _build_packed)
