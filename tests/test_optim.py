"""Fused optimizers (torch_wsl.optim) against torch.optim's single-tensor implementation."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_wsl
from conftest import DEVICES, HAS_CUDA_KERNELS, HAS_GPU, TRAIN_DTYPES, cuda_only

# Odd sizes, several ranks, a one-element and an empty tensor.
SHAPES = [(769,), (33, 17), (5,), (3, 5, 7), (1,), (0,), (130,)]
STEPS = 100

# float32: within 1e-6 relative (atol 1e-6 on O(1) values). torch.optim's
# foreach=False path takes its square roots from MKL, which are off by one ulp
# in ~15% of elements; torch_wsl's are correctly rounded (as torch's fused=True).
# float16/bfloat16: torch.optim rounds after every operation, torch_wsl once per
# step from float32, so they agree to a few units of the dtype's precision.
TRAJ_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


def _params(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in SHAPES]


class _GradSource:
    """Deterministic gradients that depend on the parameters (a noisy quadratic pull to a target)."""

    def __init__(self, params, seed=1):
        self.gen = torch.Generator().manual_seed(seed)
        self.targets = [torch.randn(p.shape, generator=self.gen) for p in params]

    def next(self):
        noise = [torch.randn(t.shape, generator=self.gen) * 0.5 for t in self.targets]
        return noise

    @staticmethod
    def assign(params, noise, targets, skip=(), via=None):
        """Gradients in the parameters' dtype, rounded to `via` first when given."""
        for i, (p, n, t) in enumerate(zip(params, noise, targets)):
            if i in skip:
                p.grad = None
                continue
            g = 0.1 * (p.detach().double() - t.to(p.device).double()) + n.to(p.device).double()
            p.grad = g.to(via or p.dtype).to(p.dtype)


def _twin_runs(ours_cls, ref_cls, groups_fn, device, dtype, steps=STEPS, ref_kwargs=None, skip_fn=None, sched=None):
    """Runs torch_wsl and torch.optim side by side on identical parameters and gradients."""
    base = _params(device, dtype)
    ours_p = [p.clone().requires_grad_() for p in base]
    ref_p = [p.clone().requires_grad_() for p in base]
    ours = ours_cls(groups_fn(ours_p))
    ref = ref_cls(groups_fn(ref_p), **(ref_kwargs or {}))
    src = _GradSource(base)
    scheds = [sched(ours), sched(ref)] if sched else []
    for step in range(steps):
        noise = src.next()
        skip = skip_fn(step) if skip_fn else ()
        _GradSource.assign(ours_p, noise, src.targets, skip)
        _GradSource.assign(ref_p, noise, src.targets, skip)
        ours.step()
        ref.step()
        for s in scheds:
            s.step()
    return ours, ref, ours_p, ref_p


def _assert_same_trajectory(ours, ref, ours_p, ref_p, dtype):
    tol = TRAJ_TOL[dtype]
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(ours_p, ref_p):
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert set(sa) == set(sb)
        for key in sa:
            if key == "step":
                assert float(sa[key]) == float(sb[key])
            else:
                scale = max(sb[key].abs().max().item(), 1e-12) if sb[key].numel() else 1.0
                torch.testing.assert_close(sa[key], sb[key], rtol=tol["rtol"] * 10, atol=tol["atol"] * scale)


def _lr(value, as_tensor, device):
    return torch.tensor(value, device=device) if as_tensor else value


def _adam_groups(lr, weight_decay, amsgrad, maximize, lr_tensor, device, eps=1e-8):
    def groups(ps):
        return [
            {"params": ps[:4], "lr": _lr(lr, lr_tensor, device), "weight_decay": weight_decay, "amsgrad": amsgrad,
             "maximize": maximize, "eps": eps},
            {"params": ps[4:], "lr": _lr(lr * 0.5, lr_tensor, device), "betas": (0.8, 0.99), "eps": eps * 100,
             "weight_decay": weight_decay * 2, "amsgrad": amsgrad, "maximize": maximize},
        ]

    return groups


ADAM_COMBOS = list(itertools.product([False, True], [False, True], [0.0, 0.1], [False, True]))


def _combo_id(c):
    amsgrad, maximize, wd, lr_tensor = c
    return f"{'ams' if amsgrad else 'noams'}-{'max' if maximize else 'min'}-wd{wd}-{'lrT' if lr_tensor else 'lrF'}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("combo", ADAM_COMBOS, ids=_combo_id)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_trajectory_float32(device, name, combo):
    amsgrad, maximize, wd, lr_tensor = combo
    groups = _adam_groups(1e-2, wd, amsgrad, maximize, lr_tensor, device)
    run = _twin_runs(getattr(torch_wsl.optim, name), getattr(torch.optim, name), groups, device, torch.float32,
                     ref_kwargs={"foreach": False})
    _assert_same_trajectory(*run, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_large_and_misaligned_tensors(device, amsgrad):
    # A tensor of several CUDA chunks (16384 elements each) with a short last
    # one, and a parameter one element into its storage (no vector loads).
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(2 * 16384 + 5, generator=g), torch.randn(1001, generator=g)]
    def make():
        big = base[0].clone().to(device).requires_grad_()
        shifted = base[1].clone().to(device)[1:].detach().requires_grad_()
        assert shifted.storage_offset() == 1
        return [big, shifted]
    ours_p, ref_p = make(), make()
    ours = torch_wsl.optim.AdamW(ours_p, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in ours_p]
        for p, q, gr in zip(ours_p, ref_p, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, **TRAJ_TOL[torch.float32])


def _max_dev(params, ref64):
    return max((a.double() - b).abs().max().item() for a, b in zip(params, ref64) if a.numel())


@functools.cache
def _torch_fused_updates_every_element(ref_cls, device, dtype) -> bool:
    """Whether the running torch's own fused=True step writes every element of a `dtype` tensor.

    torch 2.13.0's CPU fused SGD for float16/bfloat16 does not: it stores only the scalar tail of
    each tensor, and the elements in full SIMD vectors keep their old values (2.14.1's is correct).
    Where it fails, the half-precision tests compare with the written-out reference alone."""
    p = torch.ones(67, device=device, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    ref_cls([p], lr=0.5, fused=True).step()
    return bool((p.detach() != 1).all())


def _rounded_once_run(ref_cls, groups_fn, device, dtype, steps=STEPS):
    """The float16/bfloat16 semantics of torch's fused=True (and of torch_wsl), written out:
    torch.optim's arithmetic in float32, with parameters, gradients and optimizer state rounded to
    `dtype` once per step. Returns the parameters after `steps` steps, in `dtype`."""
    base = _params(device, dtype)
    shadow = [p.float().requires_grad_() for p in base]
    opt = ref_cls(groups_fn(shadow), foreach=False)
    src = _GradSource(base)
    for _ in range(steps):
        _GradSource.assign(shadow, src.next(), src.targets, via=dtype)
        opt.step()
        with torch.no_grad():
            for p in shadow:
                p.copy_(p.to(dtype))
                for key, t in opt.state[p].items():
                    if key != "step" and torch.is_tensor(t):
                        t.copy_(t.to(dtype))
    return [p.detach().to(dtype) for p in shadow]


def _rounded_once_refs(ref_cls, groups_fn, device, dtype, fused_p, steps=STEPS):
    """The trajectories a float16/bfloat16 run must follow: the written-out reference, and torch's
    fused=True run (`fused_p`) where the running torch's fused step is sound."""
    refs = [_rounded_once_run(ref_cls, groups_fn, device, dtype, steps)]
    if _torch_fused_updates_every_element(ref_cls, device, dtype):
        refs.append(fused_p)
    return refs


def _half_checks(name, groups, device, dtype):
    """float16/bfloat16: torch.optim's foreach=False rounds to the dtype after every operation,
    torch_wsl (like torch's fused=True) once per step from float32 arithmetic. So: the same
    trajectory as that arithmetic written out and as fused=True (where the running torch's is
    sound), and no further from the exact (float64) trajectory than foreach=False."""
    ours_cls, ref_cls = getattr(torch_wsl.optim, name), getattr(torch.optim, name)
    ours, fused, ours_p, fused_p = _twin_runs(ours_cls, ref_cls, groups, device, dtype, ref_kwargs={"fused": True})
    _, single, _, single_p = _twin_runs(ours_cls, ref_cls, groups, device, dtype, ref_kwargs={"foreach": False})
    _, _, exact_p, _ = _twin_runs(ref_cls, ref_cls, groups, device, torch.float64, steps=STEPS,
                                  ref_kwargs={"foreach": False})
    eps = torch.finfo(dtype).eps
    for ref_p in _rounded_once_refs(ref_cls, groups, device, dtype, fused_p):
        for a, b in zip(ours_p, ref_p):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=2 * eps, atol=2 * eps)
    for a in ours_p:
        for key, t in ours.state[a].items():
            assert t.dtype == (torch.float32 if key == "step" else dtype)
    ours_dev, single_dev = _max_dev(ours_p, exact_p), _max_dev(single_p, exact_p)
    assert ours_dev <= single_dev * 1.01 + 4 * eps, (ours_dev, single_dev)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES[1:])
@pytest.mark.parametrize("combo", [(False, False, 0.1, False), (True, True, 0.0, True)], ids=_combo_id)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_trajectory_half(device, dtype, name, combo):
    amsgrad, maximize, wd, lr_tensor = combo
    # eps=1e-8 rounds to 0 in float16, where torch.optim's per-operation rounding then divides by 0.
    _half_checks(name, _adam_groups(1e-2, wd, amsgrad, maximize, lr_tensor, device, eps=1e-4), device, dtype)


SGD_COMBOS = [
    (m, d, n, wd, mx, lt)
    for (m, d, n) in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)]
    for wd in (0.0, 0.1)
    for mx in (False, True)
    for lt in (False, True)
]


def _sgd_id(c):
    m, d, n, wd, mx, lt = c
    return f"m{m}-d{d}-{'nest' if n else 'plain'}-wd{wd}-{'max' if mx else 'min'}-{'lrT' if lt else 'lrF'}"


def _sgd_groups(momentum, dampening, nesterov, wd, maximize, lr_tensor, device):
    def groups(ps):
        return [
            {"params": ps[:4], "lr": _lr(1e-2, lr_tensor, device), "momentum": momentum, "dampening": dampening,
             "nesterov": nesterov, "weight_decay": wd, "maximize": maximize},
            {"params": ps[4:], "lr": _lr(3e-3, lr_tensor, device), "momentum": momentum * 0.5,
             "dampening": dampening, "nesterov": nesterov, "weight_decay": wd * 2, "maximize": maximize},
        ]

    return groups


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("combo", SGD_COMBOS, ids=_sgd_id)
def test_sgd_trajectory_float32(device, combo):
    run = _twin_runs(torch_wsl.optim.SGD, torch.optim.SGD, _sgd_groups(*combo, device), device, torch.float32,
                     ref_kwargs={"foreach": False})
    _assert_same_trajectory(*run, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES[1:])
@pytest.mark.parametrize("combo", [SGD_COMBOS[9], SGD_COMBOS[31]], ids=_sgd_id)
def test_sgd_trajectory_half(device, dtype, combo):
    _half_checks("SGD", _sgd_groups(*combo, device), device, dtype)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_every_cpu_isa(cpu_isa, name):
    """Each SIMD build of the CPU kernels follows torch.optim (sizes leave vector tails)."""
    if name == "SGD":
        groups = _sgd_groups(0.9, 0.0, True, 0.1, False, False, "cpu")
    else:
        groups = _adam_groups(1e-2, 0.1, True, False, False, "cpu")
    for dtype, ref_kwargs, tol in [
        (torch.float32, {"foreach": False}, TRAJ_TOL[torch.float32]),
        (torch.bfloat16, {"fused": True}, dict(rtol=2 * 2.0**-7, atol=2 * 2.0**-7)),  # see _half_checks
    ]:
        ref_cls = getattr(torch.optim, name)
        run = _twin_runs(getattr(torch_wsl.optim, name), ref_cls, groups, "cpu", dtype, steps=30, ref_kwargs=ref_kwargs)
        refs = [run[3]] if dtype == torch.float32 else _rounded_once_refs(ref_cls, groups, "cpu", dtype, run[3], 30)
        for ref_p in refs:
            for a, b in zip(run[2], ref_p):
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_params_without_grad_are_skipped(device):
    """grad None for some parameters on some steps: no update, no state, no step count, as torch."""
    skip_fn = lambda step: (0, 2) if step < 10 else ((3,) if step % 3 == 0 else ())  # noqa: E731
    for ours_cls, ref_cls, groups in [
        (torch_wsl.optim.AdamW, torch.optim.AdamW, _adam_groups(1e-2, 0.1, False, False, False, device)),
        (torch_wsl.optim.SGD, torch.optim.SGD, _sgd_groups(0.9, 0.3, False, 0.1, False, False, device)),
    ]:
        run = _twin_runs(ours_cls, ref_cls, groups, device, torch.float32, steps=25, ref_kwargs={"foreach": False},
                         skip_fn=skip_fn)
        _assert_same_trajectory(*run, torch.float32)


def test_late_first_gradient_sgd_momentum():
    """A parameter whose first gradient arrives late gets its momentum buffer from that gradient."""
    skip_fn = lambda step: (1,) if step < 5 else ()  # noqa: E731
    run = _twin_runs(torch_wsl.optim.SGD, torch.optim.SGD, _sgd_groups(0.9, 0.3, False, 0.0, False, False, "cpu"),
                     "cpu", torch.float32, steps=12, ref_kwargs={"foreach": False}, skip_fn=skip_fn)
    _assert_same_trajectory(*run, torch.float32)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_lr_scheduler(name):
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)  # noqa: E731
    if name == "SGD":
        groups = _sgd_groups(0.9, 0.0, False, 0.0, False, False, "cpu")
    else:
        groups = _adam_groups(1e-2, 0.1, False, False, False, "cpu")
    ours, ref, ours_p, ref_p = _twin_runs(getattr(torch_wsl.optim, name), getattr(torch.optim, name), groups, "cpu",
                                          torch.float32, steps=30, ref_kwargs={"foreach": False}, sched=sched)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
    assert ours.param_groups[0]["lr"] < 1e-2 / 8
    _assert_same_trajectory(ours, ref, ours_p, ref_p, torch.float32)


def test_add_param_group_and_zero_grad():
    base = _params("cpu", torch.float32)
    ours_p = [p.clone().requires_grad_() for p in base]
    ref_p = [p.clone().requires_grad_() for p in base]
    ours = torch_wsl.optim.AdamW(ours_p[:3], lr=1e-2)
    ref = torch.optim.AdamW(ref_p[:3], lr=1e-2, foreach=False)
    src = _GradSource(base)
    for step in range(20):
        if step == 8:
            ours.add_param_group({"params": ours_p[3:], "lr": 3e-3, "amsgrad": True})
            ref.add_param_group({"params": ref_p[3:], "lr": 3e-3, "amsgrad": True})
        noise = src.next()
        _GradSource.assign(ours_p, noise, src.targets)
        _GradSource.assign(ref_p, noise, src.targets)
        ours.step()
        ref.step()
        ours.zero_grad(set_to_none=step % 2 == 0)
        ref.zero_grad(set_to_none=step % 2 == 0)
    assert all((p.grad is None) == (q.grad is None) for p, q in zip(ours_p, ref_p))
    assert all(p.grad is None or not p.grad.any() for p in ours_p)
    _assert_same_trajectory(ours, ref, ours_p, ref_p, torch.float32)


# ------------------------------------------------------------- state_dict


def _train(opt, params, src, steps):
    for _ in range(steps):
        _GradSource.assign(params, src.next(), src.targets)
        opt.step()


@pytest.mark.parametrize("direction", ["torch_to_wsl", "wsl_to_torch"])
@pytest.mark.parametrize(
    "name,kwargs",
    [("AdamW", {"amsgrad": True, "weight_decay": 0.05}), ("Adam", {}), ("SGD", {"momentum": 0.9, "dampening": 0.1})],
    ids=["AdamW-amsgrad", "Adam", "SGD-momentum"],
)
def test_state_dict_cross_loading(direction, name, kwargs):
    """A checkpoint of either class loads into the other; both then continue on the same trajectory."""
    kwargs = {"lr": 1e-2, **kwargs}
    wsl_cls, torch_cls = getattr(torch_wsl.optim, name), getattr(torch.optim, name)
    first_cls, second_cls = (torch_cls, wsl_cls) if direction == "torch_to_wsl" else (wsl_cls, torch_cls)
    make = lambda cls, ps: cls(ps, **kwargs, **({"foreach": False} if cls is torch_cls else {}))  # noqa: E731

    base = _params("cpu", torch.float32)
    src = _GradSource(base)
    first_p = [p.clone().requires_grad_() for p in base]
    first = make(first_cls, first_p)
    _train(first, first_p, src, 15)
    saved = copy.deepcopy(first.state_dict())

    # Same structure as the other class writes: keys of groups and of per-parameter state.
    twin = make(second_cls, [p.clone().requires_grad_() for p in base])
    _train(twin, list(twin.param_groups[0]["params"]), _GradSource(base), 1)
    twin_sd = twin.state_dict()
    assert set(saved["param_groups"][0]) == set(twin_sd["param_groups"][0])
    assert {k: set(v) for k, v in saved["state"].items()} == {k: set(v) for k, v in twin_sd["state"].items()}

    second_p = [p.detach().clone().requires_grad_() for p in first_p]
    second = make(second_cls, second_p)
    second.load_state_dict(saved)
    src_a = copy.deepcopy(src)
    src_b = copy.deepcopy(src)
    _train(first, first_p, src_a, 25)
    _train(second, second_p, src_b, 25)
    for a, b in zip(first_p, second_p):
        torch.testing.assert_close(a, b, **TRAJ_TOL[torch.float32])
    # And the loaded optimizer's own checkpoint still loads back into the first class.
    first_cls_again = make(first_cls, [p.detach().clone().requires_grad_() for p in second_p])
    first_cls_again.load_state_dict(second.state_dict())


def test_state_dict_format_matches_torch():
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours = torch_wsl.optim.AdamW([p], lr=1e-2, amsgrad=True)
    ref = torch.optim.AdamW([q], lr=1e-2, amsgrad=True)
    p.grad = torch.ones(10)
    q.grad = torch.ones(10)
    ours.step()
    ref.step()
    a, b = ours.state_dict(), ref.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert a["state"][0]["step"].dtype == torch.float32 and a["state"][0]["step"].dim() == 0
    assert isinstance(ours, torch.optim.AdamW)
    assert isinstance(torch_wsl.optim.SGD([torch.zeros(1, requires_grad=True)]), torch.optim.SGD)


def test_load_torch_checkpoint_with_float64_steps():
    """torch.optim under a float64 default dtype keeps float64 steps on the CPU; they load and advance."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = torch.randn(7, dtype=torch.float32, requires_grad=True)
        ref = torch.optim.Adam([p], lr=1e-2, foreach=False)
        p.grad = torch.ones(7, dtype=torch.float32)
        ref.step()
        sd = ref.state_dict()
    finally:
        torch.set_default_dtype(prev)
    assert sd["state"][0]["step"].dtype == torch.float64
    q = p.detach().clone().requires_grad_()
    ours = torch_wsl.optim.Adam([q], lr=1e-2)
    ours.load_state_dict(sd)
    q.grad = torch.ones(7, dtype=torch.float32)
    ours.step()
    assert ours.state[q]["step"].dtype == torch.float32 and float(ours.state[q]["step"]) == 2.0


# ------------------------------------------------------------ GradScaler


def _scaler_run(opt_cls, device, inject, steps=24, **kwargs):
    base = _params(device, torch.float32)
    params = [p.clone().requires_grad_() for p in base]
    opt = opt_cls(params, lr=1e-2, **kwargs)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=4)
    src = _GradSource(base)
    history = []
    for step in range(steps):
        _GradSource.assign(params, src.next(), src.targets)
        for p in params:
            p.grad = scaler.scale(p.grad)  # as backward of a scaled loss leaves them
        if step in inject:
            params[inject[step][0]].grad.view(-1)[0] = inject[step][1]
        before = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"]))
        scaler.step(opt)
        scaler.update()
        history.append((before, [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"]),
                        scaler.get_scale()))
    return params, opt, history


INJECT = {3: (0, float("inf")), 9: (3, float("nan")), 10: (1, -float("inf")), 17: (6, float("nan"))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,kwargs",
    [("AdamW", {"amsgrad": True}), ("Adam", {"weight_decay": 0.1}), ("SGD", {"momentum": 0.9}), ("SGD", {})],
    ids=["AdamW-amsgrad", "Adam-wd", "SGD-momentum", "SGD"],
)
def test_grad_scaler_skips_non_finite_steps(device, name, kwargs):
    ours_p, ours, ours_h = _scaler_run(getattr(torch_wsl.optim, name), device, INJECT, **kwargs)
    ref_p, ref, ref_h = _scaler_run(getattr(torch.optim, name), device, INJECT, foreach=False, **kwargs)
    assert ours._step_supports_amp_scaling
    # The scale evolves exactly as with torch.optim (backoff on the injected steps, growth in between).
    assert [h[3] for h in ours_h] == [h[3] for h in ref_h]
    for step, (before, after, state, _) in enumerate(ours_h):
        if step in INJECT:  # skipped: parameters and state untouched
            for a, b in zip(before[0], after):
                assert torch.equal(a, b)
            assert before[1].keys() == state.keys()
            for k in state:
                for key in state[k]:
                    assert torch.equal(before[1][k][key], state[k][key])
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, **TRAJ_TOL[torch.float32])
    for a, b in zip(ours_p, ref_p):
        for key in ours.state[a]:
            if key == "step":
                assert float(ours.state[a][key]) == float(ref.state[b][key]) == len(ours_h) - len(INJECT)


@pytest.mark.parametrize("name,kwargs", [("AdamW", {}), ("SGD", {"momentum": 0.9, "dampening": 0.5})])
def test_grad_scaler_skipped_first_step_creates_no_state(name, kwargs):
    inject = {0: (0, float("inf"))}
    ours_p, ours, ours_h = _scaler_run(getattr(torch_wsl.optim, name), "cpu", inject, steps=6, **kwargs)
    ref_p, ref, ref_h = _scaler_run(getattr(torch.optim, name), "cpu", inject, steps=6, foreach=False, **kwargs)
    assert ours_h[0][2] == {} and ref_h[0][2] == {}
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, **TRAJ_TOL[torch.float32])


def test_grad_scaler_with_unscale_then_clip():
    """The usual AMP recipe: unscale_, clip, step (grads already unscaled, found_inf still honored)."""
    runs = []
    for opt_cls, clip, extra in [
        (torch_wsl.optim.AdamW, torch_wsl.nn.utils.clip_grad_norm_, {}),
        (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_, {"foreach": False}),
    ]:
        base = _params("cpu", torch.float32)
        params = [p.clone().requires_grad_() for p in base]
        opt = opt_cls(params, lr=1e-2, **extra)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        src = _GradSource(base)
        for step in range(12):
            _GradSource.assign(params, src.next(), src.targets)
            for p in params:
                p.grad = scaler.scale(p.grad)
            if step == 5:
                params[0].grad.view(-1)[3] = float("inf")
            scaler.unscale_(opt)
            clip(params, 1.0)
            scaler.step(opt)
            scaler.update()
        runs.append((params, scaler.get_scale()))
    assert runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, **TRAJ_TOL[torch.float32])


# ------------------------------------------------------------ one operator per group


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":  # torch.optim's step() opens a profiler range
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_one_operator_per_group_per_step(name):
    if name == "SGD":
        groups = _sgd_groups(0.9, 0.0, False, 0.1, False, True, "cpu")
    else:
        groups = _adam_groups(1e-2, 0.1, True, False, True, "cpu")
    params = [p.requires_grad_() for p in _params("cpu", torch.float32)]
    opt = getattr(torch_wsl.optim, name)(groups(params))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the state
    with _Count() as counter:
        opt.step()
    expected = {"Adam": "torch_wsl.adam_", "AdamW": "torch_wsl.adamw_", "SGD": "torch_wsl.sgd_"}[name]
    assert counter.ops == [expected, expected]  # two parameter groups


# ------------------------------------------------------------ bad input


def test_sparse_gradient_is_rejected_before_any_update():
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    opt = torch_wsl.optim.AdamW([{"params": [a]}, {"params": [b]}])
    a.grad = torch.ones(4)
    b.grad = torch.ones(4).to_sparse()
    a0 = a.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(a, a0) and len(opt.state) == 0


def test_complex_and_integer_parameters_are_rejected():
    c = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    c.grad = torch.ones_like(c)
    with pytest.raises(RuntimeError, match="complex parameters"):
        torch_wsl.optim.Adam([c]).step()
    ops = torch.ops.torch_wsl
    i = torch.ones(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"params\[0\].*floating dtype.*int64"):
        ops.sgd_([i], [i], [], weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False,
                 maximize=False, is_first_step=False)


def _adam_args(n=2, **over):
    p = [torch.randn(5) for _ in range(n)]
    args = dict(params=p, grads=[torch.randn(5) for _ in p], exp_avgs=[torch.zeros(5) for _ in p],
                exp_avg_sqs=[torch.zeros(5) for _ in p], max_exp_avg_sqs=[], state_steps=[torch.zeros(()) for _ in p])
    args.update(over)
    return args


def _call_adam(args, **kw):
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "eps": 1e-8, "amsgrad": False,
          "maximize": False, **kw}
    torch.ops.torch_wsl.adamw_(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
                               args["max_exp_avg_sqs"], args["state_steps"], **kw)


@pytest.mark.parametrize(
    "over,kw,pattern",
    [
        ({"grads": [torch.randn(5)]}, {}, r"grads to hold 2 tensors.*got 1"),
        ({"state_steps": [torch.zeros(())]}, {}, r"state_steps to hold 2 tensors"),
        ({}, {"amsgrad": True}, r"max_exp_avg_sqs to hold 2 tensors"),
        ({"grads": [torch.randn(5), torch.randn(6)]}, {}, r"grads\[1\] to have the shape of params\[1\]"),
        ({"exp_avgs": [torch.zeros(5), torch.zeros(5).double()]}, {}, r"exp_avgs\[1\] to have the dtype of params"),
        ({"state_steps": [torch.zeros(()), torch.zeros((), dtype=torch.int64)]}, {}, r"state_steps\[1\].*float32"),
        ({"grads": [torch.randn(5), torch.randn(5).to_sparse()]}, {}, r"grads\[1\] to be a dense.*sparse"),
        ({}, {"beta1": 1.0}, r"beta1 in \[0, 1\)"),
        ({}, {"lr": -1.0}, r"lr >= 0"),
    ],
)
def test_bad_operator_input_names_the_argument_and_writes_nothing(over, kw, pattern):
    args = _adam_args(**over)
    before = [t.clone() for t in args["params"] + args["exp_avgs"] + args["state_steps"]]
    with pytest.raises(RuntimeError, match=pattern):
        _call_adam(args, **kw)
    after = args["params"] + args["exp_avgs"] + args["state_steps"]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_differentiable_is_rejected():
    with pytest.raises(RuntimeError, match="differentiable"):
        torch_wsl.optim.AdamW([torch.zeros(1, requires_grad=True)], differentiable=True)


def test_tensors_on_different_devices_are_rejected():
    """One call takes one device's tensors (the optimizers call the operator once per device)."""
    args = _adam_args()
    args["exp_avgs"] = [args["exp_avgs"][0], args["exp_avgs"][1].to("meta")]
    # A meta tensor in the lists selects the fake kernel, which checks devices as the real ones do.
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] to be on the device of params\[0\] \(cpu\)"):
        _call_adam(args)
    if HAS_GPU and HAS_CUDA_KERNELS:
        args = _adam_args()
        args["grads"] = [args["grads"][0], args["grads"][1].cuda()]
        with pytest.raises(RuntimeError, match=r"grads\[1\] to be on the device of params\[0\]"):
            _call_adam(args)


def test_fake_kernel_checks_lengths():
    args = _adam_args(grads=[torch.randn(5)])
    with pytest.raises(RuntimeError, match="grads to hold 2 tensors"):
        with torch._subclasses.FakeTensorMode() as mode:
            fake = {k: [mode.from_tensor(t) for t in v] for k, v in args.items()}
            _call_adam(fake)


def test_non_dense_tensors_are_staged():
    """A strided view parameter and a gradient in another layout still step correctly."""
    base = torch.randn(6, 10)
    ours = base.clone()
    ref = base.clone()
    view_ours = ours[:, ::2]  # not dense: the kernel works on a staged copy that is written back
    p_ref = ref[:, ::2].clone().requires_grad_()
    g = torch.randn(5, 6).t()  # a transposed gradient
    st = {"exp_avg": torch.zeros(6, 5), "exp_avg_sq": torch.zeros(6, 5), "step": torch.zeros(())}
    _call_adam(_adam_args(1, params=[view_ours], grads=[g], exp_avgs=[st["exp_avg"]], exp_avg_sqs=[st["exp_avg_sq"]],
                          state_steps=[st["step"]]), lr=1e-2)
    p_ref.grad = g.contiguous()
    torch.optim.AdamW([p_ref], lr=1e-2, weight_decay=0.0, fused=True).step()
    torch.testing.assert_close(view_ours, p_ref.detach(), rtol=0, atol=0)
    assert torch.equal(ours[:, 1::2], base[:, 1::2])  # the other columns are untouched
    assert float(st["step"]) == 1.0


# ------------------------------------------------------------ opcheck


def _opcheck_samples(device):
    def t(*s):
        return torch.randn(*s, device=device)

    ps = [t(7), t(3, 5)]

    def lists(amsgrad):
        return (
            [p.clone() for p in ps], [p.clone() for p in ps], [p.clone() * 0.1 for p in ps],
            [p.clone().abs() for p in ps], [p.clone().abs() + 1 for p in ps] if amsgrad else [],
            [torch.full((), 3.0, device=device) for _ in ps],
        )

    ops = torch.ops.torch_wsl
    hyper = dict(beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=False)
    gs = torch.full((), 4.0, device=device)
    fi = torch.zeros((), device=device)
    return [
        (ops.adamw_.default, lists(False), dict(lr=1e-2, amsgrad=False, **hyper)),
        (ops.adam_.default, lists(True), dict(lr=1e-2, amsgrad=True, grad_scale=gs, found_inf=fi, **hyper)),
        (ops.adamw_.tensor_lr, lists(False), dict(lr=torch.tensor(1e-2, device=device), amsgrad=False, **hyper)),
        (ops.sgd_.default, ([p.clone() for p in ps], [p.clone() for p in ps], [p.clone() for p in ps]),
         dict(weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.0, nesterov=True, maximize=False,
              is_first_step=False, grad_scale=gs, found_inf=fi)),
        (ops.sgd_.tensor_lr, ([p.clone() for p in ps], [p.clone() for p in ps], []),
         dict(weight_decay=0.0, momentum=0.0, lr=torch.tensor(0.1, device=device), dampening=0.0, nesterov=False,
              maximize=True, is_first_step=False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args, kwargs in _opcheck_samples(device):
        torch.library.opcheck(op, args, kwargs)


# ------------------------------------------------------------ CUDA specifics


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_step_with_grad_scaler_does_not_synchronize(name):
    params = [p.requires_grad_() for p in _params("cuda", torch.float32)]
    opt = getattr(torch_wsl.optim, name)(params, lr=1e-2, **({"momentum": 0.9} if name == "SGD" else {}))
    scaler = torch.amp.GradScaler("cuda")
    for step in range(3):
        for p in params:
            p.grad = scaler.scale(torch.randn_like(p))
        if step > 0:  # the first step creates the state and may read found_inf once
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()


@cuda_only
@pytest.mark.cuda
def test_cuda_many_tensors_span_several_launches():
    """More tensors than one kernel argument struct holds, several dtypes in one call."""
    shapes = [(i % 13 + 1, 37) for i in range(300)]
    for dtype in (torch.float32, torch.bfloat16):
        ours_p = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]
        ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
        ours = torch_wsl.optim.AdamW(ours_p, lr=1e-2, amsgrad=True)
        ref = torch.optim.AdamW(ref_p, lr=1e-2, amsgrad=True, foreach=False)
        for _ in range(5):
            for a, b in zip(ours_p, ref_p):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
            ours.step()
            ref.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, **TRAJ_TOL[dtype])



def test_isa_paths_agree_bitwise():
    """Every SIMD build computes the same bits (the math fixes each rounding and each FMA)."""
    best = torch_wsl.build_info()["cpu_simd_best"]
    isas = ["default", "avx2", "avx512"][: ["default", "avx2", "avx512"].index(best) + 1]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        results = {}
        for isa in isas:
            g = torch.Generator().manual_seed(0)
            ts = [(torch.randn(531, generator=g) * s).to(dtype) for s in (1.0, 1.0, 0.1, 1.0, 1.0)]
            ts[3] = ts[3].abs()
            ts[4] = ts[4].abs()
            step = torch.full((), 4.0)
            prev = torch_wsl.set_cpu_isa(isa)
            try:
                torch.ops.torch_wsl.adamw_([ts[0]], [ts[1]], [ts[2]], [ts[3]], [ts[4]], [step], lr=1e-2, beta1=0.9,
                                           beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=True,
                                           grad_scale=torch.tensor(8.0))
            finally:
                torch_wsl.set_cpu_isa(prev)
            results[isa] = ts
        for isa in isas[1:]:
            for a, b in zip(results[isa], results["default"]):
                assert torch.equal(a.view(torch.int16) if dtype != torch.float32 else a,
                                   b.view(torch.int16) if dtype != torch.float32 else b), (isa, dtype)


def test_operator_traces_under_torch_compile():
    """The fake kernels let torch.compile(fullgraph=True) trace a step; results equal eager."""
    from torch_wsl.ops import optim as ops

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    lists = [[torch.randn(s, generator=g) for s in ((7,), (3, 5))] for _ in range(4)]
    lists[3] = [t.abs() for t in lists[3]]
    steps = [torch.full((), 2.0) for _ in range(2)]

    def step(ps, gs, ms, vs, st):
        ops.adam_(ps, gs, ms, vs, [], st, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8,
                  amsgrad=False, maximize=False, decoupled_weight_decay=True)

    eager = [[t.clone() for t in lst] for lst in lists + [steps]]
    step(*eager)
    compiled = [[t.clone() for t in lst] for lst in lists + [steps]]
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    for a, b in zip(eager, compiled):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_large_step_runs_on_the_thread_pool(name):
    """Enough elements that the CPU kernel splits the chunks among threads (the tests above stay serial)."""
    assert torch.get_num_threads() >= 1
    shapes = [(300_001,), (512, 700), (129,)]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in shapes]
    ours_p = [p.clone().requires_grad_() for p in base]
    ref_p = [p.clone().requires_grad_() for p in base]
    kw = {"momentum": 0.9, "nesterov": True} if name == "SGD" else {"amsgrad": True}
    ours = getattr(torch_wsl.optim, name)(ours_p, lr=1e-2, **kw)
    ref = getattr(torch.optim, name)(ref_p, lr=1e-2, foreach=False, **kw)
    for _ in range(4):
        for a, b in zip(ours_p, ref_p):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, **TRAJ_TOL[torch.float32])
    grads = [p.grad for p in ours_p]
    exact = torch.sqrt(sum((t.double() ** 2).sum() for t in grads)).float()
    ours_norm = torch_wsl.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(ours_norm, exact, rtol=2e-7, atol=0)  # float32 sums in blocks, then double
    torch.testing.assert_close(ours_norm, torch.nn.utils.get_total_norm(grads), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_group_spanning_devices_takes_one_call_per_device(name):
    """torch.optim steps a group whose parameters sit on several devices; so do these, one operator
    call per device (a meta parameter stands in for a second device: its call runs the fake kernel)."""
    kw = {"momentum": 0.9} if name == "SGD" else {}
    g = torch.Generator().manual_seed(0)
    cpu_a, cpu_c = torch.randn(9, generator=g), torch.randn(4, 3, generator=g)
    ours_p = [cpu_a.clone().requires_grad_(), torch.zeros(5, device="meta", requires_grad=True),
              cpu_c.clone().requires_grad_()]
    ref_p = [cpu_a.clone().requires_grad_(), cpu_c.clone().requires_grad_()]
    ours = getattr(torch_wsl.optim, name)(ours_p, lr=1e-2, **kw)
    ref = getattr(torch.optim, name)(ref_p, lr=1e-2, foreach=False, **kw)
    with _Count() as counter:
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=g) for p in ref_p]
            ours_p[0].grad, ours_p[2].grad = grads[0].clone(), grads[1].clone()
            ours_p[1].grad = torch.zeros(5, device="meta")
            ref_p[0].grad, ref_p[1].grad = grads
            ours.step()
            ref.step()
    assert counter.ops.count({"AdamW": "torch_wsl.adamw_", "SGD": "torch_wsl.sgd_"}[name]) == 6  # 3 steps x 2 devices
    torch.testing.assert_close(ours_p[0], ref_p[0], **TRAJ_TOL[torch.float32])
    torch.testing.assert_close(ours_p[2], ref_p[1], **TRAJ_TOL[torch.float32])


def test_overlapping_written_tensor_is_rejected_before_any_update():
    """A gradient from expand() that the step must unscale in place: an error, and nothing written."""
    from torch_wsl.ops import optim as O

    p = torch.ones(4)
    g = torch.tensor([2.0]).expand(4)
    m, v, step = torch.zeros(4), torch.zeros(4), torch.zeros(())
    before = (p.clone(), m.clone(), v.clone(), step.clone())
    with pytest.raises(RuntimeError, match="internally overlapping memory"):
        O.adam_([p], [g], [m], [v], [], [step], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                amsgrad=False, maximize=False, grad_scale=torch.tensor([2.0]))
    for got, want in zip((p, m, v, step), before):
        assert torch.equal(got, want)


def test_empty_lists_are_a_no_op():
    from torch_wsl.ops import optim as O

    O.adam_([], [], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
            maximize=False)
    O.sgd_([], [], [], weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False, maximize=False,
           is_first_step=True)
    assert O.total_norm([]).item() == 0.0
    assert torch.nn.utils.get_total_norm([]).item() == torch_wsl.nn.utils.clip_grad_norm_([], 1.0).item() == 0.0
