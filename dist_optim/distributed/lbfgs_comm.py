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
from .shard import local_tensor


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
        if getattr(p, "_fsdp_flattened", False):
            return True
        return layout.counted_here(p, False, ranks, span)

    flags = [here(p) for p in params]
    counted = [p for p, c in zip(params, flags) if c]
    rest = [p for p, c in zip(params, flags) if not c]
    return counted + rest, sum(local_tensor(p).numel() for p in counted)


class Reducer:
    """Sums and maxima over the group in one all-reduce, read back to the host in one copy; counts
    its calls (for tests and benchmarks).

    The values arrive as tensors on the device they were computed on and stay there until the one
    read: nothing is read one scalar at a time, and the payload moves to another device only where
    the group's backend needs it (gloo takes CPU tensors), in one copy.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group) if active(group) else 1
        self.rank = dist.get_rank(group) if active(group) else 0
        self.calls = 0
        self.bytes = 0

    def __call__(self, sums: Sequence[torch.Tensor], maxima: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
        """``sums``: tensors (any shape) whose elements are summed over ranks; ``maxima``: 0-d
        tensors >= 0 maxed over ranks; all on one device. Returns both as flat lists of floats."""
        device = (sums[0] if sums else maxima[0]).device
        if any(v.device != device for v in (*sums, *maxima)):
            raise ValueError(f"L-BFGS reduction: every value must be on {device}, got "
                             f"{sorted({str(v.device) for v in (*sums, *maxima)})}")
        parts = [v.reshape(-1).to(torch.float64) for v in sums]
        peaks = torch.stack([v.to(torch.float64) for v in maxima]) if maxima else torch.zeros(0, dtype=torch.float64, device=device)
        nmax = peaks.numel()
        if not active(self.group):
            values = torch.cat([*parts, peaks]).tolist()
            return values[:len(values) - nmax], values[len(values) - nmax:]
        slots = torch.zeros(self.world, nmax, dtype=torch.float64, device=device)
        slots[self.rank] = peaks
        payload = torch.cat([*parts, slots.reshape(-1)])
        target = device_for(self.group)
        if payload.device != target:
            payload = payload.to(target)
        dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group)
        self.calls += 1
        self.bytes += payload.numel() * payload.element_size()
        values = payload.tolist()
        n = len(values) - slots.numel()
        per_rank = values[n:]
        return values[:n], [max(per_rank[j::nmax]) for j in range(nmax)]
