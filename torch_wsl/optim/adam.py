"""Adam and AdamW on one fused multi-tensor operator per parameter group and step."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..ops import optim as ops
from ._common import AmpScalars, as_float, by_device, check_param_and_grad, check_state, lr_arg

__all__ = ["Adam", "AdamW"]


class _FusedAdamStep:
    """The step shared by Adam and AdamW, mixed in before the torch.optim class.

    Everything else (constructor checks, param groups, state_dict format,
    hooks, zero_grad) is torch.optim's. State per parameter is torch's:
    ``step`` (a 0-dim float32 tensor on the parameter's device, as torch's
    fused and capturable modes keep it), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``, in the parameter's dtype.
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
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            amsgrad = group["amsgrad"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                check_param_and_grad(self._name, p, g, ", please consider SparseAdam instead")
                st = self.state.get(p)
                if not st:
                    creates_state = True
                else:
                    check_state(self._name, p, "exp_avg", st["exp_avg"])
                    check_state(self._name, p, "exp_avg_sq", st["exp_avg_sq"])
                    if amsgrad and "max_exp_avg_sq" in st:
                        check_state(self._name, p, "max_exp_avg_sq", st["max_exp_avg_sq"])
                params.append(p)
                grads.append(g)
            if params:
                plans.append((group, params, grads))
        if creates_state and amp.step_is_skipped():
            return loss
        for group, params, grads in plans:
            self._fused_group_step(group, params, grads, amp)
        return loss

    def _fused_group_step(self, group: dict, params: list, grads: list, amp: AmpScalars) -> None:
        amsgrad = group["amsgrad"]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            st = self.state[p]
            if len(st) == 0:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                step = st["step"]
                # A checkpoint of torch.optim's default mode keeps steps on the CPU (float64
                # under a float64 default dtype): bring them to the device once.
                if not isinstance(step, Tensor) or step.device != p.device or step.dtype != torch.float32:
                    st["step"] = torch.as_tensor(step).to(device=p.device, dtype=torch.float32).reshape(())
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
        buckets = by_device(params)
        for device, idx in buckets.items():
            grad_scale, found_inf = amp.on(device)
            dev_lr = lr
            if isinstance(lr, Tensor) and lr.device != device and lr.device.type != "cpu":
                dev_lr = lr.to(device)
            if len(buckets) == 1:
                lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            else:
                pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
                lists = tuple(pick(xs) for xs in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps))
            ops.adam_(*lists, lr=dev_lr, grad_scale=grad_scale, found_inf=found_inf, **kwargs)


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
