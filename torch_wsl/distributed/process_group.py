"""The environment NCCL and Gloo need here, and ``init_process_group`` that applies it and picks the backend."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..env import Env, Settings, recommended_settings
from ..env.settings import DISTRIBUTED_PREFIXES, kept_reason

__all__ = ["ProcessGroupSetup", "choose_backend", "init_process_group", "recommended_env", "recommended_env_reasons"]

logger = logging.getLogger("torch_wsl.distributed")

#: The backend init_process_group picks where NCCL works: NCCL for CUDA tensors and Gloo for CPU
#: tensors in one default group (torch's own backend=None creates only the accelerator's backend).
NCCL_WITH_CPU_GLOO = "cuda:nccl,cpu:gloo"


def recommended_env(env: Env | None = None) -> dict[str, str | None]:
    """The NCCL/Gloo environment variables torch_wsl recommends on this machine (None: unset it).

    Derived from the probes of :mod:`torch_wsl.env` by
    :func:`torch_wsl.env.settings_from_probes`, the same source as
    ``python -m torch_wsl doctor --env`` and the doctor's ``nccl`` check. Under
    WSL2 with several GPUs: ``NCCL_SHM_DISABLE=1``, ``NCCL_P2P_DISABLE=1`` and,
    without InfiniBand devices, ``NCCL_IB_DISABLE=1``; on native Linux and with
    one GPU nothing. Variables already set in the environment are never
    included. ``env`` points the probes at another root (tests); None: this
    machine (computed once, cached).
    """
    return {k: v for k, v in _settings(env).distributed_env().items() if not _set_since(env, k)}


def recommended_env_reasons(env: Env | None = None) -> dict[str, str]:
    """Why, per variable of :func:`recommended_env`, and for each variable the user set otherwise (kept as set)."""
    s = _settings(env)
    names = [name for name in s.distributed_env() if not _set_since(env, name)] + _kept(s)
    return {name: s.reasons[name] for name in names}


def _set_since(env: Env | None, name: str) -> bool:
    """Whether ``name`` was set in this process after the (cached) probes of the real machine ran."""
    return env is None and name in os.environ


def _settings(env: Env | None) -> Settings:
    return recommended_settings(env)


def _kept(s: Settings) -> list[str]:
    """The distributed variables the user set to something else than torch_wsl would."""
    return [name for name in s.kept if name.startswith(DISTRIBUTED_PREFIXES)]


@dataclass(frozen=True)
class ProcessGroupSetup:
    """What :func:`init_process_group` chose and did.

    ``backend`` is the string given to torch (``"cuda:nccl,cpu:gloo"``,
    ``"gloo"``, or what the caller passed), ``backend_reason`` why.
    ``applied`` are the variables this call set in ``os.environ``; ``kept`` the
    recommended ones that were already set, with the values they keep;
    ``reasons`` says why each is recommended.
    """

    backend: str | None
    backend_reason: str
    applied: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def choose_backend(device_id: torch.device | int | None = None) -> tuple[str | None, str]:
    """The backend :func:`init_process_group` uses when none is given, and why.

    ``"cuda:nccl,cpu:gloo"`` when this torch has NCCL, a CUDA GPU is visible and
    this process has one of its own (``LOCAL_RANK``, when set, below the GPU
    count); else ``"gloo"``. With backend=None torch itself creates only the
    detected accelerator's backend (NCCL on a GPU machine), so a collective on
    a CPU tensor (a metric, an object collective, DCP's async save) finds no
    backend; one group with both serves CUDA tensors through NCCL and CPU
    tensors through Gloo. A ``device_id`` that is neither CUDA nor CPU leaves
    the choice to torch (None).
    """
    if device_id is not None and not isinstance(device_id, int):
        kind = torch.device(device_id).type
        if kind == "cpu":
            return "gloo", "device_id is a CPU device"
        if kind != "cuda":
            return None, f"device_id is a {kind} device: torch's default backend for it"
    if not dist.is_nccl_available():
        return "gloo", "this torch build has no NCCL"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return "gloo", "no CUDA GPU is visible"
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit() and int(local) >= gpus:
        return "gloo", (f"LOCAL_RANK={local} but {gpus} GPU(s) visible: ranks would share a GPU, "
                        "which NCCL does not allow")
    return NCCL_WITH_CPU_GLOO, (f"{gpus} CUDA GPU(s) and NCCL: NCCL for CUDA tensors, Gloo for CPU tensors "
                                "(torch's backend=None would create NCCL alone)")


def _apply(settings: Settings) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Set the recommended variables that are not set now; return (applied, kept, reasons)."""
    applied: dict[str, str] = {}
    kept: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for name, value in settings.distributed_env().items():
        why = settings.reasons.get(name, "")
        current = os.environ.get(name)
        if current is None:
            if value is not None:
                os.environ[name] = value
                applied[name] = value
                reasons[name] = why
        else:  # set since the probes ran: the user's value stays
            kept[name] = current
            reasons[name] = why if current == value else kept_reason(name, current, value or "", why)
    for name in _kept(settings):
        if name in os.environ:
            kept[name] = os.environ[name]
            reasons[name] = settings.reasons.get(name, "")
    return applied, kept, reasons


def init_process_group(
    backend: str | None = None,
    init_method: str | None = None,
    timeout: timedelta | None = None,
    world_size: int = -1,
    rank: int = -1,
    store: dist.Store | None = None,
    group_name: str = "",
    pg_options: Any | None = None,
    device_id: torch.device | int | None = None,
    **kwargs: Any,
) -> ProcessGroupSetup:
    """:func:`torch.distributed.init_process_group` with torch_wsl's environment and backend choice.

    Same arguments, same behaviour and errors, plus two steps before torch's
    call: the variables of :func:`recommended_env` that are not set yet go into
    ``os.environ`` (before NCCL starts, which reads them once; variables you
    set are never changed), and without ``backend`` the one
    :func:`choose_backend` picks. What it chose is logged on the
    ``torch_wsl.distributed`` logger (INFO) and returned. If torch's call
    raises, the variables it set are removed again and the error propagates.
    """
    settings = _settings(None)
    if backend is None:
        backend, why = choose_backend(device_id)
    else:
        why = "given by the caller"
    applied, kept, reasons = _apply(settings)
    try:
        dist.init_process_group(backend, init_method=init_method, timeout=timeout, world_size=world_size, rank=rank,
                                store=store, group_name=group_name, pg_options=pg_options, device_id=device_id,
                                **kwargs)
    except BaseException:
        for name in applied:
            os.environ.pop(name, None)
        raise
    setup = ProcessGroupSetup(backend, why, applied, kept, reasons)
    logger.info("torch_wsl.distributed: backend %s (%s); set %s; kept %s", backend or "torch's default", why,
                ", ".join(f"{k}={v}" for k, v in applied.items()) or "nothing",
                ", ".join(f"{k}={v}" for k, v in kept.items()) or "nothing")
    return setup
