"""A step's control values, decided on the device in one single-program launch: the update's
gradient scale (grad_scale times the clip coefficient), whether the step is skipped (a non-finite
gradient), the gradient norm, the count of skipped steps, and every step counter advanced unless
the step is skipped. The update kernels then read ``control[0:1]`` as grad_scale and
``control[1:2]`` as skip: a step with clipping, skipping and per-tensor step counts and no host sync.

The arithmetic is the host's (dist_optim.optim.base), all in fp32 with grad_scale taken as an fp32
value: norm = sqrt(sumsq) * grad_scale, and
torch.nn.utils.clip_grad_norm_'s coefficient, max_norm / (norm + 1e-6) as torch evaluates a
float over a tensor (reciprocal, then product), clamped to 1 (NaN stays NaN), all fp32. The kernel
is compiled without FP contraction, so that no multiply-add fuses into an FMA the host does not do.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _launch, _multi_tensor
from ._jit import scalar

CONTROL_FIELDS = ("scale", "skip", "norm", "skipped_total")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


@triton.jit
def _decide(CONTROL, STATS, gs, max_grad_norm, CLIP: tl.constexpr, SKIP_NONFINITE: tl.constexpr):
    """(scale, skip) from the all-reduced [sumsq, flag]; writes norm and skipped_total."""
    sumsq = tl.load(STATS)
    flag = tl.load(STATS + 1)
    norm = tl.sqrt_rn(sumsq) * gs
    bad = (flag > 0.0) | (sumsq != sumsq) | (tl.abs(sumsq) == float("inf"))
    if SKIP_NONFINITE:
        skip = bad
    else:
        skip = tl.full([], 0, tl.int1)
    if CLIP:
        coef = tl.div_rn(tl.full([], 1.0, tl.float32), norm + 1e-6) * max_grad_norm
        coef = tl.where(coef > 1.0, 1.0, coef)  # not minimum(): a NaN coefficient stays NaN
        scale = coef * gs
    else:
        scale = gs
    tl.store(CONTROL + 2, norm)
    tl.store(CONTROL + 3, tl.load(CONTROL + 3) + skip.to(tl.float32))
    return scale, skip


@triton.jit(do_not_specialize=["n_counters"])
def _step_control_kernel(CONTROL, STATS, COUNTERS, n_counters, grad_scale, max_grad_norm,
                         HAS_STATS: tl.constexpr, CLIP: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
                         BLOCK: tl.constexpr):
    # fp32 as on a GPU: the interpreter would otherwise carry float arguments as fp64.
    gs = scalar(grad_scale).to(tl.float32)
    if HAS_STATS:
        scale, skip = _decide(CONTROL, STATS, gs, scalar(max_grad_norm).to(tl.float32), CLIP, SKIP_NONFINITE)
    else:
        scale, skip = gs, tl.full([], 0, tl.int1)
    tl.store(CONTROL, scale)
    tl.store(CONTROL + 1, skip.to(tl.float32))
    advance = 1.0 - skip.to(tl.float32)
    for off in range(0, n_counters, BLOCK):
        i = off + tl.arange(0, BLOCK).to(tl.int64)
        mask = i < n_counters
        counter = tl.load(COUNTERS + i, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(counter, tl.load(counter, mask=mask) + advance, mask=mask)


def as_fp32(value):
    """A float rounded to the nearest fp32 value (a GPU launch passes float arguments as fp32; the
    interpreter would carry the double and truncate it in the kernel's casts); tensors unchanged."""
    return value if isinstance(value, torch.Tensor) else struct.unpack("f", struct.pack("f", float(value)))[0]


def check_control(control) -> None:
    if not (isinstance(control, torch.Tensor) and control.dtype == torch.float32 and control.numel() == 4
            and control.is_contiguous()):
        raise ValueError("control must be a contiguous 4-element fp32 tensor: [scale, skip, norm, skipped_total]")


def check_stats(stats, device: torch.device) -> None:
    if not (isinstance(stats, torch.Tensor) and stats.dtype == torch.float32 and stats.numel() == 2
            and stats.is_contiguous() and stats.device == device):
        raise ValueError(f"stats must be a contiguous 2-element fp32 tensor [sumsq, flag] on {device}")


def step_control(control: torch.Tensor, *, stats: torch.Tensor | None = None, grad_scale=1.0,
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 counters: Sequence[torch.Tensor] = ()) -> None:
    """Fill ``control`` = [scale, skip, norm, skipped_total] (fp32, on the device) in one launch.

    With ``stats`` ([sum of squares, non-finite flag], already all-reduced): norm =
    sqrt(sumsq) * grad_scale; the step is bad when the flag is > 0 or sumsq is not finite, and
    skipped (skip = 1) when bad and ``skip_nonfinite``; scale = grad_scale * min(max_grad_norm /
    (norm + 1e-6), 1) with ``max_grad_norm``, else grad_scale; skipped_total += skip. Without
    ``stats``: scale = grad_scale, skip = 0, norm and skipped_total unchanged. ``grad_scale``: a
    float or a one-element fp32 device tensor. ``counters``: distinct one-element fp32 device tensors
    (every step counter of the step), each advanced by 1 unless the step is skipped; their pointer
    table is cached per set of tensors."""
    check_control(control)
    device = control.device
    if stats is not None:
        check_stats(stats, device)
    table = _multi_tensor.TABLES.pointers(
        counters, device, validate=lambda: _multi_tensor.check_counters("counters", [control] * len(counters), counters)
    )
    _launch.run(
        _step_control_kernel, (1,), device, control, control if stats is None else stats, table, len(counters),
        _multi_tensor.device_scalar("grad_scale", as_fp32(grad_scale), device),
        0.0 if max_grad_norm is None else as_fp32(max_grad_norm),
        HAS_STATS=stats is not None, CLIP=max_grad_norm is not None, SKIP_NONFINITE=bool(skip_nonfinite),
        BLOCK=_multi_tensor.BLOCK, num_warps=_multi_tensor.NUM_WARPS, enable_fp_fusion=False,
    )
