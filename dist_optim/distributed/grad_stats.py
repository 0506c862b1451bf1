"""Global gradient statistics with one collective: [sum of squares, non-finite flag] summed over the
ranks that hold disjoint pieces of the gradients, each element counted once.

Who holds what:
- a DTensor grad (FSDP2) is split over its device mesh; a copy replicated along a mesh dim is
  counted only on the rank at coordinate 0 of that dim (HSDP's replicas);
- a plain grad when ``process_group`` was given explicitly is a partition (ZeRO's flat fp32 shard,
  FSDP1's flat shard): counted on every rank;
- a plain grad beside DTensor params (no explicit group) is replicated on every rank of the mesh:
  counted on the group's first rank only;
- with no group at all, everything is local.
Every tensor contributes its non-finite flag, so all ranks agree on skipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..functional import grad_sumsq_and_flag
from .collectives import active, device_for
from .shard import is_dtensor, local_tensor


def fsdp1_group(param_groups: Sequence[dict]) -> Any:
    """FSDP1's flat shards (either ``use_orig_params`` setting) are partitions of the default group:
    return it for such params, None otherwise. HYBRID_SHARD needs ``process_group=`` explicitly."""
    flattened = any(getattr(p, "_fsdp_flattened", False) for g in param_groups for p in g["params"])
    return dist.group.WORLD if flattened and dist.is_initialized() else None


def mesh_group(grads: Sequence[torch.Tensor]) -> Any:
    """The process group spanning the device mesh of the DTensor grads (None when there are none)."""
    meshes = {id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError("params live on more than one device mesh; pass process_group= explicitly")
    (mesh,) = meshes.values()
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"a {mesh.ndim}-D device mesh of {mesh.size()} ranks inside a world of {dist.get_world_size()}: "
            "pass process_group= spanning the mesh"
        )
    return dist.group.WORLD


def _counted_here(grad: torch.Tensor, explicit_group: Any, group: Any) -> bool:
    if is_dtensor(grad):
        coords = grad.device_mesh.get_coordinate()
        return all(
            coords[dim] == 0 for dim, placement in enumerate(grad.placements) if placement.is_replicate()
        )
    if explicit_group is not None or group is None:
        return True
    return dist.get_rank(group) == 0


def global_grad_stats(grads: Sequence[torch.Tensor], process_group: Any, *, backend: str) -> torch.Tensor:
    """[sum of squares over every rank's distinct elements, > 0 if any rank saw inf/NaN], fp32."""
    group = process_group if process_group is not None else mesh_group(grads)
    counted, replicas = [], []
    for g in grads:
        (counted if _counted_here(g, process_group, group) else replicas).append(local_tensor(g))
    stats = grad_sumsq_and_flag(counted, backend=backend)
    if replicas:
        replica_stats = grad_sumsq_and_flag(replicas, backend=backend)
        stats = stats.to(replica_stats.device)
        stats[1] += replica_stats[1]
    if group is not None and active(group):
        stats = stats.to(device_for(group))
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return stats

