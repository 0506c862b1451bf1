"""Global gradient statistics with one collective: [sum of squares, non-finite flag] summed over the
ranks that hold disjoint pieces of the gradients, each element counted once.

Which group: ``process_group`` when given (or bound by an integration, e.g. ZeRO's data-parallel
group); else the ranks spanned by the DTensor grads' device meshes. Meshes are compared by value:
``fully_shard`` without ``mesh=`` builds a new, equal mesh per call, and TP x FSDP gives each
param its own 2-D mesh beside the 1-D data-parallel mesh of params that are only FSDP-sharded.

Who counts what:
- a DTensor grad is split over its mesh along Shard dims and copied along Replicate dims: a copy is
  counted only at coordinate 0 of each Replicate dim (HSDP's replicas, TP-replicated norms);
- a DTensor whose mesh spans only part of the ranks the params' meshes span together (a norm
  sharded on the DP sub-mesh beside TP x DP params) has one copy per translate of that sub-mesh;
  only the copy on the translate holding the lowest of those ranks is counted;
- params whose meshes together span only part of their root mesh (pipeline stages on a
  ("pp", "dp") mesh) are ambiguous: the other ranks may hold copies or other params. That needs
  ``process_group=``; without it the step raises rather than clip by a partial norm;
- a plain grad with an explicit group is a partition (ZeRO's flat fp32 shard, FSDP1's flat shard):
  counted on every rank;
- a plain grad beside DTensors (no explicit group) is replicated on every rank of the group:
  counted on the group's lowest rank only;
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
from .shard import any_dtensor, is_dtensor, local_tensor, local_tensors


def fsdp1_group(param_groups: Sequence[dict]) -> Any:
    """FSDP1's flat shards (either ``use_orig_params`` setting) are partitions of the default group:
    return it for such params, None otherwise. HYBRID_SHARD needs ``process_group=`` explicitly."""
    flattened = any(getattr(p, "_fsdp_flattened", False) for g in param_groups for p in g["params"])
    return dist.group.WORLD if flattened and dist.is_initialized() else None


def mesh_ranks(mesh: Any) -> frozenset[int]:
    """The global ranks of this rank's copy of ``mesh``."""
    return frozenset(mesh.mesh.flatten().tolist())


def root_ranks(mesh: Any) -> frozenset[int]:
    """The ranks of the mesh ``mesh`` was sliced from (itself when it was not)."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    return mesh_ranks(root)


def _group_for(ranks: frozenset[int], meshes: Sequence[Any]) -> Any:
    roots = frozenset().union(*(root_ranks(m) for m in meshes))
    if ranks < roots:
        raise ValueError(
            f"the params' device meshes span ranks {sorted(ranks)} of their root mesh's {sorted(roots)}: the "
            "other ranks may hold other params (pipeline stages) or copies of these, so the global norm is "
            "ambiguous. Pass process_group= over every rank holding distinct params (e.g. "
            "dist.group.WORLD for pipeline stages), or the group over these ranks if the others hold copies"
        )
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    for mesh in meshes:
        if mesh.ndim == 1 and mesh_ranks(mesh) == ranks:
            return mesh.get_group()
    raise ValueError(
        f"the params' device meshes span ranks {sorted(ranks)}, part of a world of {dist.get_world_size()}, "
        "with no 1-D mesh over exactly those ranks: pass process_group= spanning them "
        "(e.g. the flattened data-parallel x tensor-parallel mesh's group)"
    )


def mesh_group(tensors: Sequence[torch.Tensor]) -> Any:
    """The process group spanning the device meshes of the DTensors among ``tensors`` (None when there
    are none): the world when they span it, else the group of a 1-D mesh over exactly those ranks."""
    meshes = list(dict.fromkeys(t.device_mesh for t in tensors if is_dtensor(t)))  # by value
    if not meshes:
        return None
    return _group_for(frozenset().union(*(mesh_ranks(m) for m in meshes)), meshes)


class GradLayout:
    """Which group a param set's grad statistics reduce over and which local grads this rank counts.
    Mesh facts are memoised per mesh value (an optimizer owns one; nothing is cached per module)."""

    def __init__(self) -> None:
        self._mesh_info: dict[Any, tuple[frozenset[int], tuple[int, ...]]] = {}
        self._groups: dict[tuple[Any, ...], Any] = {}
        self._counted: dict[tuple[Any, ...], bool] = {}

    def _info(self, mesh: Any) -> tuple[frozenset[int], tuple[int, ...]]:
        info = self._mesh_info.get(mesh)
        if info is None:
            info = self._mesh_info[mesh] = (mesh_ranks(mesh), tuple(mesh.get_coordinate()))
        return info

    def resolve(self, grads: Sequence[torch.Tensor], explicit_group: Any, plain: bool = False
                ) -> tuple[Any, frozenset[int] | None, frozenset[int]]:
        """(group, its global ranks, the ranks the DTensor grads' meshes span together); the group is
        None, with no ranks, when the statistics are local. ``plain``: the caller knows no grad is a
        DTensor (no scan)."""
        meshes = [] if plain or not any_dtensor(grads) else list(dict.fromkeys(
            g.device_mesh for g in grads if is_dtensor(g)))
        span = frozenset().union(*(self._info(m)[0] for m in meshes)) if meshes else frozenset()
        if explicit_group is not None:
            if not active(explicit_group):
                return explicit_group, None, span
            return explicit_group, frozenset(dist.get_process_group_ranks(explicit_group)), span
        if not meshes:
            return None, None, span
        key = tuple(meshes)
        if key not in self._groups:
            self._groups[key] = _group_for(span, meshes)
        return self._groups[key], span, span

    def counted_here(
        self, grad: torch.Tensor, explicit: bool, group_ranks: frozenset[int] | None, span: frozenset[int]
    ) -> bool:
        """Whether this rank's piece of ``grad`` enters the sum (each element once over the group)."""
        if group_ranks is None:
            return True
        if not is_dtensor(grad):
            return explicit or dist.get_rank() == min(span or group_ranks)
        # The answer depends on the mesh and placements only: asked once per kind of grad (a
        # per-block FSDP2 model has hundreds of grads and a handful of kinds).
        key = (grad.device_mesh, grad.placements, span)
        here = self._counted.get(key)
        if here is None:
            here = self._counted[key] = self._counted_dtensor(grad.device_mesh, grad.placements, span)
        return here

    def _counted_dtensor(self, mesh: Any, placements: Sequence[Any], span: frozenset[int]) -> bool:
        ranks, coords = self._info(mesh)
        for dim, placement in enumerate(placements):
            if placement.is_partial():
                raise ValueError(
                    f"a gradient with placement {placement} on mesh dim {dim} is a pending reduction, "
                    "not a shard: reduce it before step()"
                )
            if placement.is_replicate() and coords[dim] != 0:
                return False
        # Translates of a sub-mesh within the span hold copies: count the one with the span's lowest rank.
        return min(span) in ranks if len(ranks) < len(span) else True


def global_grad_stats(
    grads: Sequence[torch.Tensor], process_group: Any, *, backend: str, layout: GradLayout | None = None,
    plain: bool = False,
) -> torch.Tensor:
    """[sum of squares over every rank's distinct elements, > 0 if any rank saw inf/NaN], fp32.
    ``plain``: the caller knows that no grad is a DTensor (a step's host time saves the scans)."""
    layout = layout if layout is not None else GradLayout()
    group, group_ranks, span = layout.resolve(grads, process_group, plain)
    counted, replicas = [], []
    if group_ranks is None:  # local statistics: every grad counts, no per-grad question to ask
        counted = list(grads) if plain else local_tensors(grads)
    else:
        for g in grads:
            here = layout.counted_here(g, process_group is not None, group_ranks, span)
            (counted if here else replicas).append(local_tensor(g))
    stats = grad_sumsq_and_flag(counted, backend=backend)
    if replicas:
        replica_stats = grad_sumsq_and_flag(replicas, backend=backend)
        stats = stats.to(replica_stats.device)
        stats[1] += replica_stats[1]
    if group is not None and active(group):
        stats = stats.to(device_for(group))
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return stats
