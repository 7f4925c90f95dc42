"""RoPE rules: the Hugging Face families' attention modules onto torch_wsl's fused rotary embedding.

These attention forwards call their modeling file's module-global ``apply_rotary_pos_emb``.
transformers' own extension point for it (``use_kernelized_func`` and the kernel hub) does
nothing without the ``kernels`` package, and rebinding the module global would change every
model in the process. So the patch is per instance, without copying any forward body: the
instance gets a clone of its class's forward function - the same code object - whose globals
are a copy of the modeling module's with ``apply_rotary_pos_emb`` bound to a dispatcher
(``_Dispatch``) that calls ``torch_wsl.ops.apply_rotary_pos_emb`` when the call is one the
kernel computes exactly as transformers' function does, and transformers' function otherwise.
Decorators on the forward (``deprecate_kwarg`` and other ``functools.wraps`` wrappers) are
rebuilt around the clone, each with its closure pointing at the clone instead of the original.

Before any clone is made, transformers' function is compared with the kernel on small random
tensors (full rotary, and partial rotary as Phi-3 uses it): a transformers version whose
function computes something else (an older ``position_ids`` gather, another pair layout)
leaves the module alone, with the reason in the report, rather than being silently replaced.

The globals copy is taken when optimize() first sees the class: a later rebinding of some
*other* global of the modeling file (by another library) is not seen by the patched
forward; ``restore`` gives the class's forward back.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..ops import rope as ops
from ._core import KERNEL_DEVICES, hf_class, register

__all__ = ["fused_forward"]

_NAME = "apply_rotary_pos_emb"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _table_fits(x: Tensor, t: list) -> bool:
    """The unsqueezed table shape ``t`` broadcasts to ``x`` in all but the last dim without growing it."""
    nd, nt = x.dim(), len(t)
    if nt > nd:
        return False
    for i in range(nt - 1):
        if t[i] != 1 and t[i] != x.shape[nd - nt + i]:
            return False
    return True


class _Dispatch:
    """What the cloned forward calls as ``apply_rotary_pos_emb``: the fused kernel when it computes
    what ``original`` would, ``original`` (with the arguments as given) otherwise.

    ``unsqueeze_at``: the position of ``unsqueeze_dim`` in the original's signature;
    ``position_ids_at``: that of an (older, ignored-when-None) ``position_ids``, or None;
    ``partial``: whether ``original`` does partial rotary (a table narrower than the head)."""

    def __init__(self, original: Callable, unsqueeze_at: int, unsqueeze_default: int,
                 position_ids_at: Optional[int], partial: bool):
        self.original = original
        self.unsqueeze_at = unsqueeze_at
        self.unsqueeze_default = unsqueeze_default
        self.position_ids_at = position_ids_at
        self.partial = partial
        self.names = {"unsqueeze_dim"} if position_ids_at is None else {"unsqueeze_dim", "position_ids"}
        self.__wrapped__ = original  # what it stands for, to whoever inspects the clone's globals
        self.__name__ = _NAME

    def _arg(self, args: tuple, kwargs: dict, at: Optional[int], name: str, default):
        if at is None:
            return default
        if name in kwargs:
            return kwargs[name]
        return args[at - 4] if len(args) > at - 4 else default

    def fusable(self, q, k, cos, sin, unsqueeze_dim, position_ids) -> bool:
        if position_ids is not None or not isinstance(unsqueeze_dim, int) or isinstance(unsqueeze_dim, bool):
            return False
        if not all(isinstance(t, Tensor) for t in (q, k, cos, sin)):
            return False
        if q.dtype not in _DTYPES or not (k.dtype == cos.dtype == sin.dtype == q.dtype):
            return False
        if q.device.type not in KERNEL_DEVICES or not (k.device == cos.device == sin.device == q.device):
            return False
        if cos.requires_grad or sin.requires_grad or cos.shape != sin.shape:
            return False
        n = cos.dim()
        if n < 1 or q.dim() < 1 or q.dim() > 7 or k.dim() < 1 or k.dim() > 7 or not -(n + 1) <= unsqueeze_dim <= n:
            return False
        rotary, head = cos.shape[-1], q.shape[-1]
        if rotary % 2 or k.shape[-1] != head or rotary > head or (rotary < head and not self.partial):
            return False
        t = list(cos.shape)
        t.insert(unsqueeze_dim + n + 1 if unsqueeze_dim < 0 else unsqueeze_dim, 1)
        return _table_fits(q, t) and _table_fits(k, t)

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if len(args) > len(self.names) or not set(kwargs) <= self.names:
            return self.original(q, k, cos, sin, *args, **kwargs)  # its own error for arguments it lacks
        unsqueeze_dim = self._arg(args, kwargs, self.unsqueeze_at, "unsqueeze_dim", self.unsqueeze_default)
        position_ids = self._arg(args, kwargs, self.position_ids_at, "position_ids", None)
        if self.fusable(q, k, cos, sin, unsqueeze_dim, position_ids):
            return ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return self.original(q, k, cos, sin, *args, **kwargs)


def _signature(original: Callable) -> Union[tuple, str]:
    """(unsqueeze_at, unsqueeze_default, position_ids_at) for the known signatures of transformers'
    function: ``(q, k, cos, sin, unsqueeze_dim=1)`` and the older ``(q, k, cos, sin, position_ids=None,
    unsqueeze_dim=1)``."""
    try:
        params = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return f"{_NAME} has no signature torch_wsl can read"
    names = [p.name for p in params]
    known_tails = (["unsqueeze_dim"], ["position_ids", "unsqueeze_dim"])
    if names[:4] != ["q", "k", "cos", "sin"] or names[4:] not in known_tails \
            or any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return f"{_NAME}{inspect.signature(original)} is not a signature torch_wsl knows"
    ud = params[-1].default
    if not isinstance(ud, int):
        return f"{_NAME}'s unsqueeze_dim has no integer default"
    return len(params) - 1, ud, (4 if len(params) == 6 else None)


def _agrees(original: Callable, head: int, rotary: int) -> bool:
    """transformers' function and the kernel give the same q and k on random float64 tensors
    ([batch, heads, seq, head] with GQA, tables [batch, seq, rotary], the default unsqueeze_dim)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, head, dtype=torch.float64, generator=g)
    k = torch.randn(2, 2, 5, head, dtype=torch.float64, generator=g)
    cos = torch.randn(2, 5, rotary, dtype=torch.float64, generator=g)
    sin = torch.randn(2, 5, rotary, dtype=torch.float64, generator=g)
    try:
        with torch.no_grad():
            want = original(q, k, cos, sin)
            got = ops.apply_rotary_pos_emb(q, k, cos, sin)
        return all(isinstance(w, Tensor) and w.shape == o.shape and torch.allclose(w, o, rtol=1e-12, atol=1e-12)
                   for w, o in zip(want, got, strict=True))
    except Exception:  # noqa: BLE001 - any failure means "not the function the kernel computes"
        return False


def _dispatch_for(original: Callable) -> Union[_Dispatch, str]:
    sig = _signature(original)
    if isinstance(sig, str):
        return sig
    if not _agrees(original, 8, 8):
        return f"{_NAME} of {original.__module__} does not compute what torch_wsl's RoPE does"
    unsqueeze_at, unsqueeze_default, position_ids_at = sig
    return _Dispatch(original, unsqueeze_at, unsqueeze_default, position_ids_at, partial=_agrees(original, 8, 4))


def _copy_function(f: types.FunctionType, globals_: dict, closure) -> types.FunctionType:
    new = types.FunctionType(f.__code__, globals_, f.__name__, f.__defaults__, closure)
    new.__kwdefaults__ = dict(f.__kwdefaults__) if f.__kwdefaults__ else f.__kwdefaults__
    new.__qualname__ = f.__qualname__
    new.__module__ = f.__module__
    new.__doc__ = f.__doc__
    new.__annotations__ = dict(f.__annotations__)
    new.__dict__.update(f.__dict__)
    return new


def _rewrap(wrapper: Callable, old: Callable, new: Callable) -> Union[types.FunctionType, str]:
    """``wrapper`` (a functools.wraps-style decorator's function around ``old``) around ``new``."""
    if not isinstance(wrapper, types.FunctionType) or not wrapper.__closure__:
        return f"its forward's decorator {getattr(wrapper, '__qualname__', wrapper)!r} cannot be rebuilt"
    cells, found = [], False
    for cell in wrapper.__closure__:
        try:
            target = cell.cell_contents
        except ValueError:  # an empty cell
            target = None
        if target is old:
            cells.append(types.CellType(new))
            found = True
        else:
            cells.append(cell)
    if not found:
        return f"its forward's decorator {wrapper.__qualname__!r} does not hold the function it wraps"
    clone = _copy_function(wrapper, wrapper.__globals__, tuple(cells))
    clone.__wrapped__ = new
    return clone


_FORWARDS: dict = {}  # class forward function -> its clone on the fused RoPE, or why there is none


def fused_forward(forward: Callable) -> Union[types.FunctionType, str]:
    """The clone of an attention class's ``forward`` (decorators included) whose
    ``apply_rotary_pos_emb`` is the fused dispatcher, or why it cannot be made. Cached per function."""
    cached = _FORWARDS.get(forward)
    if cached is None:
        cached = _FORWARDS[forward] = _make_fused_forward(forward)
    return cached


def _make_fused_forward(forward: Callable) -> Union[types.FunctionType, str]:
    chain = [forward]
    while hasattr(chain[-1], "__wrapped__"):
        chain.append(chain[-1].__wrapped__)
        if len(chain) > 16:
            return "its forward's decorator chain is too deep"
    inner = chain[-1]
    if not isinstance(inner, types.FunctionType):
        return f"its forward is a {type(inner).__name__}, not a Python function"
    module_globals = inner.__globals__
    if _NAME not in inner.__code__.co_names or _NAME not in module_globals:
        return f"its forward does not call its module's {_NAME}"
    original = module_globals[_NAME]
    if not isinstance(original, types.FunctionType) or original.__module__ != module_globals.get("__name__") \
            or original.__name__ != _NAME:
        return f"{module_globals.get('__name__')}.{_NAME} is not transformers' own (another library replaced it)"
    dispatch = _dispatch_for(original)
    if isinstance(dispatch, str):
        return dispatch
    new = _copy_function(inner, _clone_globals(module_globals, dispatch), inner.__closure__)
    for wrapper, old in zip(reversed(chain[:-1]), reversed(chain[1:])):
        new = _rewrap(wrapper, old, new)
        if isinstance(new, str):
            return new
    return new


_CLONE_MODULES: dict[str, types.ModuleType] = {}


def _clone_globals(module_globals: dict, dispatch) -> dict:
    """The clones' globals: a copy of the modeling module's with the dispatcher bound, held as the
    ``__dict__`` of a module registered in sys.modules under its own name. torch.compile (2.13 and
    older) guards a function's globals through the module their ``__name__`` names: under
    transformers' name, its guards would read transformers' unpatched module."""
    name = "torch_wsl_rope_clone__" + module_globals["__name__"].replace(".", "__")
    clone = _CLONE_MODULES.get(name)
    if clone is None:
        clone = types.ModuleType(name)
        clone.__dict__.update(module_globals)
        clone.__dict__["__name__"] = name
        clone.__dict__[_NAME] = dispatch
        sys.modules[name] = _CLONE_MODULES[name] = clone
    return clone.__dict__


def _build(module: nn.Module):
    return fused_forward(type(module).forward)


ATTENTIONS = [hf_class(f, c) for f, c in (("llama", "LlamaAttention"), ("mistral", "MistralAttention"),
                                     ("qwen2", "Qwen2Attention"), ("qwen3", "Qwen3Attention"),
                                     ("gemma", "GemmaAttention"), ("gemma2", "Gemma2Attention"),
                                     ("gemma3", "Gemma3Attention"), ("phi3", "Phi3Attention"))]

register(ATTENTIONS, "rope", _build)
