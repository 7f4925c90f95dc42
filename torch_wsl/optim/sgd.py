"""SGD (momentum, dampening, Nesterov) on one fused multi-tensor operator per parameter group and step."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..ops import optim as ops
from ._common import AmpScalars, as_float, by_device, check_param_and_grad, check_state, grad_is_ok, lr_arg
from ._sharded import ShardedGroupCheck

__all__ = ["SGD"]


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` with a fused multi-tensor step (one operator per parameter group).

    Same constructor, defaults, parameter groups, hooks and state_dict as
    torch.optim.SGD (state: ``momentum_buffer`` when momentum is nonzero, in
    the parameter's dtype); a checkpoint loads either way and training
    continues on the same trajectory. ``foreach``/``fused`` are accepted and
    recorded as torch records them; the step always runs torch_wsl's operator.
    ``differentiable=True`` is not supported. With a ``torch.amp.GradScaler``
    the step does not synchronize, except on a step that creates momentum
    buffers (normally the first), which reads ``found_inf`` once. On DTensor
    parameters (FSDP2, tensor parallelism) the momentum buffers are DTensor
    with the parameter's placements and the operator runs on the local shards.

    A group where some parameters have momentum buffers and others not yet
    (a parameter that got its first gradient late) takes two operator calls
    that step: one that initializes the new buffers, one for the rest.
    """

    _name = "torch_wsl.optim.SGD"

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: Union[float, Tensor] = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        if differentiable:
            raise RuntimeError(f"{self._name} does not support differentiable=True (its step is a fused operator)")
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach,
            differentiable=False, fused=fused,
        )
        self._step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step: one operator per parameter group (and device)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = AmpScalars(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))

        plans = []
        creates_state = False
        state = self.state
        for group_index, group in enumerate(self.param_groups):
            sharded = ShardedGroupCheck(self._name, group_index)
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list = []
            with_momentum = as_float(group["momentum"], "momentum") != 0
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if not grad_is_ok(p, g):
                    check_param_and_grad(self._name, p, g)
                g = sharded.add(i, p, g)
                if with_momentum:
                    st = state.get(p)
                    buf = st.get("momentum_buffer") if st else None
                    if buf is None:
                        creates_state = True
                    else:
                        if buf.shape != p.shape:
                            check_state(self._name, p, "momentum_buffer", buf)
                        if sharded.is_sharded:
                            sharded.check_state(p, "momentum_buffer", buf)
                    bufs.append(buf)
                params.append(p)
                grads.append(g)
            if params:
                plans.append((group, params, grads, bufs, sharded.is_sharded))
        if creates_state and amp.step_is_skipped():
            return loss
        for plan in plans:
            self._fused_group_step(*plan, amp)
        return loss

    def _fused_group_step(self, group: dict, params: list, grads: list, bufs: list, is_sharded: bool,
                          amp: AmpScalars) -> None:
        momentum = as_float(group["momentum"], "momentum")
        kwargs = dict(
            weight_decay=as_float(group["weight_decay"], "weight_decay"),
            momentum=momentum,
            dampening=as_float(group["dampening"], "dampening"),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        lr = lr_arg(group["lr"])
        # (indices or None for all, is_first_step): parameters whose buffers exist, and those
        # that get one now (from the gradient, inside the operator).
        parts: list = [(None, False)]
        if momentum != 0:
            new = [i for i, b in enumerate(bufs) if b is None]
            for i in new:
                p = params[i]
                bufs[i] = torch.empty_like(p, memory_format=torch.preserve_format)
                self.state[p]["momentum_buffer"] = bufs[i]
            if new:
                new_set = set(new)
                old = [i for i in range(len(bufs)) if i not in new_set]
                parts = [(ix, first) for ix, first in ((old, False), (new, True)) if ix]
                if len(new) == len(params):
                    parts = [(None, True)]

        if is_sharded:
            # Elementwise update: each rank steps its local shards.
            params, grads, bufs = ([t._local_tensor for t in xs] for xs in (params, grads, bufs))
        for idx, first in parts:
            ps = params if idx is None else [params[i] for i in idx]
            gs = grads if idx is None else [grads[i] for i in idx]
            bs = bufs if idx is None else [bufs[i] for i in idx]
            for device, dix in by_device(ps).items():
                if len(dix) != len(ps):
                    dps, dgs, dbs = [ps[i] for i in dix], [gs[i] for i in dix], [bs[i] for i in dix] if bs else []
                else:
                    dps, dgs, dbs = ps, gs, bs
                grad_scale, found_inf = amp.on(device)
                dev_lr = lr
                if isinstance(lr, Tensor) and lr.device != device and lr.device.type != "cpu":
                    dev_lr = lr.to(device)
                ops.sgd_(dps, dgs, dbs, lr=dev_lr, is_first_step=first, grad_scale=grad_scale, found_inf=found_inf,
                         **kwargs)
