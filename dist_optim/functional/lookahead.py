"""Lookahead's slow-weight update (Zhang et al. 2019), taken every k optimizer steps:

    slow = slow + alpha * (fast - slow);   fast = slow

alpha is the paper's step size towards the fast weights: a text writing slow = a*slow + (1-a)*fast
means a = 1 - alpha. The slow weights may be fp32, bf16 or fp16: the update is computed in fp32
from their stored value and stored rounded to nearest; the fast weights then take the stored slow
weights, rounded to nearest to their own dtype (exact when the two dtypes are the same).
"""

from __future__ import annotations

import torch

from ._common import Tensors, fp32_views, fused_kernels, on_host, reads_device_values, warming, write_back

STATE_KEYS = ("slow_buffer", "lookahead_step")


def lookahead_sync(params: Tensors, slow_buffers: Tensors, *, alpha: float, lookahead_steps: Tensors | None = None,
                   k: int | None = None, skip: torch.Tensor | None = None, backend: str = "torch") -> None:
    """Pull the slow weights towards the params and reset the params to them, in place: every
    tensor given (host flow), or, with ``lookahead_steps`` (advanced counters) and ``k``, those whose
    count is a multiple of k, unless ``skip`` is set (device flow)."""
    kernels = fused_kernels(backend, params, None, {"slow_buffer": slow_buffers})
    if lookahead_steps is not None:
        if reads_device_values(kernels):
            kernels.lookahead_sync(params, slow_buffers, alpha=alpha, la_steps=lookahead_steps, k=k, skip=skip)
            return
        for call in on_host(params, params, {"slow_buffer": slow_buffers}, None, 1.0, skip, lookahead_steps, k):
            if call.sync:
                lookahead_sync(call.params, call.states["slow_buffer"], alpha=alpha, backend=backend)
        return
    if kernels is not None:
        kernels.lookahead_sync(params, slow_buffers, alpha=alpha)
        return
    if warming():
        return
    p32 = fp32_views(params)
    pull_and_reset(p32, list(slow_buffers), alpha)
    write_back(params, p32)


def pull_and_reset(fast32: list[torch.Tensor], slows: list[torch.Tensor], alpha: float) -> None:
    """The torch path of the sync on fp32 fast weights (shared with Ranger's fused step): the slow
    update in fp32, stored in the slow weights' dtype, and the stored value copied to ``fast32``."""
    slow32 = fp32_views(slows)
    diff = torch._foreach_sub(fast32, slow32)
    torch._foreach_add_(slow32, diff, alpha=alpha)
    write_back(slows, slow32)
    torch._foreach_copy_(fast32, slows)
