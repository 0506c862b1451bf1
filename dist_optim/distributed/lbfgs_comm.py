"""The one collective L-BFGS issues per closure evaluation.

Everything a step needs from the other ranks after evaluating the loss — the mean loss, the new dot
products of the gradient (with the direction, the previous gradient, itself and the history) and
the gradient's and direction's max-norms — goes into one SUM all-reduce of a small fp64 vector:
sums directly, maxima in per-rank slots (each rank fills its own; the others stay 0, and the
values are >= 0) from which the max is taken after the reduction.

Who counts what: DTensor shards (FSDP2) follow their placements as the grad statistics do (a
copy replicated along a mesh dim, HSDP's replicas or a TP-replicated norm, counts once), and
FSDP1's flat shards are disjoint pieces, so their dot products add up over ranks; plain replicated
params (DDP, or one process) hold the same values on every rank, so only the group's first rank
contributes their dot products. The loss is every rank's own and is averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .collectives import active, device_for
from .grad_stats import GradLayout, mesh_group
from .shard import is_dtensor, local_tensor


def lbfgs_group(params: Sequence[torch.Tensor], explicit: Any) -> Any:
    """The process group: explicit, else the DTensor params' mesh, else the default group when one
    is initialised (DDP: replicated params, the loss still averages), else None."""
    if explicit is not None:
        return explicit
    group = mesh_group(params)
    if group is not None:
        return group
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def counted_first(params: Sequence[torch.Tensor], group: Any) -> tuple[list[torch.Tensor], int]:
    """``params`` with those whose local elements this rank counts in the sums first, and how many
    elements they hold: every rank's piece is then counted exactly once over the group."""
    ranks = frozenset(dist.get_process_group_ranks(group)) if active(group) else None
    layout = GradLayout()
    span = layout.resolve(params, group)[2]

    def here(p: torch.Tensor) -> bool:
        if ranks is None or getattr(p, "_fsdp_flattened", False):
            return True
        if is_dtensor(p):
            return layout.counted_here(p, False, ranks, span)
        return dist.get_rank() == min(span or ranks)

    flags = [here(p) for p in params]
    counted = [p for p, c in zip(params, flags) if c]
    rest = [p for p, c in zip(params, flags) if not c]
    return counted + rest, sum(local_tensor(p).numel() for p in counted)


class Reducer:
    """Sums and maxima over the group in one all-reduce; counts its calls (for tests and benchmarks)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group) if active(group) else 1
        self.rank = dist.get_rank(group) if active(group) else 0
        self.calls = 0
        self.bytes = 0

    def __call__(self, sums: Sequence[float | torch.Tensor], maxima: Sequence[float | torch.Tensor]) -> tuple[list[float], list[float]]:
        parts = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in sums]
        local_max = [float(v) for v in maxima]
        if not active(self.group):
            return torch.cat(parts).tolist() if parts else [], local_max
        slots = torch.zeros(self.world, len(local_max), dtype=torch.float64)
        slots[self.rank] = torch.tensor(local_max, dtype=torch.float64)
        payload = torch.cat([*parts, slots.reshape(-1)]).to(device_for(self.group))
        dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group)
        self.calls += 1
        self.bytes += payload.numel() * payload.element_size()
        payload = payload.cpu()
        n = payload.numel() - slots.numel()
        return payload[:n].tolist(), payload[n:].view(self.world, len(local_max)).max(dim=0).values.tolist()
