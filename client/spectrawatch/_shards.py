"""Sharded parameters (FSDP2 ``fully_shard`` DTensors): local shards, offsets, gathers.

A count-sketch is linear and each coordinate is hashed by its *global* flat index, so the sketch
of a full tensor is the sum over ranks of the sketches of their local shards, each hashed from
its global offset: every rank sketches its shard and one ``all_reduce(SUM)`` per capture gives
every rank the full sketch (``(L + 1) * d + 1`` float64 values, whatever the model size). Only
shards that cover a contiguous range of the flattened tensor are supported: ``Shard(0)`` and
``Replicate`` placements (what ``fully_shard`` and HSDP make); a replicated copy is counted once
(the rank at index 0 of each replicate mesh dimension contributes, the others add zeros).

Weights are gathered (``DTensor.full_tensor()``, an all-gather every rank joins) only at
snapshot steps, one parameter at a time. FSDP1 (``FullyShardedDataParallel`` flat parameters)
is not supported: :func:`uses_fsdp1` lets ``attach`` refuse it with a clear message.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


@functools.cache  # called per parameter per step: the import machinery costs ~1 us a call
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor (a parameter of an FSDP2 / tensor-parallel module)."""
    dt = _dtensor_type()
    return dt is not None and isinstance(p, dt)


def has_sharded_params(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (so captures are collective)."""
    return any(is_sharded(p) for p in model.parameters())


def uses_fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` contains an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``p``: the local tensor of a DTensor, else ``p`` itself."""
    if not is_sharded(p):
        return p
    local: torch.Tensor = p.to_local()  # type: ignore[attr-defined]
    return local


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """``(local tensor, global flat offset of its first element, contributes)`` of ``p``.

    A plain tensor is its own shard at offset 0. ``contributes`` is False on the copies of a
    replicated shard that must not be added twice. Raises ``NotImplementedError`` for
    placements that do not give a contiguous flat range (sharding on a dimension other than 0).
    """
    if not is_sharded(p):
        return p, 0, True
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = p.device_mesh  # type: ignore[attr-defined]
    placements = p.placements  # type: ignore[attr-defined]
    contributes = True
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            contributes = contributes and mesh.get_local_rank(mesh_dim) == 0
        elif not (isinstance(placement, Shard) and placement.dim == 0):
            raise NotImplementedError(f"sketching a DTensor placed as {placement} (only Shard(0))")
    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    return local_tensor(p), int(offset[0]) * row if offset else 0, contributes


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``p`` itself, or the all-gather of a DTensor (every rank must call)."""
    if is_sharded(p):
        out: torch.Tensor = p.full_tensor()  # type: ignore[attr-defined]
        return out
    return p


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place ``all_reduce(SUM)`` of ``x`` over the default process group; returns ``x``."""
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def world_size() -> int:
    """Ranks in the default process group (1 when it is not initialised)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
