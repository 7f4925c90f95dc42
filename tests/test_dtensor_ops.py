"""The torch_wsl operators on DTensor arguments (torch_wsl/ops/_dtensor.py), in 2 real processes.

Every operator, forward and backward (autograd runs above DTensor, so the
backward operators see DTensors too), with Replicate parameters and
activations sharded on the batch (uneven: 3 or 5 rows on 2 ranks) or another
dimension the operator does not reduce over, and all-Replicate, in float32 and
bfloat16: ``full_tensor()`` of each output and gradient equals the operator's
result on the full plain tensors, and each placement is the declared one.
Then: the sharding cache keys every non-tensor argument, a small DTensor
model trains like the single-process full-batch run, torch.compile traces an
operator on DTensors, and the strategies register whichever of torch_wsl and
torch.distributed.tensor is imported first, without ``import torch_wsl``
importing DTensor.

Bitwise where each element's result depends on its own row and nothing else
(norm outputs and statistics, the norms' input gradients, rotary embeddings,
per-row losses); within a tight tolerance where a partial sum across ranks or
another summation order enters (the parameters' gradients, reduced losses).
Two CPU-kernel properties, seen on plain tensors as well, also keep a few
comparisons off bitwise (a shard moves elements between the two roundings):
the activations round an element in the vector body and in the scalar tail
differently (up to one unit in the last place), and the fused-residual norm
backward rounds the last row of each block of rows differently.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dist_utils import BACKENDS, device_for, run_workers


# --------------------------------------------------------------------- helpers
# Module level: the spawned workers import this file to find the bodies.


def _setup(rank: int):
    """The strategies registered, the mesh over both ranks and this rank's device (from the group's backend)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torch_wsl.ops import _dtensor

    _dtensor.install()  # what `import torch_wsl` does once the package calls it; idempotent
    import torch.distributed.tensor  # noqa: F401  (registers the strategies)

    assert _dtensor.is_registered()
    device = device_for(dist.get_backend(), rank)
    return init_device_mesh(device.type, (dist.get_world_size(),)), device


def _tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 2e-5, "rtol": 2e-5}


def _ulp_tolerance(dtype: torch.dtype) -> dict:
    """A unit or two in the last place: the activations' vector body and scalar tail."""
    eps = torch.finfo(dtype).eps
    return {"atol": 2 * eps, "rtol": 2 * eps}


class Case:
    """One operator call: fn(*args) on plain full tensors and on DTensors placed by `placements`.

    placements: one per argument, None for a non-tensor or a tensor kept as is; a Placement on a
    1-D mesh, a tuple of them on a larger one. diff: the indices of the arguments that require grad.
    expect_out / expect_grads: the placements the outputs and those gradients must have (same
    form; expect_grads and exact_grads count the arguments in `diff`); forbid: a placement no
    output or gradient may have. exact_out / exact_grads: those compared bitwise (the others
    within `_tolerance`, or `_ulp_tolerance` with ulp=True).
    """

    def __init__(self, label, fn, args, placements, diff=(), expect_out=(), expect_grads=(), exact_out=(),
                 exact_grads=(), ulp=False, forbid=None):
        self.label, self.fn, self.args, self.placements, self.forbid = label, fn, args, placements, forbid
        self.diff, self.expect_out, self.expect_grads = tuple(diff), tuple(expect_out), tuple(expect_grads)
        self.exact_out, self.exact_grads, self.ulp = set(exact_out), set(exact_grads), ulp


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _placements(p) -> tuple:
    return tuple(p) if isinstance(p, tuple) else (p,)


def _compare(label: str, got: torch.Tensor, want: torch.Tensor, exact: bool, ulp: bool) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{label}: {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}")
    if exact:
        diff = (got.double() - want.double()).abs().max()
        assert torch.equal(got, want), f"{label}: not bitwise equal (max difference {diff})"
    else:
        tol = _ulp_tolerance(want.dtype) if ulp else _tolerance(want.dtype)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{label}: {m}")


def _run_case(case: Case, mesh, device) -> None:
    from torch.distributed.tensor import Replicate, distribute_tensor

    def leaf(t, i):
        t = t.to(device).detach().clone()
        return t.requires_grad_() if i in case.diff else t

    plain = [leaf(a, i) if torch.is_tensor(a) else a for i, a in enumerate(case.args)]
    dist_args = []
    for i, (a, p) in enumerate(zip(case.args, case.placements)):
        if p is None:
            dist_args.append(a.to(device) if torch.is_tensor(a) else a)
        else:
            d = distribute_tensor(a.to(device), mesh, _placements(p))
            dist_args.append(d.requires_grad_() if i in case.diff else d)

    want = _as_tuple(case.fn(*plain))
    got = _as_tuple(case.fn(*dist_args))
    assert len(got) == len(want), case.label
    for j, (g, w) in enumerate(zip(got, want)):
        if j < len(case.expect_out):
            assert g.placements == _placements(case.expect_out[j]), f"{case.label}: output {j} is {g.placements}"
        assert case.forbid not in g.placements, f"{case.label}: output {j} is {g.placements}"
        _compare(f"{case.label}: output {j}", g.full_tensor(), w, j in case.exact_out, case.ulp)
    if not case.diff:
        return

    # The same cotangents for both runs; a Partial output's cotangent is Replicate.
    gen = torch.Generator().manual_seed(7)
    outs, want_cot, got_cot = [], [], []
    for g, w in zip(got, want):
        if w.requires_grad:
            cot = torch.randn(w.shape, generator=gen).to(w.dtype).to(device)
            place = [Replicate() if p.is_partial() else p for p in g.placements]
            outs.append((g, w))
            want_cot.append(cot)
            got_cot.append(distribute_tensor(cot, mesh, place))
    torch.autograd.backward([w for _, w in outs], want_cot)
    torch.autograd.backward([g for g, _ in outs], got_cot)
    for k, i in enumerate(case.diff):
        g, w = dist_args[i].grad, plain[i].grad
        assert (g is None) == (w is None), f"{case.label}: gradient of argument {i}: {g} vs {w}"
        if k < len(case.expect_grads):
            assert g.placements == _placements(case.expect_grads[k]), (
                f"{case.label}: grad of argument {i} is {g.placements}")
        assert case.forbid not in g.placements, f"{case.label}: grad of argument {i} is {g.placements}"
        _compare(f"{case.label}: grad of argument {i}", g.full_tensor(), w, k in case.exact_grads, case.ulp)


def _norm_cases(dtype):
    from torch.distributed.tensor import Partial, Replicate, Shard

    import torch_wsl

    R, P = Replicate(), Partial()
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, res, w, b = rnd(3, 4, 32), rnd(3, 4, 32), rnd(32), rnd(32)
    cases = []
    for xp in (Shard(0), Shard(1), R):
        wgrad = R if xp == R else P
        tag = f"{dtype} x {xp}"
        for mode, offset in (("torch", 0.0), ("gemma", 1.0), ("llama", 0.0)):
            cases.append(Case(
                f"rms_norm {mode} {tag}",
                lambda x, w, m=mode, o=offset: torch_wsl.ops.rms_norm(x, [32], w, 1e-6, offset=o, casting_mode=m),
                [x, w], [xp, R], diff=(0, 1), expect_out=[xp], expect_grads=[xp, wgrad], exact_out={0},
                exact_grads={0}))
        cases.append(Case(
            f"rms_norm_op {tag}", lambda x, w: torch.ops.torch_wsl.rms_norm(x, [32], w, None),
            [x, w], [xp, R], diff=(0, 1), expect_out=[xp, xp], expect_grads=[xp, wgrad], exact_out={0, 1},
            exact_grads={0}))
        # normalized over dims 1 and 2: a Shard(1) input is redistributed (to Replicate or Shard(0))
        cases.append(Case(
            f"rms_norm no weight, 2 normalized dims {tag}", lambda x: torch.ops.torch_wsl.rms_norm(x, [4, 32]),
            [x], [xp], diff=(0,), expect_out=[] if xp == Shard(1) else [xp] * 2, forbid=Shard(1),
            exact_out={0, 1}, exact_grads={0}))
        # The fused residual's input gradient is not compared bitwise: the CPU backward kernel rounds the
        # last row of each block of rows differently (by one unit in the last place) when it adds the
        # residual's gradient, and a shard moves rows between blocks (plain tensors show it too).
        cases.append(Case(
            f"add_rms_norm {tag}", lambda x, r, w: torch.ops.torch_wsl.add_rms_norm(x, r, [32], w, 1e-5),
            [x, res, w], [xp, xp, R], diff=(0, 1, 2), expect_out=[xp, xp, xp], expect_grads=[xp, xp, wgrad],
            exact_out={0, 1, 2}))
        cases.append(Case(
            f"layer_norm {tag}", lambda x, w, b: torch.ops.torch_wsl.layer_norm(x, [32], w, b, 1e-5),
            [x, w, b], [xp, R, R], diff=(0, 1, 2), expect_out=[xp, xp, xp], expect_grads=[xp, wgrad, wgrad],
            exact_out={0, 1, 2}, exact_grads={0}))
        cases.append(Case(
            f"add_layer_norm {tag}", lambda x, r, w, b: torch.ops.torch_wsl.add_layer_norm(x, r, [32], w, b),
            [x, res, w, b], [xp, xp, R, R], diff=(0, 1, 2, 3), expect_out=[xp] * 4,
            expect_grads=[xp, xp, wgrad, wgrad], exact_out={0, 1, 2, 3}))
    # Llama's float32 weight with bfloat16 input: the wrapper's ATen product promotes (DTensor's own rule).
    w32 = w.float()
    cases.append(Case(
        f"rms_norm llama float32 weight {dtype}",
        lambda x, w: torch_wsl.ops.rms_norm(x, [32], w, 1e-6, casting_mode="llama"),
        [x, w32], [Shard(0), R], diff=(0, 1), expect_out=[Shard(0)], expect_grads=[Shard(0), P], exact_out={0},
        exact_grads={0}))
    return cases


def _activation_cases(dtype):
    from torch.distributed.tensor import Replicate, Shard

    import torch_wsl

    R = Replicate()
    g = torch.Generator().manual_seed(2)
    gate, up, packed = (torch.randn(*s, generator=g).to(dtype) for s in ((3, 4, 32), (3, 4, 32), (3, 4, 64)))
    cases = []
    for p in (Shard(0), Shard(1), Shard(2), R):
        cases.append(Case(f"silu_mul {dtype} {p}", torch_wsl.ops.silu_mul, [gate, up], [p, p], diff=(0, 1),
                          expect_out=[p], expect_grads=[p, p], ulp=True))
        for approx in ("none", "tanh"):
            cases.append(Case(f"gelu_mul {approx} {dtype} {p}", lambda a, b, m=approx: torch_wsl.ops.gelu_mul(a, b, m),
                              [gate, up], [p, p], diff=(0, 1), expect_out=[p], expect_grads=[p, p], ulp=True))
        # packed: never sharded on the last dim (the gate and up halves); from Shard(2) DTensor redistributes
        expect = [p] if p != Shard(2) else []
        cases.append(Case(f"silu_mul_packed {dtype} {p}", torch_wsl.ops.silu_mul_packed, [packed], [p], diff=(0,),
                          expect_out=expect, expect_grads=expect, forbid=Shard(2), ulp=True))
        cases.append(Case(f"gelu_mul_packed tanh {dtype} {p}", lambda a: torch_wsl.ops.gelu_mul_packed(a, "tanh"),
                          [packed], [p], diff=(0,), expect_out=expect, expect_grads=expect, forbid=Shard(2),
                          ulp=True))
    return cases


def _rope_cases(dtype):
    from torch.distributed.tensor import Replicate, Shard

    import torch_wsl

    R = Replicate()
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    rope = torch_wsl.ops.apply_rotary_pos_emb
    q, k = rnd(3, 4, 6, 32), rnd(3, 2, 6, 32)  # [batch, heads, seq, head_dim], GQA
    cos_b, sin_b = rnd(3, 6, 32), rnd(3, 6, 32)  # per-batch tables
    cos_1, sin_1 = rnd(1, 6, 16), rnd(1, 6, 16)  # broadcast over the batch; partial rotary (16 of 32)
    cases = []
    for qp, tp in ((Shard(0), Shard(0)), (Shard(1), R), (Shard(2), Shard(1)), (R, R)):
        cases.append(Case(f"rope {dtype} q {qp} tables {tp}", rope, [q, k, cos_b, sin_b], [qp, qp, tp, tp],
                          diff=(0, 1), expect_out=[qp, qp], expect_grads=[qp, qp], exact_out={0, 1},
                          exact_grads={0, 1}))
        cases.append(Case(f"rope interleaved partial {dtype} q {qp}",
                          lambda *a: rope(*a, interleaved=True), [q, k, cos_1, sin_1], [qp, qp, R, R],
                          diff=(0, 1), expect_out=[qp, qp], expect_grads=[qp, qp], exact_out={0, 1},
                          exact_grads={0, 1}))
    cases.append(Case(f"rope only q differentiable {dtype}", rope, [q, k, cos_b, sin_b],
                      [Shard(0), Shard(0), Shard(0), Shard(0)], diff=(0,), expect_out=[Shard(0)] * 2,
                      expect_grads=[Shard(0)], exact_out={0, 1}, exact_grads={0}))
    # The attention projections' layout: [batch, seq, heads, head_dim] in memory, transposed to
    # [batch, heads, seq, head_dim]; the backward gets the forward's (global) strides.
    qs, ks = rnd(3, 6, 4, 32), rnd(3, 6, 2, 32)
    for p in (Shard(0), Shard(1)):
        cases.append(Case(f"rope transposed views {dtype} {p}",
                          lambda a, b, c, s: rope(a.transpose(1, 2), b.transpose(1, 2), c, s),
                          [qs, ks, cos_b, sin_b], [p, p, Shard(p.dim), Shard(p.dim)], diff=(0, 1),
                          expect_out=[Shard(0) if p == Shard(0) else Shard(2)] * 2, expect_grads=[p, p],
                          exact_out={0, 1}, exact_grads={0, 1}))
        cases.append(Case(f"rope unsqueeze_dim=2 {dtype} {p}",
                          lambda a, b, c, s: rope(a, b, c, s, unsqueeze_dim=2),
                          [qs, ks, cos_b, sin_b], [p, p, Shard(p.dim), Shard(p.dim)], diff=(0, 1),
                          expect_out=[p, p], expect_grads=[p, p], exact_out={0, 1}, exact_grads={0, 1}))
    return cases


def _loss_cases(dtype):
    from torch.distributed.tensor import Partial, Replicate, Shard

    from torch_wsl.ops.cross_entropy import cross_entropy, linear_cross_entropy

    R, P, S0 = Replicate(), Partial(), Shard(0)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 12, generator=g).to(dtype)
    target = torch.randint(0, 12, (5,), generator=g)
    target[3] = -100  # ignored
    class_weight = torch.rand(12, generator=g).to(dtype) + 0.5
    hidden = torch.randn(5, 16, generator=g).to(dtype)
    head, head_bias = (torch.randn(12, 16, generator=g) * 0.3).to(dtype), torch.randn(12, generator=g).to(dtype)
    # the wrappers' 'mean': the partial sums over the global count (DTensor reduces the count and keeps the sum partial)
    reduced = {"none": S0, "sum": P, "mean": P}
    cases = []
    for red, loss_p in reduced.items():
        for weighted in (False, True):
            opts = dict(reduction=red, label_smoothing=0.1, softcap=5.0 if weighted else None)
            cases.append(Case(
                f"cross_entropy {red} weighted={weighted} {dtype}",
                lambda x, t, w=None, o=opts: cross_entropy(x, t, w, **o),
                [logits, target, class_weight if weighted else None], [S0, S0, R if weighted else None], diff=(0,),
                expect_out=[loss_p], expect_grads=[S0], exact_out={0} if red == "none" else set(),
                exact_grads={0} if red == "none" else set()))
        cases.append(Case(
            f"linear_cross_entropy {red} {dtype}",
            lambda x, w, t, b, r=red: linear_cross_entropy(x, w, t, b, reduction=r, label_smoothing=0.1, chunk_size=2),
            [hidden, head, target, head_bias], [S0, R, S0, R], diff=(0, 1, 3), expect_out=[loss_p],
            expect_grads=[S0, P, P]))
    # The operators' own 'mean' over sharded rows: Replicate inputs (DTensor gathers them), still exact.
    cases.append(Case(
        f"cross_entropy_op mean {dtype}",
        lambda x, t, w: torch.ops.torch_wsl.cross_entropy(x, t, w, "mean", -100, 0.1, None),
        [logits, target, class_weight], [S0, S0, R], diff=(0,), expect_out=[R, R, R], exact_out={1, 2}))
    cases.append(Case(
        f"linear_cross_entropy_op mean {dtype}",
        lambda x, w, t: torch.ops.torch_wsl.linear_cross_entropy(x, w, t, None, -100, "mean", 0.0, None, None,
                                                                 [True, True, False]),
        [hidden, head, target], [S0, R, S0], expect_out=[R, R, R, R]))
    # Sharded classes / hidden units are reduced over: DTensor redistributes them to a declared strategy.
    cases.append(Case(
        f"cross_entropy classes sharded {dtype}", lambda x, t: cross_entropy(x, t, reduction="none"),
        [logits, target], [Shard(1), R], diff=(0,), forbid=Shard(1), exact_out={0}, exact_grads={0}))
    cases.append(Case(
        f"linear_cross_entropy hidden sharded {dtype}",
        lambda x, w, t: linear_cross_entropy(x, w, t, reduction="sum"), [hidden, head, target], [Shard(1), R, R],
        diff=(0, 1), forbid=Shard(1)))
    cases.append(Case(
        f"cross_entropy all-Replicate {dtype}", lambda x, t: cross_entropy(x, t, label_smoothing=0.2),
        [logits, target], [R, R], diff=(0,), expect_out=[R], expect_grads=[R], exact_out={0}, exact_grads={0}))
    return cases


def _mesh_2d_cases():
    """A 2 x 1 mesh: the strategies expand over every mesh dimension."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    import torch_wsl

    R, P = Replicate(), Partial()
    g = torch.Generator().manual_seed(8)
    x, w, gate_up = torch.randn(4, 3, 32, generator=g), torch.randn(32, generator=g), torch.randn(4, 3, 64, generator=g)
    return [
        Case("rms_norm 2-D mesh", lambda x, w: torch_wsl.ops.rms_norm(x, [32], w), [x, w],
             [(Shard(0), Shard(1)), (R, R)],
             diff=(0, 1), expect_out=[(Shard(0), Shard(1))], expect_grads=[(Shard(0), Shard(1)), (P, P)],
             exact_out={0}, exact_grads={0}),
        Case("silu_mul_packed 2-D mesh", torch_wsl.ops.silu_mul_packed, [gate_up], [(Shard(1), R)], diff=(0,),
             expect_out=[(Shard(1), R)], expect_grads=[(Shard(1), R)], ulp=True),
    ]


def _ops_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh, device = _setup(rank)
    count = 0
    for dtype in (torch.float32, torch.bfloat16):
        for case in _norm_cases(dtype) + _activation_cases(dtype) + _rope_cases(dtype) + _loss_cases(dtype):
            _run_case(case, mesh, device)
            count += 1
    mesh_2d = init_device_mesh(device.type, (world_size, 1))
    for case in _mesh_2d_cases():
        _run_case(case, mesh_2d, device)
        count += 1
    return count


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_operator_forward_and_backward_on_dtensors(backend):
    counts = run_workers(_ops_body, backend=backend)
    assert counts[0] > 100 and all(c == counts[0] for c in counts)


# ------------------------------------------------------------------ cache key


def _cache_key_body(rank, world_size):
    """Same DTensor inputs, different non-tensor arguments: each call's own placements, shapes and values.

    With register_sharding's derived key (non-tensor arguments before the first int ignored), the
    second call of each pair would reuse the first one's cached output placements and shapes.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh, device = _setup(rank)
    ops = torch.ops.torch_wsl
    R, S0 = Replicate(), Shard(0)
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def dist(t, p):
        return distribute_tensor(t, mesh, [p])

    def check(label, got, want, placements, exact=True):
        got, want = _as_tuple(got), _as_tuple(want)
        for j, (a, b) in enumerate(zip(got, want)):
            assert a.placements == (placements[j],), f"{label}: output {j} is {a.placements}, not {placements[j]}"
            _compare(f"{label}: output {j}", a.full_tensor(), b, exact, ulp=False)

    # cross_entropy's reduction: [rows] sharded, or a partial sum, or a gathered mean
    logits, target = rnd(5, 12), torch.randint(0, 12, (5,), generator=g).to(device)
    dl, dt = dist(logits, S0), dist(target, S0)
    for red, loss_p in (("none", S0), ("sum", Partial()), ("mean", R), ("none", S0)):
        check(f"cross_entropy {red}", ops.cross_entropy(dl, dt, None, red, -100, 0.0, None),
              ops.cross_entropy(logits, target, None, red, -100, 0.0, None),
              [loss_p, S0 if loss_p != R else R, Partial() if loss_p != R else R], exact=red == "none")
    # linear_cross_entropy's reduction and grad_mask (which gradients the forward forms)
    hidden, head = rnd(5, 16), rnd(12, 16)
    dh, dw = dist(hidden, S0), dist(head, R)
    for red, mask in (("sum", [True, True, False]), ("sum", [False, False, False]), ("none", [True, True, False])):
        grads = [S0 if mask[0] and red != "none" else R, Partial() if mask[1] and red != "none" else R, R]
        check(f"linear_cross_entropy {red} {mask}",
              ops.linear_cross_entropy(dh, dw, dt, None, -100, red, 0.0, None, None, mask),
              ops.linear_cross_entropy(hidden, head, target, None, -100, red, 0.0, None, None, mask),
              [S0 if red == "none" else Partial(), *grads], exact=False)
    # normalized_shape: the statistics' shape, and which dims may stay sharded
    x = rnd(3, 4, 32)
    dx1 = dist(x, Shard(1))
    check("rms_norm [32]", ops.rms_norm(dx1, [32]), ops.rms_norm(x, [32]), [Shard(1), Shard(1)])
    out = ops.rms_norm(dx1, [4, 32])
    assert out[1].shape == (3,) and Shard(1) not in out[0].placements, (out[1].shape, out[0].placements)
    _compare("rms_norm [4, 32]", out[0].full_tensor(), ops.rms_norm(x, [4, 32])[0], True, False)
    # the backward's output_mask / weight_grad: a gradient or an empty tensor
    dx = dist(x, S0)
    w, b, go = rnd(32), rnd(32), rnd(3, 4, 32)
    dw32, db32, dgo = dist(w, R), dist(b, R), dist(go, S0)
    _, mean, rstd = ops.layer_norm(x, [32], w, b)
    dmean, drstd = dist(mean, S0), dist(rstd, S0)
    for mask in ([True, True], [False, True], [True, False]):
        check(f"layer_norm_backward {mask}",
              ops.layer_norm_backward(dgo, None, dx, [32], dmean, drstd, dw32, db32, mask),
              ops.layer_norm_backward(go, None, x, [32], mean, rstd, w, b, mask),
              [S0, Partial() if mask[0] else R, Partial() if mask[1] else R], exact=False)
    rrstd = ops.rms_norm(x, [32], w)[1]
    for wanted in (True, False):
        check(f"rms_norm_backward weight_grad={wanted}",
              ops.rms_norm_backward(dgo, None, dx, [32], dist(rrstd, S0), dw32, wanted),
              ops.rms_norm_backward(go, None, x, [32], rrstd, w, wanted),
              [S0, Partial() if wanted else R], exact=False)
    # options that change only the values: gelu's approximation, rms_norm's casting mode and offset
    for approx in ("none", "tanh"):
        check(f"gelu_mul {approx}", ops.gelu_mul(dx, dgo, approx), ops.gelu_mul(x, go, approx), [S0], exact=False)
    for mode, offset in (("torch", 0.0), ("llama", 0.0), ("gemma", 1.0)):
        check(f"rms_norm {mode}", ops.rms_norm(dx, [32], dw32, 1e-6, offset, mode),
              ops.rms_norm(x, [32], w, 1e-6, offset, mode), [S0, S0])
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharding_cache_keys_every_non_tensor_argument(backend):
    results = run_workers(_cache_key_body, backend=backend)
    assert results and all(r is True for r in results)


# ---------------------------------------------------------- a model that trains


class _TinyModel(torch.nn.Module):
    """Plain nn modules around torch_wsl's: RMSNorm, a SwiGLU MLP through silu_mul, LayerNorm, a head."""

    def __init__(self, dim=32, hidden=64, vocab=40):
        import torch_wsl

        super().__init__()
        self.norm = torch_wsl.nn.RMSNorm(dim, eps=1e-6)
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)
        self.final_norm = torch_wsl.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.loss = torch_wsl.nn.CrossEntropyLoss(label_smoothing=0.05)

    def forward(self, x, target):
        import torch_wsl

        h = self.norm(x)
        x = x + self.down(torch_wsl.nn.functional.silu_mul(self.gate(h), self.up(h)))
        logits = self.head(self.final_norm(x))
        return self.loss(logits.flatten(0, -2), target.flatten())


def _train(model, x, target, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses, grad_placements = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x, target)
        loss.backward()
        if grad_placements is None and hasattr(loss, "placements"):
            grad_placements = {n: p.grad.placements for n, p in model.named_parameters()}
        losses.append(loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item())
        opt.step()
    return losses, grad_placements


def _train_body(rank, world_size, batch):
    import copy

    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_module, distribute_tensor

    mesh, device = _setup(rank)
    torch.manual_seed(0)
    model = _TinyModel().to(device)
    replicated = distribute_module(copy.deepcopy(model), mesh)  # every parameter Replicate
    x = torch.randn(batch, 5, 32, device=device)
    target = torch.randint(0, 40, (batch, 5), device=device)
    target[0, 1] = -100
    want, _ = _train(model, x, target, 3)
    got, placements = _train(replicated, distribute_tensor(x, mesh, [Shard(0)]),
                             distribute_tensor(target, mesh, [Shard(0)]), 3)
    assert all(p.placements == (Replicate(),) for p in replicated.parameters())
    assert set(placements.values()) == {(Partial(),)}, placements  # batch-sharded rows: partial sums
    for (name, p), (_, q) in zip(replicated.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.full_tensor(), q, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return want, got


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicated_model_on_a_sharded_batch_trains_like_the_full_batch(backend):
    # An even batch: DTensor's own aten.view (nn.Linear on [batch, seq, dim]) cannot flatten an uneven
    # Shard(0) (torch 2.14: "Sharding propagation failed for aten.view.default").
    results = run_workers(_train_body, backend=backend, batch=4)
    for want, got in results:
        assert len(got) == 3 and got[0] != got[2]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------- torch.compile


def _compile_body(rank, world_size):
    """rms_norm forward and backward on DTensors, traced by AOT autograd: the eager DTensor results, bitwise."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    import torch_wsl

    mesh, device = _setup(rank)
    g = torch.Generator().manual_seed(6)
    x, w, cot = (torch.randn(*s, generator=g).to(device) for s in ((3, 4, 32), (32,), (3, 4, 32)))

    def norm(x, w):
        return torch_wsl.ops.rms_norm(x, [32], w, 1e-6)

    runs = []
    for fn in (norm, torch.compile(norm, backend="aot_eager", fullgraph=True)):
        dx = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
        dw = distribute_tensor(w, mesh, [Replicate()]).requires_grad_()
        y = fn(dx, dw)
        y.backward(distribute_tensor(cot, mesh, [Shard(0)]))
        assert (y.placements, dx.grad.placements, dw.grad.placements) == ((Shard(0),), (Shard(0),), (Partial(),))
        runs.append((y.to_local(), dx.grad.to_local(), dw.grad.to_local()))
    for eager, compiled in zip(*runs):
        assert torch.equal(eager, compiled)
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_call_on_dtensors(backend):
    results = run_workers(_compile_body, backend=backend)
    assert results and all(r is True for r in results)


# ------------------------------------------------------------ registration


_OPS = ("rms_norm", "rms_norm_backward", "layer_norm", "layer_norm_backward", "add_rms_norm", "add_layer_norm",
        "silu_mul", "silu_mul_backward", "gelu_mul", "gelu_mul_backward", "silu_mul_packed",
        "silu_mul_packed_backward", "gelu_mul_packed", "gelu_mul_packed_backward", "apply_rotary_pos_emb",
        "apply_rotary_pos_emb_backward", "cross_entropy", "cross_entropy_backward", "linear_cross_entropy",
        "linear_cross_entropy_backward")

# Run in a fresh interpreter; {first} is the import order under test.
_ORDER_SCRIPT = """
import os, sys, tempfile
{first}
from torch_wsl.ops import _dtensor
_dtensor.install()  # what `import torch_wsl` does once the package calls it
dtensor_imported_early = "torch.distributed.tensor" in sys.modules
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh
import torch_wsl

assert _dtensor.is_registered()
propagator = DTensor._op_dispatcher.sharding_propagator
missing = [n for n in {ops!r} if getattr(torch.ops.torch_wsl, n).default not in propagator.op_strategy_funcs]
assert not missing, missing
assert not any(isinstance(f, _dtensor._RegisterAfterImport) for f in sys.meta_path)
loader = sys.modules["torch.distributed.tensor"].__spec__.loader
assert "exec_module" not in vars(loader), "the hook left its wrapper on the loader"
store = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
x = distribute_tensor(torch.randn(4, 8), init_device_mesh("cpu", (1,)), [Shard(0)])
assert torch.equal(torch_wsl.ops.rms_norm(x, [8]).full_tensor(), torch_wsl.ops.rms_norm(x.full_tensor(), [8]))
dist.destroy_process_group()
print("dtensor imported early:", dtensor_imported_early)
"""


def _run_script(source: str) -> str:
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("first, early", [
    pytest.param("import torch_wsl", False, id="torch_wsl-first"),
    pytest.param("import torch.distributed.tensor\nimport torch_wsl", True, id="dtensor-first"),
])
def test_strategies_register_in_either_import_order(first, early):
    """torch_wsl first: importing it (and installing the hook) must not import DTensor (about a second)."""
    out = _run_script(textwrap.dedent(_ORDER_SCRIPT).format(first=first, ops=_OPS))
    assert f"dtensor imported early: {early}" in out, out

