"""A step's control values from the gradients' statistics, computed where the step runs:

    norm  = sqrt(sum of squares) * grad_scale                (the clipped-by norm, fp32)
    bad   = non-finite flag > 0  or  sum of squares not finite
    skip  = bad and skip_nonfinite
    scale = grad_scale * min(max_grad_norm / (norm + 1e-6), 1)   (torch.nn.utils.clip_grad_norm_)
    each counter += 1 unless skip;   skipped steps += skip

``control`` is [scale, skip, norm, skipped steps] (fp32, in place). Without statistics the scale is
``grad_scale``, nothing is skipped and the norm is left as it was.
"""

from __future__ import annotations

import torch

from ._common import Tensors, fused_kernels, reads_device_values

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against division by a zero norm


def step_control(
    control: torch.Tensor,
    *,
    stats: torch.Tensor | None,
    grad_scale=1.0,
    max_grad_norm: float | None = None,
    skip_nonfinite: bool = False,
    counters: Tensors = (),
    backend: str = "torch",
) -> None:
    kernels = fused_kernels(backend, [control])
    if reads_device_values(kernels):
        kernels.step_control(control, stats=stats, grad_scale=grad_scale, max_grad_norm=max_grad_norm,
                             skip_nonfinite=skip_nonfinite, counters=counters)
        return
    # grad_scale as an fp32 value, all arithmetic fp32 (the kernel's; a Python float would make torch
    # multiply in double on a CPU tensor).
    scale = grad_scale if isinstance(grad_scale, torch.Tensor) else torch.tensor(grad_scale, dtype=torch.float32)
    scale = scale.to(control.device).reshape(())
    if stats is None:
        control[0] = scale
        control[1] = 0.0
    else:
        sumsq, flag = stats[0], stats[1]
        norm = sumsq.sqrt() * scale
        skip = ((flag > 0) | ~torch.isfinite(sumsq)) & skip_nonfinite
        coef = torch.clamp(max_grad_norm / (norm + CLIP_EPS), max=1.0) if max_grad_norm is not None else 1.0
        control[0] = coef * scale
        control[1] = skip.to(torch.float32)
        control[2] = norm
        control[3] += control[1]
    if counters:
        torch._foreach_add_(list(counters), 1.0 - control[1])
