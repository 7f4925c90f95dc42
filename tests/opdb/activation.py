"""Gated MLP activations: silu_mul, gelu_mul (both approximations) and the packed [..., 2*I] siblings.

References are transformers' own activations (ACT2FN, what LlamaMLP, GemmaMLP
and Phi3MLP call) times up, and Phi3MLP's chunk for the packed layout.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from torch_wsl.ops import activation as act

from . import BadInput, OpInfo, Sample, make, register

_SILU = ACT2FN["silu"]
_GELU = ACT2FN["gelu"]
_GELU_TANH = ACT2FN["gelu_pytorch_tanh"]

# (leading shape, intermediate size): the hidden sizes 1, 7, 769, 5125,
# 11008 with a few rows, a 3-D batch, one longer than a few vectors.
SHAPES = [((3,), 1), ((2, 3), 7), ((4,), 769), ((2,), 5125), ((1,), 11008), ((2, 2), 33)]


def _ref_gelu_act(approximate: str):
    return _GELU_TANH if approximate == "tanh" else _GELU


def _ref_silu_mul(gate, up):
    return _SILU(gate) * up


def _ref_gelu_mul(gate, up, approximate="none"):
    return _ref_gelu_act(approximate)(gate) * up


def _ref_silu_mul_packed(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)  # Phi3MLP.forward
    return up * _SILU(gate)


def _ref_gelu_mul_packed(gate_up, approximate="none"):
    gate, up = gate_up.chunk(2, dim=-1)
    return up * _ref_gelu_act(approximate)(gate)


def _pair_samples(kwargs: dict):
    def samples(device, dtype, requires_grad):
        g = torch.Generator().manual_seed(0)
        mk = lambda shape, **kw: make(shape, dtype, device, generator=g, low=-4.0, high=4.0, **kw)  # noqa: E731
        rg = requires_grad
        for i, (lead, n) in enumerate(SHAPES):
            shape = (*lead, n)
            yield Sample((mk(shape, requires_grad=rg), mk(shape, requires_grad=rg)), dict(kwargs),
                         name=f"{list(shape)}", opcheck=i in (1, 2))
        # The halves of one [rows, 2*I] tensor: row stride 2*I, read in place.
        both = mk((5, 2 * 769)).requires_grad_(rg)
        gate, up = both.chunk(2, dim=-1)
        yield Sample((gate, up), dict(kwargs), name="chunked-views", opcheck=True)
        # Every other element (last-dimension stride 2): copied first.
        yield Sample((mk((3, 7), noncontiguous=True, requires_grad=rg), mk((3, 7), requires_grad=rg)), dict(kwargs),
                     name="strided-last-dim")
        # Transposed [I, rows] -> [rows, I] (copied), and a batch-transposed [S, B, I] view (rows do not collapse).
        gt = mk((9, 4)).requires_grad_(rg)
        yield Sample((gt.t(), mk((4, 9), requires_grad=rg)), dict(kwargs), name="transposed")
        bt = mk((3, 2, 7)).requires_grad_(rg)
        yield Sample((bt.transpose(0, 1), mk((2, 3, 7), requires_grad=rg)), dict(kwargs), name="batch-transposed")
        # Every other row of a dense tensor: row stride 2*I, in place.
        rows = mk((8, 19)).requires_grad_(rg)
        yield Sample((rows[::2], mk((4, 19), requires_grad=rg)), dict(kwargs), name="row-slice")
        yield Sample((mk((0, 16), requires_grad=rg), mk((0, 16), requires_grad=rg)), dict(kwargs), name="empty-rows",
                     opcheck=True)
        yield Sample((mk((3, 0), requires_grad=rg), mk((3, 0), requires_grad=rg)), dict(kwargs), name="empty-cols")
        yield Sample((mk((), requires_grad=rg), mk((), requires_grad=rg)), dict(kwargs), name="0-dim")

    return samples


def _packed_samples(kwargs: dict):
    def samples(device, dtype, requires_grad):
        g = torch.Generator().manual_seed(0)
        mk = lambda shape, **kw: make(shape, dtype, device, generator=g, low=-4.0, high=4.0, **kw)  # noqa: E731
        rg = requires_grad
        for i, (lead, n) in enumerate(SHAPES):
            shape = (*lead, 2 * n)
            yield Sample((mk(shape, requires_grad=rg),), dict(kwargs), name=f"{list(shape)}", opcheck=i in (1, 2))
        # A column slice of a wider projection output: row stride beyond 2*I, read in place.
        wide = mk((4, 2 * 33 + 5)).requires_grad_(rg)
        yield Sample((wide[:, 3 : 3 + 2 * 33],), dict(kwargs), name="column-slice", opcheck=True)
        yield Sample((mk((3, 2 * 7), noncontiguous=True, requires_grad=rg),), dict(kwargs), name="strided-last-dim")
        bt = mk((3, 2, 2 * 7)).requires_grad_(rg)
        yield Sample((bt.transpose(0, 1),), dict(kwargs), name="batch-transposed")
        yield Sample((mk((0, 2 * 16), requires_grad=rg),), dict(kwargs), name="empty-rows", opcheck=True)
        yield Sample((mk((3, 0), requires_grad=rg),), dict(kwargs), name="empty-cols")
        yield Sample((mk((2,), requires_grad=rg),), dict(kwargs), name="1-dim")

    return samples


def _pair_bad(name: str):
    def bad():
        x = torch.randn(4, 8)
        yield BadInput((x, torch.randn(4, 7)), match=rf"torch_wsl\.{name}: expected up to have the shape of gate "
                       r"\[4, 8\], got \[4, 7\]", name="shape")
        yield BadInput((x, torch.randn(8)), match=r"expected up to have the shape of gate \[4, 8\], got \[8\]",
                       name="no-broadcasting")
        yield BadInput((x.long(), x.long()), match=r"expected gate to have a floating dtype.*got int64",
                       name="int-gate")
        yield BadInput((x, x.int()), match=r"expected up to have the dtype of gate \(float32\), got int32",
                       name="int-up")
        yield BadInput((x, x.half()), match=r"expected up to have the dtype of gate \(float32\), got float16",
                       name="dtype")
        if name.startswith("gelu"):
            yield BadInput((x, x), {"approximate": "sigmoid"}, match=rf"torch_wsl\.{name}: expected approximate to "
                           r"be 'none' or 'tanh', got 'sigmoid'", name="approximate")

    return bad


def _packed_bad(name: str):
    def bad():
        yield BadInput((torch.randn(4, 7),), match=rf"torch_wsl\.{name}: expected gate_up to have an even last "
                       r"dimension \(the gate half, then the up half\), got shape \[4, 7\]", name="odd")
        yield BadInput((torch.randn(()),), match=r"expected gate_up to have at least 1 dimensions, got shape \[\]",
                       name="0-dim")
        yield BadInput((torch.ones(4, 8, dtype=torch.int64),), match=r"expected gate_up to have a floating dtype.*got "
                       r"int64", name="int")
        if name.startswith("gelu"):
            yield BadInput((torch.randn(4, 8),), {"approximate": "exact"}, match=r"expected approximate to be 'none' "
                           r"or 'tanh', got 'exact'", name="approximate")

    return bad


register(
    OpInfo("silu_mul", act.silu_mul, _ref_silu_mul, _pair_samples({}), _pair_bad("silu_mul")),
    OpInfo("gelu_mul", act.gelu_mul, _ref_gelu_mul, _pair_samples({}), _pair_bad("gelu_mul")),
    # The tanh approximation's bad inputs are gelu_mul's (the same checks).
    OpInfo("gelu_mul_tanh", act.gelu_mul, _ref_gelu_mul, _pair_samples({"approximate": "tanh"})),
    OpInfo("silu_mul_packed", act.silu_mul_packed, _ref_silu_mul_packed, _packed_samples({}),
           _packed_bad("silu_mul_packed")),
    OpInfo("gelu_mul_packed", act.gelu_mul_packed, _ref_gelu_mul_packed, _packed_samples({}),
           _packed_bad("gelu_mul_packed")),
    OpInfo("gelu_mul_packed_tanh", act.gelu_mul_packed, _ref_gelu_mul_packed, _packed_samples({"approximate": "tanh"})),
)
