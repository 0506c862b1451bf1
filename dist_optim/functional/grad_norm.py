"""The gradients' sum of squares and a non-finite flag, in one read of the gradients.

The result is a 2-element fp32 tensor [sum of squares, non-finite flag] so that a distributed run
can all-reduce (SUM) both with one collective: the flag stays > 0 when any rank saw inf/NaN.
"""

from __future__ import annotations

import torch

from ._common import Tensors, fused_kernels


def grad_sumsq_and_flag(grads: Tensors, *, backend: str = "torch") -> torch.Tensor:
    """[sum of squares, 1.0 if any element is inf/NaN (or the sum overflowed) else 0.0], fp32."""
    kernels = fused_kernels(backend, grads) if grads else None
    if kernels is not None:  # they pass over empty tensors
        return kernels.sumsq_nonfinite(grads)
    if not all(map(torch.Tensor.numel, grads)):  # the usual case in one C-level pass
        grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros(2, dtype=torch.float32)
    wide = [g for g in grads if g.dtype == torch.float64]
    if wide:  # fp32 norms cannot take fp64 grads (no narrowing): theirs in fp64, then as fp32
        narrow = [g for g in grads if g.dtype != torch.float64]
        norms = [n.float() for n in torch._foreach_norm(wide, 2)]
        norms += list(torch._foreach_norm(narrow, 2, dtype=torch.float32)) if narrow else []
    else:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    device = grads[0].device
    sumsq = torch.stack([n.to(device) for n in norms]).square().sum()
    flag = (~torch.isfinite(sumsq)).to(torch.float32)
    return torch.stack([sumsq, flag])
