"""torch.distributed with WSL-safe defaults: the NCCL environment, the backend, DDP's communication.

Under WSL2 several GPUs have no peer-to-peer path and NCCL's shared-memory
transport fails, so inter-GPU traffic goes through host memory; this module
gives the settings that follow from that (derived once, from the probes in
:mod:`torch_wsl.env`, the same source as ``python -m torch_wsl doctor --env``)
and ways to apply and measure them::

    import torch_wsl.distributed as twd

    setup = twd.init_process_group()            # torch's arguments; applies the NCCL variables, picks the backend
    model = DDP(model, device_ids=[rank], **twd.ddp_options())   # bigger buckets under WSL2
    twd.compress_gradients(model)               # bf16 all-reduce: half the bytes (torch's own hook)
    counter = twd.count_collectives(other_ddp_model)  # all-reduce calls and bytes per step

On native Linux none of the variables change and DDP keeps torch's bucket size.
``import torch_wsl`` does not import this module; importing it is cheap (no
DTensor, no DDP communication hooks until they are used).
"""

from __future__ import annotations

from .ddp import (
    CollectiveCounter,
    CollectiveCounts,
    bf16_hook_supported,
    compress_gradients,
    compression_hook,
    count_collectives,
    ddp_options,
    record_collectives,
)
from .process_group import (
    ProcessGroupSetup,
    choose_backend,
    init_process_group,
    recommended_env,
    recommended_env_reasons,
)

__all__ = [
    "CollectiveCounter",
    "CollectiveCounts",
    "ProcessGroupSetup",
    "bf16_hook_supported",
    "choose_backend",
    "compress_gradients",
    "compression_hook",
    "count_collectives",
    "ddp_options",
    "init_process_group",
    "recommended_env",
    "recommended_env_reasons",
    "record_collectives",
]
