"""Norm rules: torch's LayerNorm/RMSNorm and the Hugging Face families' own RMSNorm classes onto
torch_wsl's fused norms, with each class's exact semantics (``NormSpec``).

``add_norm`` is the residual fusion's entry point: ``norm(x + residual)`` and the sum from one
kernel, for any module this file knows.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..ops import norm as ops
from ._core import class_forward, hf_class, on_kernel_device, qualname, register, rule_for

__all__ = ["NormSpec", "add_norm", "norm_spec"]


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How a norm module computes: LayerNorm or RMSNorm over ``normalized_shape`` (the last dims),
    its epsilon, and for RMSNorm the weight ``offset`` and ``casting_mode`` of torch_wsl's rms_norm.
    ``same_dtype_only``: the class's rounding equals the kernel's only when weight and input share
    a dtype (T5LayerNorm); other inputs run the class's own forward."""

    rms: bool
    normalized_shape: tuple
    eps: Optional[float]
    offset: float = 0.0
    casting_mode: str = "torch"
    same_dtype_only: bool = False
    eps_attr: str = "eps"


# Families whose RMSNorm is Llama's: weight * normalize(x in fp32).to(x.dtype), eps in `variance_epsilon`.
_LLAMA_STYLE = {
    "llama": "LlamaRMSNorm",
    "mistral": "MistralRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen3": "Qwen3RMSNorm",
    "phi3": "Phi3RMSNorm",
}
# Gemma's: normalize(x in fp32) * (1 + w in fp32), rounded once; eps in `eps`.
_GEMMA_STYLE = {"gemma": "GemmaRMSNorm", "gemma2": "Gemma2RMSNorm", "gemma3": "Gemma3RMSNorm"}


_SPECS: dict[str, Callable] = {}  # qualified class name -> spec builder (module -> NormSpec)


def _weight_shape(m: nn.Module) -> tuple:
    return tuple(m.weight.shape)


for family, cls in _LLAMA_STYLE.items():
    _SPECS[hf_class(family, cls)] = lambda m: NormSpec(True, _weight_shape(m), m.variance_epsilon, 0.0, "llama",
                                                  eps_attr="variance_epsilon")
for family, cls in _GEMMA_STYLE.items():
    _SPECS[hf_class(family, cls)] = lambda m: NormSpec(True, _weight_shape(m), m.eps, 1.0, "gemma")
# T5's (no mean, like Llama's) casts the normalized x to the weight's dtype when that is half:
# equal to Llama's when the dtypes agree.
_SPECS[hf_class("t5", "T5LayerNorm")] = lambda m: NormSpec(True, _weight_shape(m), m.variance_epsilon, 0.0, "llama",
                                                      same_dtype_only=True, eps_attr="variance_epsilon")
_SPECS["torch.nn.modules.normalization.LayerNorm"] = lambda m: NormSpec(False, tuple(m.normalized_shape), m.eps)
_SPECS["torch.nn.modules.normalization.RMSNorm"] = lambda m: NormSpec(True, tuple(m.normalized_shape), m.eps)


def norm_spec(module: nn.Module) -> Union[NormSpec, str]:
    """The module's NormSpec, or why torch_wsl cannot run it."""
    rule, why = rule_for(type(module))
    if rule is None:
        return why or f"{type(module).__name__} is not a norm torch_wsl knows"
    for cls in type(module).__mro__:
        build = _SPECS.get(qualname(cls))
        if build is not None:
            return build(module)
    return f"{type(module).__name__} is not a norm torch_wsl knows"  # pragma: no cover


def _runs_fused(spec: NormSpec, module: nn.Module, x: Tensor) -> bool:
    weight = getattr(module, "weight", None)
    if not on_kernel_device(x, weight):
        return False
    if spec.same_dtype_only and weight is not None and weight.dtype != x.dtype:
        return False
    return x.dim() >= len(spec.normalized_shape) and tuple(x.shape[x.dim() - len(spec.normalized_shape):]) == \
        spec.normalized_shape


def _norm(spec: NormSpec, module: nn.Module, x: Tensor) -> Tensor:
    if spec.rms:
        return ops.rms_norm(x, spec.normalized_shape, module.weight, spec.eps, offset=spec.offset,
                            casting_mode=spec.casting_mode)
    return ops.layer_norm(x, spec.normalized_shape, module.weight, module.bias, spec.eps)


def add_norm(module: nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` as ``module`` would compute them (the sum rounded to
    x's dtype first, as ``residual + x`` is), in one fused kernel where torch_wsl can; otherwise
    the add and the module's own forward."""
    spec = norm_spec(module)
    if isinstance(spec, NormSpec) and _runs_fused(spec, module, x) and residual.dtype == x.dtype \
            and residual.shape == x.shape and on_kernel_device(residual) \
            and not (spec.rms and spec.casting_mode == "llama" and module.weight.dtype != x.dtype):
        if spec.rms:
            return ops.add_rms_norm(x, residual, spec.normalized_shape, module.weight, spec.eps, offset=spec.offset,
                                    casting_mode=spec.casting_mode)
        return ops.add_layer_norm(x, residual, spec.normalized_shape, module.weight, module.bias, spec.eps)
    total = residual + x
    return module(total), total


def _build(module: nn.Module):
    spec = norm_spec(module)
    if isinstance(spec, str):
        return spec
    if spec.rms and spec.offset and getattr(module, "weight", None) is None:
        return "an offset weight (1 + w) without a weight"

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not _runs_fused(spec, self, hidden_states):
            return class_forward(self)(hidden_states)
        return _norm(spec, self, hidden_states)

    return forward


register(list(_SPECS), "norms", _build)
