"""DTensor sharding strategies for the torch_wsl operators.

With these, ``torch.ops.torch_wsl.*`` (forward and backward operators) accept
``torch.distributed.tensor.DTensor`` arguments: each operator runs once per
rank on the local shards, with the placements below, and DTensor redistributes
any other input placement to one of them. What is declared is exact, no more:

* parameters (norm weight/bias, the LM head of ``linear_cross_entropy``) are
  Replicate; their gradients over batch-sharded rows are ``Partial`` (sum);
* activations may be sharded on any dimension the operator does not reduce
  over: the leading (row) dimensions of the norms, every dimension of
  ``silu_mul``/``gelu_mul``, all but the last (the packed gate|up halves) of
  the ``*_packed`` forms, every dimension but the head dimension of the rotary
  embedding (cos/sin follow q's sharding where they are not broadcast);
* per-row statistics (rstd, mean, lse) are sharded like the rows;
* losses over sharded rows: ``reduction="none"`` is sharded like the rows,
  ``"sum"`` is ``Partial``; ``"mean"`` (a ratio of two sums, not the mean of
  the ranks' means) runs on Replicate inputs only. The wrappers
  ``torch_wsl.ops.cross_entropy.cross_entropy`` / ``linear_cross_entropy``
  (and ``torch_wsl.nn.CrossEntropyLoss``) do better for sharded inputs: the
  "sum" operator, divided by the total weight / count of valid targets over
  all ranks (a partial sum over a reduced scalar: exact, and the logits or
  hidden states are never gathered).
* all-Replicate always.

Registration needs ``import torch.distributed.tensor`` (about a second), so
``import torch_wsl`` does not do it: :func:`install` registers at once if
DTensor is already imported, and otherwise when it gets imported.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Any, Callable, Optional

import torch

__all__ = ["dtensor_class", "install", "is_registered", "is_sharded_dtensor"]

_DTENSOR = "torch.distributed.tensor"
_registered = False


def is_registered() -> bool:
    """Whether the strategies are registered with DTensor in this process."""
    return _registered


def dtensor_class() -> Optional[type]:
    """DTensor's class once torch.distributed.tensor is imported, else None.

    Never imports DTensor (about a second): a process that has not imported it holds no DTensor.
    """
    module = sys.modules.get(_DTENSOR)
    return getattr(module, "DTensor", None) if module is not None else None


def is_sharded_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor whose local shard is not the whole tensor (any placement but Replicate)."""
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor) and not all(p.is_replicate() for p in t.placements)


# ------------------------------------------------------------------ strategies
# Each function takes the operator's arguments (tensors as DTensorSpecs, with
# .ndim and .shape of the global tensor) and returns, for one mesh dimension,
# the accepted (output placements, input placements) pairs; the input list has
# one entry per tensor argument in schema order, None for an absent optional
# one. register_sharding expands them over the mesh and drops those whose
# sharded sizes are smaller than the mesh.


def _strategies(register: Callable, placements: Any) -> None:
    Replicate, Shard, Partial = placements.Replicate, placements.Shard, placements.Partial
    R = Replicate()
    ops = torch.ops.torch_wsl

    def rep(t) -> Optional[Any]:
        """A parameter's placement: Replicate, or None when absent."""
        return None if t is None else R

    def like(t, p) -> Optional[Any]:
        return None if t is None else p

    def param_grad(param, wanted: bool):
        """Gradient of a Replicate parameter over sharded rows: partial sums; an empty tensor when not computed."""
        return Partial() if (param is not None and wanted) else R

    def leading_dims(input, normalized_shape) -> range:
        return range(max(input.ndim - len(normalized_shape), 0))

    # --- norms: rows are the leading dims, statistics have exactly those dims.
    @register(ops.rms_norm.default)
    def _rms_norm(input, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch"):
        out = [([R, R], [R, rep(weight)])]
        out += [([Shard(d), Shard(d)], [Shard(d), rep(weight)]) for d in leading_dims(input, normalized_shape)]
        return out

    @register(ops.add_rms_norm.default)
    def _add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch"):
        out = [([R, R, R], [R, R, rep(weight)])]
        for d in leading_dims(input, normalized_shape):
            s = Shard(d)
            out.append(([s, s, s], [s, s, rep(weight)]))
        return out

    @register(ops.layer_norm.default)
    def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        out = [([R, R, R], [R, rep(weight), rep(bias)])]
        for d in leading_dims(input, normalized_shape):
            s = Shard(d)
            out.append(([s, s, s], [s, rep(weight), rep(bias)]))
        return out

    @register(ops.add_layer_norm.default)
    def _add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
        out = [([R, R, R, R], [R, R, rep(weight), rep(bias)])]
        for d in leading_dims(input, normalized_shape):
            s = Shard(d)
            out.append(([s, s, s, s], [s, s, rep(weight), rep(bias)]))
        return out

    @register(ops.rms_norm_backward.default)
    def _rms_norm_backward(grad_output, grad_residual_out, input, normalized_shape, rstd, weight, weight_grad,
                           offset=0.0, casting_mode="torch"):
        out = [([R, R], [R, like(grad_residual_out, R), R, R, rep(weight)])]
        gw = param_grad(weight, weight_grad)
        for d in leading_dims(input, normalized_shape):
            s = Shard(d)
            out.append(([s, gw], [s, like(grad_residual_out, s), s, s, rep(weight)]))
        return out

    @register(ops.layer_norm_backward.default)
    def _layer_norm_backward(grad_output, grad_residual_out, input, normalized_shape, mean, rstd, weight, bias,
                             output_mask):
        out = [([R, R, R], [R, like(grad_residual_out, R), R, R, R, rep(weight), rep(bias)])]
        gw, gb = param_grad(weight, output_mask[0]), param_grad(bias, output_mask[1])
        for d in leading_dims(input, normalized_shape):
            s = Shard(d)
            out.append(([s, gw, gb], [s, like(grad_residual_out, s), s, s, s, rep(weight), rep(bias)]))
        return out

    # --- gated activations: elementwise; the packed form pairs the two halves of the last dim.
    def elementwise(ndim: int, n_out: int, n_in: int):
        return [([R] * n_out, [R] * n_in)] + [([Shard(d)] * n_out, [Shard(d)] * n_in) for d in range(ndim)]

    @register(ops.silu_mul.default)
    def _silu_mul(gate, up):
        return elementwise(gate.ndim, 1, 2)

    @register(ops.gelu_mul.default)
    def _gelu_mul(gate, up, approximate="none"):
        return elementwise(gate.ndim, 1, 2)

    @register(ops.silu_mul_backward.default)
    def _silu_mul_backward(grad_output, gate, up):
        return elementwise(gate.ndim, 2, 3)

    @register(ops.gelu_mul_backward.default)
    def _gelu_mul_backward(grad_output, gate, up, approximate="none"):
        return elementwise(gate.ndim, 2, 3)

    @register(ops.silu_mul_packed.default)
    def _silu_mul_packed(gate_up):
        return elementwise(gate_up.ndim - 1, 1, 1)

    @register(ops.gelu_mul_packed.default)
    def _gelu_mul_packed(gate_up, approximate="none"):
        return elementwise(gate_up.ndim - 1, 1, 1)

    @register(ops.silu_mul_packed_backward.default)
    def _silu_mul_packed_backward(grad_output, gate_up):
        return elementwise(gate_up.ndim - 1, 1, 2)

    @register(ops.gelu_mul_packed_backward.default)
    def _gelu_mul_packed_backward(grad_output, gate_up, approximate="none"):
        return elementwise(gate_up.ndim - 1, 1, 2)

    # --- rotary embedding: elementwise over every dim but the head dim, where
    # the tables broadcast (csrc/rope.cpp): table.unsqueeze(unsqueeze_dim)
    # aligns with x's trailing dims. A table follows x's shard on the dims
    # where it is not broadcast, and is Replicate where it is.
    def table_placement(table, unsqueeze_dim: int, x_ndim: int, d: int):
        n = table.ndim
        pos = unsqueeze_dim + n + 1 if unsqueeze_dim < 0 else unsqueeze_dim
        j = d - (x_ndim - (n + 1))  # the dim of the unsqueezed table aligned with x's dim d
        if j < 0 or j == pos:
            return R
        t_dim = j if j < pos else j - 1
        return R if table.shape[t_dim] == 1 else Shard(t_dim)

    def rope(xs, cos, sin, unsqueeze_dim: int):
        """xs: the per-output tensors (q, k or their gradients; None when absent)."""
        present = [x for x in xs if x is not None]
        out = [([R] * len(xs), [like(x, R) for x in xs] + [R, R])]
        if not present or any(x.ndim != present[0].ndim for x in present):
            return out
        nd = present[0].ndim
        if cos.ndim + 1 > nd or sin.ndim + 1 > nd:
            return out  # a table that would grow x: the operator names the problem
        for d in range(nd - 1):
            s = Shard(d)
            tables = [table_placement(t, unsqueeze_dim, nd, d) for t in (cos, sin)]
            out.append(([s if x is not None else R for x in xs], [like(x, s) for x in xs] + tables))
        return out

    @register(ops.apply_rotary_pos_emb.default)
    def _apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
        return rope([q, k], cos, sin, unsqueeze_dim)

    # q_stride/k_stride only choose the gradients' memory order (csrc/rope.cpp's
    # empty_in_order), never an offset: the global strides the autograd saves
    # are right for any shard.
    @register(ops.apply_rotary_pos_emb_backward.default)
    def _apply_rotary_pos_emb_backward(grad_q_embed, grad_k_embed, cos, sin, unsqueeze_dim, interleaved, q_stride,
                                       k_stride):
        return rope([grad_q_embed, grad_k_embed], cos, sin, unsqueeze_dim)

    # --- losses over rows ([N, C] logits or [T, H] hidden states, [N] targets).
    S0 = Shard(0)

    @register(ops.cross_entropy.default)
    def _cross_entropy(input, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                       softcap=None):
        out = [([R, R, R], [R, R, rep(weight)])]
        if input.ndim == 2:
            # total_weight: the rows' sum of target weights
            if reduction == "none":
                out.append(([S0, S0, Partial()], [S0, S0, rep(weight)]))
            elif reduction == "sum":
                out.append(([Partial(), S0, Partial()], [S0, S0, rep(weight)]))
        return out

    @register(ops.cross_entropy_backward.default)
    def _cross_entropy_backward(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
                                label_smoothing, softcap):
        out = [([R], [R, R, R, rep(weight), R, R])]
        if input.ndim == 2:
            grad_loss_p = S0 if reduction == "none" else R
            if reduction == "mean":
                # the divisor: the global total weight
                out.append(([S0], [grad_loss_p, S0, S0, rep(weight), S0, R]))
            else:
                # total_weight is not read: any placement will do
                for tw in (R, Partial()):
                    out.append(([S0], [grad_loss_p, S0, S0, rep(weight), S0, tw]))
        return out

    def linear_wanted(reduction: str, grad_mask, bias) -> list[bool]:
        """Which gradients linear_cross_entropy forms in its forward (the others are empty tensors)."""
        fused = reduction != "none"
        return [fused and bool(grad_mask[0]), fused and bool(grad_mask[1]),
                fused and bool(grad_mask[2]) and bias is not None]

    @register(ops.linear_cross_entropy.default)
    def _linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                              label_smoothing=0.0, softcap=None, chunk_size=None, grad_mask=(False, False, False)):
        out = [([R, R, R, R], [R, R, R, rep(bias)])]
        if input.ndim == 2 and reduction in ("none", "sum"):
            want = linear_wanted(reduction, grad_mask, bias)
            loss = S0 if reduction == "none" else Partial()
            grads = [S0 if want[0] else R, Partial() if want[1] else R, Partial() if want[2] else R]
            out.append(([loss, *grads], [S0, R, S0, rep(bias)]))
        return out

    @register(ops.linear_cross_entropy_backward.default)
    def _linear_cross_entropy_backward(grad_loss, input, weight, target, bias, ignore_index, label_smoothing, softcap,
                                       chunk_size, grad_mask):
        out = [([R, R, R], [R, R, R, R, rep(bias)])]
        if input.ndim == 2:
            want = [bool(grad_mask[0]), bool(grad_mask[1]), bool(grad_mask[2]) and bias is not None]
            grads = [S0 if want[0] else R, Partial() if want[1] else R, Partial() if want[2] else R]
            out.append((grads, [S0, S0, R, S0, rep(bias)]))
        return out


# ----------------------------------------------------------------- registering


def _schema_info(op: torch._ops.OpOverload, runtime_schema_info: type) -> Any:
    """Every non-tensor argument in the sharding cache key.

    register_sharding's own key starts at the first int argument, so it
    ignores normalized_shape, reduction, output_mask, weight_grad (which
    change the strategies and the outputs' shapes) and every option before
    an int; DTensor would reuse the first call's output placements and
    shapes for a call that differs in them. The key here starts at the first
    argument that is not a tensor (the rule DTensor's decompositions use).
    """
    first, kwarg_only = 100, []
    for i, arg in enumerate(op._schema.arguments):
        t = arg.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if isinstance(t, torch.TensorType):
            continue
        first = min(first, i)
        if arg.kwarg_only:
            kwarg_only.append(arg.name)
    return runtime_schema_info(first, kwarg_only or None, needs_pytree=False)


def _register() -> None:
    global _registered
    if _registered:
        return
    from torch.distributed.tensor import DTensor, placement_types
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    # Private, but where register_sharding itself records the key (torch 2.13, 2.14 and older
    # releases alike); checked, so a torch that moves it gets no strategy with a wrong key.
    schema_infos = DTensor._op_dispatcher.sharding_propagator.op_to_schema_info
    if not isinstance(schema_infos, dict):
        raise RuntimeError(f"DTensor's sharding_propagator.op_to_schema_info is a {type(schema_infos).__name__}")

    def register(op):
        def wrap(fn):
            register_sharding(op)(fn)
            if op not in schema_infos:
                raise RuntimeError(f"register_sharding kept no sharding cache key for {op} where expected")
            schema_infos[op] = _schema_info(op, RuntimeSchemaInfo)
            return fn

        return wrap

    _strategies(register, placement_types)
    _registered = True


def _register_or_warn() -> None:
    try:
        _register()
    except Exception as e:  # noqa: BLE001  (never break the user's import of torch.distributed.tensor)
        warnings.warn(
            f"torch_wsl: could not register the operators' DTensor sharding strategies with this torch "
            f"({torch.__version__}): {type(e).__name__}: {e}. torch.ops.torch_wsl operators called on DTensors "
            "will raise DTensor's NotImplementedError.",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: lets torch.distributed.tensor load as usual, then registers the strategies."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DTENSOR:
            return None
        _remove_hook()
        spec = None
        for finder in sys.meta_path:  # the finders that would have found it without this hook
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            try:
                exec_module(module)
            finally:
                del loader.exec_module  # the instance attribute goes; the loader is as it was
            _register_or_warn()

        loader.exec_module = exec_then_register
        return spec


_hook: Optional[_RegisterAfterImport] = None


def _remove_hook() -> None:
    global _hook
    if _hook is not None and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hook = None


def install() -> None:
    """Register the strategies now if torch.distributed.tensor is imported, else right after it is.

    Idempotent; ``import torch_wsl`` calls it, and it never imports DTensor itself.
    """
    global _hook
    if _registered or _hook is not None:
        return
    if _DTENSOR in sys.modules:
        _register_or_warn()
        return
    if not torch.distributed.is_available():
        return
    _hook = _RegisterAfterImport()
    sys.meta_path.insert(0, _hook)
