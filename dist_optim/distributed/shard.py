"""The tensor a rank owns: a DTensor's local shard, or the tensor itself (ZeRO partitions, plain params)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage the update kernels read and write in place. A DTensor's is taken
    directly rather than through ``to_local()``, an autograd function whose dispatch costs more
    host time per tensor than the rest of a step's bookkeeping (the step runs under no_grad and
    writes the same storage either way)."""
    if is_dtensor(t):
        local = getattr(t, "_local_tensor", None)
        return local if local is not None else t.to_local()
    return t


def local_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``local_tensor`` of each; when none is a DTensor (plain params, ZeRO partitions) the scan is
    one C-level pass, which matters for a step's host time over hundreds of tensors."""
    tensors = list(tensors)
    if not any_dtensor(tensors):
        return tensors
    return [local_tensor(t) for t in tensors]


def any_dtensor(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any is a DTensor, in one C-level pass."""
    return DTensor is not None and any(map(DTensor.__instancecheck__, tensors))


def new_state_like(param: torch.Tensor, *, fill: float = 0.0, copy: bool = False,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A state tensor of ``dtype`` (fp32 unless said) laid out like ``param`` (a DTensor with the same
    placements for a DTensor param, so DCP saves and reshards it with its param); zero/``fill``, or a
    copy of the param's values (rounded to nearest where ``dtype`` is narrower)."""
    local = local_tensor(param).detach()
    if copy:
        state = local.to(dtype=dtype, copy=True)
    else:
        state = torch.full_like(local, fill, dtype=dtype, memory_format=torch.contiguous_format)
    if is_dtensor(param):
        return DTensor.from_local(
            state, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return state
