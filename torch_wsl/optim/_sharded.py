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
placements differ from its parameter's (e.g. the ``Partial`` gradient of a
tensor-parallel replicated parameter) is redistributed to the parameter's
placements and put back in ``.grad`` (the collective DTensor's own dispatch
would run, once; the step's unscaling stays visible there), and a ``Partial``
parameter is refused (Adam's update is not linear in it). Parameters of one
group may live on several meshes (FSDP2 with tensor parallelism puts the
parallelized layers on a 2-D mesh and the rest on the data-parallel one), as
torch.optim allows: the update is elementwise on each tensor.

DTensor's module costs about a second to import; nothing here imports it
(``ops._dtensor.dtensor_class`` finds the class once it is imported).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.nn import Parameter

from ..ops._dtensor import dtensor_class

__all__ = ["describe", "ShardedGroupCheck", "local"]

_PLAIN_TYPES = (Tensor, Parameter)


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
    """Device type, shape and dim names (not the rank list: thousands of ranks on a large job)."""
    names = getattr(mesh, "mesh_dim_names", None)
    return f"DeviceMesh({mesh.device_type!r}, shape {tuple(mesh.shape)}" + (f", dims {tuple(names)})" if names else ")")


def _same_mesh(a, b) -> bool:
    return a is b or a == b


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), without autograd."""
    cls = dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t._local_tensor
    return t


def _is_plain(t: Tensor, cls: type) -> bool:
    """Not a DTensor; the exact-type test first, as that is what a plain model's tensors pass."""
    return type(t) in _PLAIN_TYPES or not isinstance(t, cls)


class ShardedGroupCheck:
    """Checks one parameter group's tensors as they are collected, before anything is written.

    ``add(i, p, g)`` (``i``: the parameter's index in the group) returns the
    gradient to use and raises for what cannot be stepped: DTensor and plain
    parameters in one group, a Partial parameter, a gradient of the other
    kind or on another mesh than its parameter. A DTensor gradient whose
    placements differ from its parameter's is redistributed to them and put
    back in ``p.grad``. ``is_sharded`` says whether the group's tensors must be
    unwrapped (:func:`local`) for the operator.
    """

    def __init__(self, opt: str, group_index: int) -> None:
        self.opt = opt
        self.group_index = group_index
        self.cls = dtensor_class()
        self.first: Optional[Tensor] = None
        self.is_sharded = False

    def _where(self, i: int) -> str:
        return f"parameter {i} of group {self.group_index}"

    def add(self, i: int, p: Tensor, g: Tensor) -> Tensor:
        cls = self.cls
        if cls is None:
            return g
        p_plain = _is_plain(p, cls)
        first = self.first
        if first is None:
            self.first = p
            self.is_sharded = not p_plain
        elif p_plain == self.is_sharded:
            raise RuntimeError(
                f"{self.opt}: parameter group {self.group_index} mixes DTensor and plain-tensor parameters "
                f"({describe(first)}; {self._where(i)}: {describe(p)}); the fused step runs one operator on one "
                "kind: put them in separate parameter groups, or shard every parameter of the group "
                "(fully_shard / distribute_tensor)"
            )
        if p_plain:
            if not _is_plain(g, cls):
                raise RuntimeError(
                    f"{self.opt}: expected the gradient of {self._where(i)}, a plain tensor ({describe(p)}), to be "
                    f"a plain tensor, got a {describe(g)}"
                )
            return g
        placements = p.placements
        if any(pl.is_partial() for pl in placements):
            raise RuntimeError(
                f"{self.opt}: expected parameters sharded or replicated on their mesh, got a Partial parameter "
                f"({self._where(i)}: {describe(p)}); redistribute it to Shard or Replicate placements before stepping"
            )
        if _is_plain(g, cls):
            raise RuntimeError(
                f"{self.opt}: expected the gradient of {self._where(i)}, a DTensor ({describe(p)}), to be a "
                f"DTensor, got a {describe(g)}"
            )
        if not _same_mesh(g.device_mesh, p.device_mesh):
            raise RuntimeError(
                f"{self.opt}: expected each gradient on its parameter's device mesh, got {self._where(i)} "
                f"{describe(p)} with a gradient {describe(g)}"
            )
        if g.placements != placements:
            g = g.redistribute(p.device_mesh, placements)
            p.grad = g  # reduced once, and the step's in-place unscaling lands in .grad as for the others
        return g

    def check_state(self, p: Tensor, key: str, t: Tensor) -> None:
        """State of a DTensor parameter must be a DTensor with its placements (what the step creates and
        torch.distributed.checkpoint loads); a full plain tensor there comes from a non-sharded state_dict.
        Only called for sharded groups."""
        cls = self.cls
        if _is_plain(t, cls) or t.placements != p.placements or not _same_mesh(t.device_mesh, p.device_mesh):
            raise RuntimeError(
                f"{self.opt}: state '{key}' ({describe(t)}) does not match its DTensor parameter ({describe(p)}); "
                "load sharded optimizer state with torch.distributed.checkpoint or "
                "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
            )
