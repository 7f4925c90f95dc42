"""Adam and AdamW on one fused multi-tensor operator per parameter group and step."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..ops import optim as ops
from ..ops._dtensor import dtensor_class
from ._common import AmpScalars, as_float, by_device, check_param_and_grad, check_state, grad_is_ok, lr_arg
from ._sharded import ShardedGroupCheck, local

__all__ = ["Adam", "AdamW"]


class _FusedAdamStep:
    """The step shared by Adam and AdamW, mixed in before the torch.optim class.

    Everything else (constructor checks, param groups, state_dict format,
    hooks, zero_grad) is torch.optim's. State per parameter is torch's:
    ``step`` (a 0-dim float32 tensor on the parameter's device, as torch's
    fused and capturable modes keep it), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``, in the parameter's dtype. On DTensor
    parameters (FSDP2, tensor parallelism) the state is DTensor with the
    parameter's placements and the operator runs on the local shards
    (``_sharded``).
    """

    _name = "torch_wsl.optim.Adam"
    param_groups: list
    state: Any

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step: one operator per parameter group (and device).

        With a ``torch.amp.GradScaler``, gradients are unscaled inside the
        operator and a step with non-finite gradients is skipped on the device,
        without a host synchronization, except on the step that creates the
        optimizer state (normally the first), which reads ``found_inf`` once so
        that a skipped first step leaves no state behind, as with torch.optim.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = AmpScalars(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))

        # Check everything before anything is written: a bad group is an error, not half a step.
        plans = []
        creates_state = False
        state = self.state
        for group_index, group in enumerate(self.param_groups):
            sharded = ShardedGroupCheck(self._name, group_index)
            params: list[Tensor] = []
            grads: list[Tensor] = []
            states: list = []
            keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
            device = None
            one_device = True
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if not grad_is_ok(p, g):
                    check_param_and_grad(self._name, p, g, ", please consider SparseAdam instead")
                g = sharded.add(i, p, g)
                st = state.get(p)
                if not st:
                    creates_state = True
                    st = None
                else:
                    # load_state_dict casts state to the parameter's dtype and device; shapes are the user's.
                    for key in keys:
                        t = st.get(key)
                        if t is not None:
                            if t.shape != p.shape:
                                check_state(self._name, p, key, t)
                            if sharded.is_sharded:
                                sharded.check_state(p, key, t)
                if device is None:
                    device = p.device
                elif one_device and p.device != device:
                    one_device = False
                params.append(p)
                grads.append(g)
                states.append(st)
            if params:
                plans.append((group, params, grads, states, one_device, sharded.is_sharded))
        if creates_state and amp.step_is_skipped():
            return loss
        for plan in plans:
            self._fused_group_step(*plan, amp)
        return loss

    def _fused_group_step(self, group: dict, params: list, grads: list, states: list, one_device: bool,
                          is_sharded: bool, amp: AmpScalars) -> None:
        amsgrad = group["amsgrad"]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        f32 = torch.float32
        for p, st in zip(params, states):
            if st is None:
                st = self.state[p]
                st["step"] = torch.zeros((), dtype=f32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                step = st["step"]
                if is_sharded and isinstance(step, dtensor_class()):
                    step = st["step"] = local(step)  # a converted checkpoint's replicated DTensor step
                # A checkpoint of torch.optim's default mode keeps steps on the CPU (float64
                # under a float64 default dtype): bring them to the device once.
                if not isinstance(step, Tensor) or step.dtype is not f32 or step.device != p.device:
                    st["step"] = torch.as_tensor(step).to(device=p.device, dtype=f32).reshape(())
                if amsgrad and "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(st["max_exp_avg_sq"])
            steps.append(st["step"])

        beta1, beta2 = group["betas"]
        lr = lr_arg(group["lr"])
        kwargs = dict(
            beta1=as_float(beta1, "betas[0]"),
            beta2=as_float(beta2, "betas[1]"),
            weight_decay=as_float(group["weight_decay"], "weight_decay"),
            eps=float(group["eps"]),
            amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
        )
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        if is_sharded:
            # Elementwise update: each rank steps its local shards (steps are plain tensors).
            lists = tuple([t._local_tensor for t in xs] for xs in lists[:5]) + (steps,)
        buckets = {params[0].device: None} if one_device else by_device(params)
        for device, idx in buckets.items():
            grad_scale, found_inf = amp.on(device)
            dev_lr = lr
            if isinstance(lr, Tensor) and lr.device != device and lr.device.type != "cpu":
                dev_lr = lr.to(device)
            if idx is None:
                dev_lists = lists
            else:
                dev_lists = tuple([xs[i] for i in idx] if xs else [] for xs in lists)
            ops.adam_(*dev_lists, lr=dev_lr, grad_scale=grad_scale, found_inf=found_inf, **kwargs)


def _reject_differentiable(name: str, differentiable: bool) -> None:
    if differentiable:
        raise RuntimeError(f"{name} does not support differentiable=True (its step is a fused operator)")


class Adam(_FusedAdamStep, torch.optim.Adam):
    """``torch.optim.Adam`` with a fused multi-tensor step (one operator per parameter group).

    Same constructor, defaults, parameter groups, hooks and state_dict as
    torch.optim.Adam (a checkpoint loads either way and training continues on
    the same trajectory). ``foreach`` and ``fused`` are accepted and recorded
    in the param groups as torch records them, so a torch.optim.Adam that loads
    this optimizer's state_dict runs the implementation its user asked for;
    torch_wsl's step always runs its fused operator. ``capturable`` is accepted
    (the step does not synchronize either way); ``differentiable=True`` is not
    supported. Tensor-valued betas or weight_decay are read with ``.item()``.
    """

    _name = "torch_wsl.optim.Adam"

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        _reject_differentiable(self._name, differentiable)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=False, fused=fused, decoupled_weight_decay=decoupled_weight_decay,
        )
        self._step_supports_amp_scaling = True


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` with a fused multi-tensor step (one operator per parameter group).

    Same contract as torch.optim.AdamW; see :class:`Adam` for what the
    ``foreach``/``fused``/``capturable``/``differentiable`` flags mean here.
    """

    _name = "torch_wsl.optim.AdamW"

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        _reject_differentiable(self._name, differentiable)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=False, fused=fused,
        )
        self._step_supports_amp_scaling = True
