"""Rotary position embeddings: the wrapper, fake kernels and autograd.

``apply_rotary_pos_emb`` takes the arguments of transformers'
``models.llama.modeling_llama.apply_rotary_pos_emb`` and returns its results
(and GPT-NeoX/Phi's for partial rotary, GPT-J/Cohere's for the interleaved
layout), rotating q and k in one kernel launch each way. The operators
(schemas in csrc/rope.cpp) are ``torch.ops.torch_wsl.apply_rotary_pos_emb``
and its backward, ``apply_rotary_pos_emb_backward``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _checks
from ._autograd import forbid_double_backward

__all__ = ["apply_rotary_pos_emb"]

_ops = torch.ops.torch_wsl
_OP = "apply_rotary_pos_emb"
_BACKWARD_OP = "apply_rotary_pos_emb_backward"
_MAX_RANK = 7  # csrc/rope_math.h: kMaxDims leading dimensions + the head dimension


def apply_rotary_pos_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Optional[Tensor] = None,
    unsqueeze_dim: int = 1,
    *,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(q_embed, k_embed)``: q and k rotated by the angles whose cosines and sines are ``cos``/``sin``.

    Same contract and results as transformers' Llama ``apply_rotary_pos_emb``:
    ``cos.unsqueeze(unsqueeze_dim)`` (and ``sin``'s) must broadcast to q's and
    to k's shape in all but the last dimension. The usual shapes are q
    ``[batch, heads, seq, head_dim]``, k ``[batch, kv_heads, seq, head_dim]``
    (GQA: fewer heads than q) and cos/sin ``[batch or 1, seq, rotary_dim]``
    with ``unsqueeze_dim=1``; for ``[batch, seq, heads, head_dim]`` pass
    ``unsqueeze_dim=2``. q and k may be any strided views (the
    ``x.view(b, s, h, d).transpose(1, 2)`` of the attention projections reads
    in place). Unlike plain broadcasting, a table may not grow q's or k's shape
    (the outputs keep it): such a table, like one that does not broadcast,
    raises an error naming it and the shapes.

    ``rotary_dim = cos.shape[-1]`` may be smaller than ``head_dim``: then the
    first ``rotary_dim`` elements of each head rotate and the rest pass through
    unchanged (partial rotary, GPT-NeoX's and Phi's ``q[..., :rotary_dim]``
    slicing). It must be even.

    Layouts: ``interleaved=False`` pairs element ``i`` with
    ``i + rotary_dim // 2`` (``rotate_half``: Llama, Mistral, Qwen, NeoX, Phi);
    ``interleaved=True`` pairs ``2i`` with ``2i + 1`` (``rotate_every_two``:
    GPT-J, Cohere, GLM). The tables hold one value per rotated element either
    way, as transformers' rotary modules produce them; GPT-J's half-size
    ``sin``/``cos`` (one per pair) become that with
    ``cos.repeat_interleave(2, -1)``, what GPT-J's own function does inside.
    A keyword rather than a second function, because everything else (tables,
    broadcasting, partial rotary, errors, gradients) is the same.

    Dtypes: float32, float16, bfloat16 (float64 for gradcheck); q, k, cos and
    sin share one. The math is float32 (float64 for float64) with each product
    rounded before the add, so float32 results equal transformers' bit for bit
    and 16-bit ones are rounded once. ``position_ids`` is accepted and ignored,
    as transformers did; pass ``unsqueeze_dim`` by keyword.

    Returns new tensors of q's and k's shapes, dense, in q's and k's memory
    order (for the transposed projection view: ``[batch, seq, heads, head_dim]``
    in memory), so the attention kernel that follows reads them without a copy.

    Gradients flow to q and k (the rotation by minus the angle, one launch for
    both; exactly the transpose of the forward, so scaled tables such as YaRN's
    are right too), laid out like q and k. cos and sin are not differentiated (transformers computes them
    without gradients); a cos or sin that requires grad raises rather than
    silently getting no gradient.
    """
    if position_ids is not None and not isinstance(position_ids, Tensor):
        # transformers' current function takes unsqueeze_dim fifth: a number here was meant as that.
        _checks.fail(
            _OP,
            "position_ids",
            "to be None or a tensor (it is unused, as in transformers; pass unsqueeze_dim by keyword)",
            type(position_ids).__name__,
        )
    return _ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, interleaved)


# ---------------------------------------------------------------- fake kernels
# Shapes, dtypes and layouts only, mirroring csrc/rope.cpp's checks (same
# order, same words, through _checks) and its allocation.


def _that(ok, op: str, arg: str, expectation: Callable[[], str], got: Callable[[], str]) -> None:
    """_checks.that with the expectation formatted only on failure: formatting a symbolic size
    would specialize it, and under dynamic shapes the sequence length must stay symbolic."""
    torch._check(ok, lambda: _checks.message(op, arg, expectation(), got()))


def _check_rank(op: str, name: str, x: Tensor) -> None:
    _that(
        1 <= x.dim() <= _MAX_RANK,
        op,
        name,
        lambda: f"to have 1 to {_MAX_RANK} dimensions",
        lambda: "shape " + _checks.shape_str(x.shape),
    )


def _unsqueezed(op: str, name: str, table: Tensor, unsqueeze_dim: int) -> list:
    """The table's shape after ``table.unsqueeze(unsqueeze_dim)``."""
    _checks.dim_at_least(op, name, table, 1)
    n = table.dim()
    _that(
        -(n + 1) <= unsqueeze_dim <= n,
        op,
        "unsqueeze_dim",
        lambda: f"to be in [{-(n + 1)}, {n}] (a position for {name}.unsqueeze, {name} has {n} dimensions)",
        lambda: str(unsqueeze_dim),
    )
    pos = unsqueeze_dim + n + 1 if unsqueeze_dim < 0 else unsqueeze_dim
    sizes = list(table.shape)
    sizes.insert(pos, 1)
    return sizes


def _check_tables(op: str, cos: Tensor, c: list, sin: Tensor, s: list) -> None:
    rotary = c[-1]
    _that(
        s[-1] == rotary,
        op,
        "sin",
        lambda: f"to have the last dimension of cos unsqueezed ({rotary})",
        lambda: f"shape {_checks.shape_str(sin.shape)} ({_checks.shape_str(s)} unsqueezed)",
    )
    _that(
        rotary % 2 == 0,
        op,
        "cos",
        lambda: "to have an even last dimension (the rotary dimension, whose elements rotate in pairs)",
        lambda: f"shape {_checks.shape_str(cos.shape)} ({_checks.shape_str(c)} unsqueezed)",
    )


def _check_fits(op: str, xname: str, x: Tensor, tname: str, table: Tensor, t: list, unsqueeze_dim: int) -> None:
    _that(
        t[-1] <= x.shape[-1],
        op,
        tname,
        lambda: f"to have a last dimension (the rotary dimension) of at most the head dimension of {xname} "
        f"({x.shape[-1]})",
        lambda: "shape " + _checks.shape_str(table.shape),
    )
    nd, nt = x.dim(), len(t)
    ok = nt <= nd and all(t[i] == 1 or t[i] == x.shape[nd - nt + i] for i in range(nt - 1))
    _that(
        ok,
        op,
        tname,
        lambda: f"unsqueezed at dim {unsqueeze_dim} to broadcast to the shape of {xname} "
        f"{_checks.shape_str(x.shape)} in all but the last dimension",
        lambda: f"shape {_checks.shape_str(table.shape)} ({_checks.shape_str(t)} unsqueezed)",
    )


def _layout_strides(x: Tensor) -> Sequence[int]:
    """The strides whose order the output follows: x's, or x.contiguous()'s when its last dimension is strided."""
    if x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        return torch._prims_common.make_contiguous_strides_for(x.shape)
    return x.stride()


def _empty_in_order(like: Tensor, shape: Sequence[int], order_strides: Sequence[int]) -> Tensor:
    """csrc/rope.cpp's empty_in_order: dense, leading dims in the order of order_strides, last dim contiguous."""
    nd = len(shape)
    strides = [1] * nd
    if nd:
        order = sorted(range(nd - 1), key=lambda i: -order_strides[i])  # stable: ties keep logical order
        running = max(shape[-1], 1)
        for i in reversed(order):
            strides[i] = running
            running *= max(shape[i], 1)
    return like.new_empty_strided(tuple(shape), tuple(strides))


@torch.library.register_fake("torch_wsl::apply_rotary_pos_emb")
def _apply_rotary_pos_emb_fake(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    op = _OP
    _checks.floating(op, "q", q)
    _checks.same_device(op, "k", k, "q", q)
    _checks.same_dtype(op, "k", k, "q", q)
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.same_device(op, name, t, "q", q)
        _checks.same_dtype(op, name, t, "q", q)
    _check_rank(op, "q", q)
    _check_rank(op, "k", k)
    c = _unsqueezed(op, "cos", cos, unsqueeze_dim)
    s = _unsqueezed(op, "sin", sin, unsqueeze_dim)
    _check_tables(op, cos, c, sin, s)
    for xname, x in (("q", q), ("k", k)):
        _check_fits(op, xname, x, "cos", cos, c, unsqueeze_dim)
        _check_fits(op, xname, x, "sin", sin, s, unsqueeze_dim)
    return _empty_in_order(q, q.shape, _layout_strides(q)), _empty_in_order(k, k.shape, _layout_strides(k))


@torch.library.register_fake("torch_wsl::apply_rotary_pos_emb_backward")
def _apply_rotary_pos_emb_backward_fake(
    grad_q_embed, grad_k_embed, cos, sin, unsqueeze_dim, interleaved, q_stride, k_stride
):
    op = _BACKWARD_OP
    ref, ref_name = None, None
    if grad_q_embed is not None:
        _checks.floating(op, "grad_q_embed", grad_q_embed)
        ref, ref_name = grad_q_embed, "grad_q_embed"
    if grad_k_embed is not None:
        if ref is not None:
            _checks.same_device(op, "grad_k_embed", grad_k_embed, ref_name, ref)
            _checks.same_dtype(op, "grad_k_embed", grad_k_embed, ref_name, ref)
        else:
            _checks.floating(op, "grad_k_embed", grad_k_embed)
            ref, ref_name = grad_k_embed, "grad_k_embed"
    if ref is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            _checks.same_device(op, name, t, ref_name, ref)
            _checks.same_dtype(op, name, t, ref_name, ref)
    if grad_q_embed is not None:
        _check_rank(op, "grad_q_embed", grad_q_embed)
    if grad_k_embed is not None:
        _check_rank(op, "grad_k_embed", grad_k_embed)
    c = _unsqueezed(op, "cos", cos, unsqueeze_dim)
    s = _unsqueezed(op, "sin", sin, unsqueeze_dim)
    _check_tables(op, cos, c, sin, s)
    outs = []
    for g, name, stride_name, stride in (
        (grad_q_embed, "grad_q_embed", "q_stride", q_stride),
        (grad_k_embed, "grad_k_embed", "k_stride", k_stride),
    ):
        if g is None:
            continue
        _check_fits(op, name, g, "cos", cos, c, unsqueeze_dim)
        _check_fits(op, name, g, "sin", sin, s, unsqueeze_dim)
        _that(
            len(stride) == g.dim(),
            op,
            stride_name,
            lambda: f"to have one entry per dimension of {name} ({g.dim()})",
            lambda: f"{len(stride)} entries",
        )
    for g, stride in ((grad_q_embed, q_stride), (grad_k_embed, k_stride)):
        outs.append(cos.new_empty((0,)) if g is None else _empty_in_order(g, g.shape, stride))
    return tuple(outs)


# -------------------------------------------------------------------- autograd
# The backward is an operator too (one kernel for both gradients), so it runs
# as one launch per device and traces under torch.compile. It needs only the
# tables: q and k are not saved.


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, unsqueeze_dim, interleaved = inputs
    for name, t in (("cos", cos), ("sin", sin)):
        if t.requires_grad:
            # transformers never differentiates the tables (its rotary modules build them from a buffer);
            # an error, not a silently missing gradient, for a model that would learn them.
            _checks.fail(
                _OP,
                name,
                "not to require grad (cos and sin are not differentiated; detach them, or use transformers' "
                "function to learn them)",
                "a tensor that requires grad",
            )
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim = unsqueeze_dim
    ctx.interleaved = interleaved
    # The gradients are laid out like q_embed and k_embed, i.e. like q and k, so the views back
    # to the projections' outputs stay free and AccumulateGrad on a leaf does not copy.
    ctx.q_stride = output[0].stride()
    ctx.k_stride = output[1].stride()


def _backward(ctx, grad_q_embed, grad_k_embed):
    cos, sin = ctx.saved_tensors
    gq_in = grad_q_embed if ctx.needs_input_grad[0] else None
    gk_in = grad_k_embed if ctx.needs_input_grad[1] else None
    if gq_in is None and gk_in is None:
        return None, None, None, None, None, None
    gq, gk = _ops.apply_rotary_pos_emb_backward(
        gq_in, gk_in, cos, sin, ctx.unsqueeze_dim, ctx.interleaved, ctx.q_stride, ctx.k_stride
    )
    return (gq if gq_in is not None else None), (gk if gk_in is not None else None), None, None, None, None


torch.library.register_autograd("torch_wsl::apply_rotary_pos_emb", _backward, setup_context=_setup_context)
forbid_double_backward("torch_wsl::apply_rotary_pos_emb_backward")
