"""Lookahead's slow-weight update (Zhang et al. 2019), taken every k optimizer steps:

    slow = slow + alpha * (fast - slow);   fast = slow

alpha is the paper's step size towards the fast weights: a text writing slow = a*slow + (1-a)*fast
means a = 1 - alpha.
"""

from __future__ import annotations

import torch

from ._common import Tensors, fp32_views, fused_kernels, on_host, reads_device_values, write_back

STATE_KEYS = ("slow_buffer", "lookahead_step")


def lookahead_sync(params: Tensors, slow_buffers: Tensors, *, alpha: float, lookahead_steps: Tensors | None = None,
                   k: int | None = None, skip: torch.Tensor | None = None, backend: str = "torch") -> None:
    """Pull the fp32 slow weights towards the params and reset the params to them, in place: every
    tensor given (host flow), or, with ``lookahead_steps`` (advanced counters) and ``k``, those whose
    count is a multiple of k, unless ``skip`` is set (device flow)."""
    kernels = fused_kernels(backend, params, None, {"slow_buffer": slow_buffers})
    if lookahead_steps is not None:
        if reads_device_values(kernels):
            kernels.lookahead_sync(params, slow_buffers, alpha=alpha, la_steps=lookahead_steps, k=k, skip=skip)
            return
        for ps, _, ss, _, _, sync in on_host(params, params, {"slow_buffer": slow_buffers}, None, 1.0, skip,
                                             lookahead_steps, k):
            if sync:
                lookahead_sync(ps, ss["slow_buffer"], alpha=alpha, backend=backend)
        return
    if kernels is not None:
        kernels.lookahead_sync(params, slow_buffers, alpha=alpha)
        return
    p32 = fp32_views(params)
    pull_and_reset(p32, list(slow_buffers), alpha)
    write_back(params, p32)


def pull_and_reset(fast32: list[torch.Tensor], slows: list[torch.Tensor], alpha: float) -> None:
    """The torch path of the sync on fp32 fast weights (shared with Ranger's fused step)."""
    diff = torch._foreach_sub(fast32, slows)
    torch._foreach_add_(slows, diff, alpha=alpha)
    torch._foreach_copy_(fast32, slows)
