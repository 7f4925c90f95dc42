"""DTensor parameters (FSDP2, tensor parallelism) for the fused optimizers and clipping.

The optimizer updates are elementwise, so on a parameter that is sharded or
replicated on a device mesh, updating each rank's local tensor is exactly the
update of the whole tensor: the fused operators run on the local shards (one
call per group and device, as for plain tensors), and the optimizer state is
created with ``zeros_like(param)``, a DTensor with the parameter's placements,
as torch.optim keeps it (so ``torch.distributed.checkpoint`` and
``get_optimizer_state_dict`` save and load it, and a state_dict cross-loads
with torch.optim's). ``step`` stays a plain 0-dim tensor, as torch's.

Two placements are not elementwise-safe and are handled here: a gradient whose
placements differ from its parameter's (e.g. ``Partial``) is redistributed to
the parameter's placements first (the collective DTensor's own dispatch would
run), and a ``Partial`` parameter is refused (Adam's update is not linear in it).

DTensor's module costs about a second to import; nothing here imports it. A
DTensor exists only once ``torch.distributed.tensor`` is imported, so its
class is looked up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import Tensor

__all__ = ["dtensor_class", "describe", "ShardedGroupCheck", "local"]


def dtensor_class() -> Optional[type]:
    """DTensor's class when torch.distributed.tensor is imported, else None (no DTensor can exist)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def describe(t: Tensor) -> str:
    """A tensor as an error message names it: shape, dtype and, for a DTensor, its mesh and placements."""
    from ..ops._checks import dtype_name

    text = f"shape {tuple(t.shape)} {dtype_name(t.dtype)}"
    cls = dtensor_class()
    if cls is not None and isinstance(t, cls):
        text += f" DTensor on {_mesh_name(t.device_mesh)} with placements {tuple(t.placements)}"
    else:
        text += f" plain tensor on {t.device}"
    return text


def _mesh_name(mesh) -> str:
    names = getattr(mesh, "mesh_dim_names", None)
    ranks = mesh.mesh.tolist()
    return f"DeviceMesh({mesh.device_type!r}, {ranks}" + (f", dims {tuple(names)})" if names else ")")


def _same_mesh(a, b) -> bool:
    return a is b or a == b


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), without autograd."""
    cls = dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t._local_tensor
    return t


class ShardedGroupCheck:
    """Checks one parameter group's tensors as they are collected, before anything is written.

    ``add(p, g)`` returns the gradient to use (the gradient itself, or a copy
    redistributed to the parameter's placements) and raises for what cannot
    be stepped: DTensor and plain parameters in one group, two meshes in one
    group, a Partial parameter, a plain gradient on a DTensor parameter.
    ``is_sharded`` says whether the group's tensors must be unwrapped.
    """

    def __init__(self, opt: str, group_index: int) -> None:
        self.opt = opt
        self.group_index = group_index
        self.cls = dtensor_class()
        self.first: Optional[Tensor] = None
        self.is_sharded = False

    def add(self, p: Tensor, g: Tensor) -> Tensor:
        cls = self.cls
        if cls is None:
            return g
        p_is = isinstance(p, cls)
        first = self.first
        if first is None:
            self.first = p
            self.is_sharded = p_is
        elif p_is != self.is_sharded:
            raise RuntimeError(
                f"{self.opt}: parameter group {self.group_index} mixes DTensor and plain-tensor parameters "
                f"({describe(first)}; {describe(p)}); the fused step runs one operator on one kind: put them in "
                "separate parameter groups, or shard every parameter of the group (fully_shard / distribute_tensor)"
            )
        elif p_is and not _same_mesh(p.device_mesh, first.device_mesh):
            raise RuntimeError(
                f"{self.opt}: parameter group {self.group_index} has parameters on two device meshes "
                f"({describe(first)}; {describe(p)}); put each mesh's parameters in their own parameter group"
            )
        if not p_is:
            if isinstance(g, cls):
                raise RuntimeError(
                    f"{self.opt}: expected the gradient of a plain-tensor parameter ({describe(p)}) to be a plain "
                    f"tensor, got a {describe(g)}"
                )
            return g
        if any(pl.is_partial() for pl in p.placements):
            raise RuntimeError(
                f"{self.opt}: expected parameters sharded or replicated on their mesh, got a Partial parameter "
                f"({describe(p)}); redistribute it to Shard or Replicate placements before stepping"
            )
        if not isinstance(g, cls):
            raise RuntimeError(
                f"{self.opt}: expected the gradient of a DTensor parameter ({describe(p)}) to be a DTensor, "
                f"got a {describe(g)}"
            )
        if not _same_mesh(g.device_mesh, p.device_mesh):
            raise RuntimeError(
                f"{self.opt}: expected each gradient on its parameter's device mesh, got a parameter "
                f"{describe(p)} with a gradient {describe(g)}"
            )
        if g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
        return g

    def check_state(self, p: Tensor, key: str, t: Tensor) -> None:
        """State of a DTensor parameter must be a DTensor with its placements (what the step creates and
        torch.distributed.checkpoint loads); a full plain tensor there comes from a non-sharded state_dict."""
        cls = self.cls
        if cls is None or not isinstance(p, cls):
            if cls is not None and isinstance(t, cls):
                raise RuntimeError(
                    f"{self.opt}: state '{key}' is a {describe(t)} but its parameter is a {describe(p)}"
                )
            return
        if not isinstance(t, cls) or t.placements != p.placements or not _same_mesh(t.device_mesh, p.device_mesh):
            raise RuntimeError(
                f"{self.opt}: state '{key}' ({describe(t)}) does not match its DTensor parameter ({describe(p)}); "
                "load sharded optimizer state with torch.distributed.checkpoint or "
                "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
            )
