"""Small helpers over torch.distributed that work the same with and without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active(group: Any = None) -> bool:
    """True when there is more than one rank to agree with."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def device_for(group: Any = None) -> torch.device:
    """Where a small tensor must live for a collective on this group (gloo: CPU, NCCL: CUDA)."""
    if active(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_scalars(values: list[float], op: Any = None, group: Any = None) -> list[float]:
    """Reduce a few Python numbers across ranks in one collective (fp64, so integers stay exact)."""
    if not active(group):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device_for(group))
    dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return t.tolist()


def global_mean(value: float, group: Any = None) -> float:
    """The mean of ``value`` over the group's ranks (``value`` itself on one process)."""
    if not active(group):
        return float(value)
    (total,) = all_reduce_scalars([float(value)], group=group)
    return total / dist.get_world_size(group)
