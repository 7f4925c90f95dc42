"""The mechanism behind ``torch_wsl.optimize``: a registry of rules keyed by module class, and the
per-instance forward patch every rule installs.

A rule names the classes it knows by qualified name (``"transformers.models.llama.modeling_llama.
LlamaRMSNorm"``), so the registry imports nothing: transformers is never imported by torch_wsl,
only matched in models that already use it. A rule's ``build(module)`` looks at one instance
and returns the forward to install (a plain function taking the module first) or a reason to
leave the module alone.

The patch is an instance attribute ``forward`` (a bound method), so:
- nothing global changes: two models in one process, or two layers of one, can differ;
- parameters, buffers, hooks and ``state_dict`` keys are untouched (a checkpoint loads either way);
- ``restore`` deletes the attribute, and the class's own forward is back exactly.
A module whose instance already carries a ``forward`` of someone else's (accelerate's hooks
do this) is left alone.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
from collections import Counter
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

__all__ = ["KINDS", "Report", "Rule", "optimize", "register", "restore", "rule_for"]

#: What optimize() can replace, in the order it reports them; each is one of its keyword switches.
KINDS = ("norms", "residual", "mlp", "rope", "loss")
#: Devices torch_wsl has kernels for.
KERNEL_DEVICES = ("cpu", "cuda")

_PATCH_ATTR = "_torch_wsl_patch"  # the instance attribute that marks a module optimize() patched (its rule's kind)

Build = Callable[[nn.Module], Union[Callable, str]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How to put instances of some classes on fused kernels.

    ``kind`` is the optimize() switch that enables it; ``build(module)`` returns the new forward
    (a function of ``(module, *args, **kwargs)``) or a string saying why this instance stays as
    it is (the report shows it)."""

    kind: str
    build: Build


_RULES: dict[str, Rule] = {}


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def hf_class(family: str, cls: str) -> str:
    """The qualified name of a transformers model family's class, as rules register it."""
    return f"transformers.models.{family}.modeling_{family}.{cls}"


def register(class_names: Union[str, Iterable[str]], kind: str, build: Build) -> None:
    """Register ``build`` for every class named (``module.QualName``; the class need not be importable)."""
    if kind not in KINDS:
        raise ValueError(f"register: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for name in [class_names] if isinstance(class_names, str) else class_names:
        if name in _RULES:
            raise ValueError(f"register: {name} already has a rule ({_RULES[name].kind})")
        _RULES[name] = Rule(kind, build)


def rule_for(cls: type) -> tuple[Optional[Rule], Optional[str]]:
    """The rule for ``cls``: its own, or a registered base's when ``cls`` keeps that base's forward.
    Returns (rule, None), or (None, reason) for a subclass that overrides forward, or (None, None)."""
    rule = _RULES.get(qualname(cls))
    if rule is not None:
        return rule, None
    for base in cls.__mro__[1:]:
        rule = _RULES.get(qualname(base))
        if rule is not None:
            if cls.forward is not base.forward:
                return None, f"subclass of {base.__name__} that overrides forward"
            return rule, None
    return None, None


# Class names that look like something optimize() could replace: reported when unknown, so a
# user sees what stayed unfused (every Linear and Dropout would only be noise).
_CANDIDATE = re.compile(r"(Norm|MLP|Mlp|FeedForward|Attention|DecoderLayer|Block|ForCausalLM|LMHeadModel)$")


@dataclasses.dataclass
class Report:
    """What optimize() did.

    ``replaced[kind][class name]`` counts the modules now on fused kernels (those an earlier
    call patched included; ``already`` counts those); ``left_alone`` lists
    ``(module path, class name, reason)`` for every module a rule declined, every module of a
    target-looking class no rule knows, and modules on devices without torch_wsl kernels."""

    replaced: dict = dataclasses.field(default_factory=dict)
    left_alone: list = dataclasses.field(default_factory=list)
    already: int = 0

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.replaced.values())

    def count(self, kind: str, class_name: Optional[str] = None) -> int:
        per_class = self.replaced.get(kind, {})
        return per_class.get(class_name, 0) if class_name else sum(per_class.values())

    def reasons(self) -> Counter:
        """How many modules were left alone for each (class name, reason)."""
        return Counter((cls, why) for _, cls, why in self.left_alone)

    def __str__(self) -> str:
        lines = [f"torch_wsl.optimize: {self.total} modules on fused kernels"
                 + (f" ({self.already} already were)" if self.already else "")]
        for kind in KINDS:
            for cls, n in sorted(self.replaced.get(kind, {}).items()):
                lines.append(f"  {kind:<8} {cls} x{n}")
        if self.left_alone:
            lines.append("left alone:")
            for (cls, why), n in sorted(self.reasons().items()):
                lines.append(f"  {cls} x{n}: {why}")
        return "\n".join(lines)

    __repr__ = __str__


def _devices(module: nn.Module) -> set[str]:
    return {t.device.type for t in module.parameters()} | {t.device.type for t in module.buffers()}


def is_patched(module: nn.Module) -> bool:
    return _PATCH_ATTR in module.__dict__


def _install(module: nn.Module, kind: str, forward: Callable) -> None:
    # The class forward's signature: Trainer keeps the dataset columns it names, generate() looks
    # for logits_to_keep in it.
    try:
        forward.__signature__ = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        pass
    module.__dict__["forward"] = types.MethodType(forward, module)
    module.__dict__[_PATCH_ATTR] = kind


def optimize(
    model: nn.Module,
    *,
    norms: bool = True,
    residual: bool = True,
    mlp: bool = True,
    rope: bool = True,
    loss: bool = True,
) -> Report:
    """Put ``model``'s modules on torch_wsl's fused kernels, in place; returns a :class:`Report`.

    Each switch enables one kind of replacement (see the README). Only this instance changes;
    calling it again changes nothing more (switches turned off later do not undo earlier
    patches: ``restore`` does). A model whose parameters are on a device without torch_wsl
    kernels is left unchanged, with the reason in the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"torch_wsl.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {k for k, on in zip(KINDS, (norms, residual, mlp, rope, loss)) if on}
    report = Report()
    foreign = sorted(_devices(model) - set(KERNEL_DEVICES))
    if foreign:
        report.left_alone.append(("", type(model).__name__,
                                  f"parameters on {', '.join(foreign)}: torch_wsl has kernels for cpu and cuda only"))
        return report
    for path, module in model.named_modules():
        cls = type(module)
        name = cls.__name__
        if is_patched(module):
            kind = module.__dict__[_PATCH_ATTR]
            report.replaced.setdefault(kind, Counter())[name] += 1
            report.already += 1
            continue
        rule, why = rule_for(cls)
        if rule is None:
            if why is None and _CANDIDATE.search(name):
                why = "no torch_wsl rule for this class"
            if why is not None:
                report.left_alone.append((path, name, why))
            continue
        if rule.kind not in enabled:
            continue
        if "forward" in module.__dict__:
            report.left_alone.append((path, name, "its forward is already replaced on the instance (by another library)"))
            continue
        built = rule.build(module)
        if isinstance(built, str):
            report.left_alone.append((path, name, built))
            continue
        _install(module, rule.kind, built)
        report.replaced.setdefault(rule.kind, Counter())[name] += 1
    report.replaced = {k: dict(v) for k, v in report.replaced.items()}
    return report


def restore(model: nn.Module) -> int:
    """Undo ``optimize(model)``: every patched module gets its class's forward back. Returns how many."""
    n = 0
    for module in model.modules():
        if is_patched(module):
            del module.__dict__["forward"]
            del module.__dict__[_PATCH_ATTR]
            n += 1
    return n


def class_forward(module: nn.Module) -> Callable:
    """The forward the module's class defines (what a patched forward falls back to), bound
    (a partial: torch.compile traces it, where it does not trace a types.MethodType made in the graph)."""
    return functools.partial(type(module).forward, module)


def on_kernel_device(*tensors: Optional[torch.Tensor]) -> bool:
    """True when every given tensor is on a device torch_wsl has kernels for (a model moved
    after optimize() falls back to its own forward)."""
    return all(t is None or t.device.type in KERNEL_DEVICES for t in tensors)
