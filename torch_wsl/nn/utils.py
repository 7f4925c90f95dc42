"""Gradient clipping on multi-tensor operators, drop-in for ``torch.nn.utils``'s.

``clip_grad_norm_`` computes the total norm with one multi-tensor reduction
(``torch.ops.torch_wsl.total_norm``) and scales the gradients with one
multi-tensor operator (``clip_grads_with_norm_``) that reads the norm on the
device: no host synchronization, unless ``error_if_nonfinite=True``, which
must look at the norm on the host before clipping (torch's does the same).
Norm types 1, 2 and inf run on torch_wsl's operators; other orders fall back
to torch's implementation.

DTensor gradients (FSDP2, tensor parallelism) are reduced across the mesh as
torch's are: each rank takes the norm of its local shards (one operator per
device), the partial results are all-reduced over the mesh dimensions the
gradients are sharded on (sum of p-th powers, or max for inf; an
asynchronous collective on the device, no host read), and the total comes
back as a replicated DTensor, like torch's. The scaling runs on the local
shards.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from ..ops import optim as ops
from ..ops._dtensor import dtensor_class
from ..optim._sharded import describe, local

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm"]

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]
_OWN_ORDERS = (1.0, 2.0, math.inf)


def _by_device(tensors: list[Tensor]) -> dict:
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


@torch.no_grad()
def get_total_norm(
    tensors: _TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> Tensor:
    """Same contract and result as ``torch.nn.utils.get_total_norm``: the norm of all
    tensors viewed as one vector, a 0-dim tensor on the first tensor's device.

    One ``total_norm`` operator per device; ``foreach`` is accepted and ignored.
    One difference: when the tensors mix dtypes, torch rounds each tensor's
    norm to that tensor's dtype before combining them (so a float16 gradient
    whose own norm exceeds 65504 makes the total inf), while this accumulates
    everything in float32/float64 and rounds once. With one dtype the results
    agree to about one ulp.
    """
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    if norm_type not in _OWN_ORDERS:
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    cls = dtensor_class()
    if cls is not None and any(isinstance(t, cls) for t in tensors):
        total = _sharded_total_norm(tensors, norm_type, cls)
    else:
        groups = _by_device(tensors)
        norms = [ops.total_norm(group, norm_type) for group in groups.values()]
        if len(norms) == 1:
            total = norms[0]
        else:
            first = tensors[0].device
            total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    return total


def _meshes_combine(meshes: list) -> bool:
    """Whether partial norms on these meshes add up to one total: slices of one root mesh, or (without
    DeviceMesh's root lookup) rank sets each inside the largest."""
    roots = []
    for m in meshes:
        get_root = getattr(m, "_get_root_mesh", None)
        roots.append(get_root() if get_root is not None else None)
    if all(r is not None for r in roots) and all(r is roots[0] or r == roots[0] for r in roots):
        return True
    ranks = [set(m.mesh.flatten().tolist()) for m in meshes]
    widest = max(ranks, key=len)
    return all(r <= widest for r in ranks)


def _sharded_total_norm(tensors: list[Tensor], norm_type: float, cls: type) -> Tensor:
    """The total norm of DTensors, replicated on the first one's mesh (see the module's docstring).

    Tensors may be on several meshes sliced from one (FSDP2 with tensor parallelism puts the
    parallelized layers on the 2-D mesh and the rest on its data-parallel slice): each mesh's partial
    results are reduced in its own groups, then added. A tensor on a slice is replicated over the
    dimensions sliced away (DeviceMesh's meaning), so every rank gets the same total. Meshes that are
    neither slices of one mesh nor nested in rank sets are refused.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    dtensors = [t for t in tensors if isinstance(t, cls)]
    if len(dtensors) != len(tensors):
        plain = next(t for t in tensors if not isinstance(t, cls))
        raise RuntimeError(
            "torch_wsl.nn.utils: expected the gradients to be all DTensors or all plain tensors, got "
            f"{describe(dtensors[0])} and {describe(plain)}; a plain tensor's norm is either per rank or "
            "replicated, and only the caller knows which"
        )
    first = tensors[0]
    meshes: list = []  # distinct meshes, in order of appearance
    for t in tensors:
        m = t.device_mesh
        if not any(m is k or m == k for k in meshes):
            meshes.append(m)
    if len(meshes) > 1 and not _meshes_combine(meshes):
        raise RuntimeError(
            "torch_wsl.nn.utils: expected the gradients' device meshes to be slices of one mesh, got "
            f"{describe(next(t for t in tensors if t.device_mesh is meshes[0]))} and "
            f"{describe(next(t for t in tensors if t.device_mesh is meshes[1]))}; take get_total_norm per "
            "mesh, combine the full_tensor() values as (sum of n**p) ** (1/p) (max for inf) over the ranks "
            "that share them, then call clip_grads_with_norm_ with the total"
        )
    inf = norm_type == math.inf
    # Local norms per (mesh, device, mesh dims the tensor is split on): one operator per device and kind.
    # Every placement but Replicate splits the tensor (Shard, and FSDP2+TP's _StridedShard, which is no
    # Shard subclass in torch 2.14); Partial is reduced first.
    groups: dict = {}
    for t in tensors:
        mesh = t.device_mesh
        if any(pl.is_partial() for pl in t.placements):
            # The norm of a pending sum is not a sum of norms: reduce it first, as DTensor's norm does.
            t = t.redistribute(mesh, [Replicate() if pl.is_partial() else pl for pl in t.placements])
        dims = tuple(i for i, pl in enumerate(t.placements) if not pl.is_replicate())
        mesh_index = next(i for i, k in enumerate(meshes) if mesh is k or mesh == k)
        groups.setdefault((mesh_index, t.device, dims), []).append(t._local_tensor)
    device = first.device
    out_dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    partial: dict = {}
    for (mesh_index, dev, dims), locals_ in groups.items():
        # A zero-size float32 tensor makes the operator return its float32 accumulation
        # instead of rounding 16-bit shards' norms before they are combined across ranks.
        if out_dtype in (torch.float16, torch.bfloat16):
            locals_ = locals_ + [torch.empty(0, device=dev)]
        n = ops.total_norm(locals_, norm_type)
        v = (n if inf or norm_type == 1.0 else n * n).to(device)
        key = (mesh_index, dims)
        old = partial.get(key)
        partial[key] = v if old is None else (torch.maximum(old, v) if inf else old + v)
    total = None
    for (mesh_index, dims), v in partial.items():
        for d in dims:
            dist.all_reduce(v, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM,
                            group=meshes[mesh_index].get_group(d))
        total = v if total is None else (torch.maximum(total, v) if inf else total + v)
    if norm_type == 2.0:
        total = total.sqrt()
    total = total.to(out_dtype)
    mesh = first.device_mesh
    return cls.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: Optional[bool] = None,
) -> None:
    """Same contract as ``torch.nn.utils.clip_grads_with_norm_``: each gradient is scaled
    by ``min(max_norm / (total_norm + 1e-6), 1)``, computed on the device (no sync).

    One ``clip_grads_with_norm_`` operator per device; ``foreach`` is accepted and ignored.
    """
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    cls = dtensor_class()
    if cls is not None:
        if isinstance(total_norm, cls):
            replicated = all(pl.is_replicate() for pl in total_norm.placements)
            total_norm = total_norm._local_tensor if replicated else total_norm.full_tensor()
        # The scaling is elementwise: on the local shards.
        grads = [local(g) for g in grads]
    for device, group in _by_device(grads).items():
        norm = total_norm if total_norm.device == device else total_norm.to(device, non_blocking=True)
        ops.clip_grads_with_norm_(group, float(max_norm), norm)


def _settle_partial_grads(parameters: list[Tensor]) -> None:
    """Pending-sum (Partial) DTensor gradients, e.g. of tensor-parallel replicated parameters, reduced once
    into ``.grad`` with their parameter's placements: the norm needs the sums, and the optimizer step would
    otherwise reduce them again."""
    cls = dtensor_class()
    if cls is None:
        return
    from torch.distributed.tensor import Replicate

    for p in parameters:
        g = p.grad
        if g is None or not isinstance(g, cls) or not any(pl.is_partial() for pl in g.placements):
            continue
        if isinstance(p, cls) and p.device_mesh == g.device_mesh and not any(pl.is_partial() for pl in p.placements):
            target = p.placements
        else:
            target = [Replicate() if pl.is_partial() else pl for pl in g.placements]
        p.grad = g.redistribute(g.device_mesh, target)


@torch.no_grad()
def clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> Tensor:
    """Same contract and result as ``torch.nn.utils.clip_grad_norm_``.

    Clips the gradients of ``parameters`` in place so their total ``norm_type``
    norm is at most ``max_norm`` and returns the total norm (before clipping)
    as a tensor. Two multi-tensor operators per device (the norm, then the
    scaling), no host synchronization unless ``error_if_nonfinite``.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    _settle_partial_grads(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    if float(norm_type) not in _OWN_ORDERS:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    else:
        clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    return total_norm
