"""Warmup followed by a decay, assembled from torch.optim.lr_scheduler (no home-made scheduler), for
any of our optimizers, Lookahead included (it shares the wrapped optimizer's param groups)."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import lr_scheduler

from .. import _checks

DECAYS = ("constant", "cosine", "linear", "step", "cyclic")


def warmup_schedule(
    optimizer: Any,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    min_lr_ratio: float = 0.0,
    step_size: int | None = None,
    gamma: float = 0.1,
    cycle_steps: int | None = None,
) -> lr_scheduler.LRScheduler:
    """Linear warmup from ~0 to each group's lr over ``warmup_steps``, then ``decay`` over the rest:

    - ``cosine``: CosineAnnealingLR down to ``min_lr_ratio`` x lr at ``total_steps``;
    - ``linear``: LinearLR down to ``min_lr_ratio`` x lr at ``total_steps``;
    - ``step``: StepLR, x ``gamma`` every ``step_size`` steps;
    - ``cyclic``: CyclicLR (triangular) between ``min_lr_ratio`` x lr and lr, a cycle every
      ``cycle_steps``; the warmup then rises to the cycle's lower bound, where the cycle starts;
    - ``constant``: the lr as it is.
    Call ``scheduler.step()`` once per optimizer step.
    """
    total_steps = _checks.positive_int("total_steps", total_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (must be an integer in [0, total_steps={total_steps}))")
    decay = _checks.one_of("decay", decay, DECAYS)
    min_lr_ratio = _checks.in_unit_interval("min_lr_ratio", min_lr_ratio, closed=True)
    rest = total_steps - warmup_steps
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    if decay == "cosine":
        after = lr_scheduler.CosineAnnealingLR(optimizer, T_max=rest, eta_min=0.0)
        # CosineAnnealingLR takes one absolute eta_min; a ratio per group is a LambdaLR on the same curve.
        if min_lr_ratio > 0.0:
            after = lr_scheduler.LambdaLR(
                optimizer, lambda s: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, rest) / rest))
            )
    elif decay == "linear":
        after = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=max(min_lr_ratio, 1e-8), total_iters=rest)
    elif decay == "step":
        after = lr_scheduler.StepLR(optimizer, step_size=_checks.positive_int("step_size", step_size), gamma=_checks.positive("gamma", gamma))
    elif decay == "cyclic":
        half = _checks.positive_int("cycle_steps", cycle_steps) // 2 or 1
        after = lr_scheduler.CyclicLR(
            optimizer, base_lr=[min_lr_ratio * lr for lr in base_lrs], max_lr=base_lrs,
            step_size_up=half, cycle_momentum=False,
        )
    else:
        after = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return after
    for group, lr in zip(optimizer.param_groups, base_lrs):  # each built scheduler moved the lr
        group["lr"] = lr
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return lr_scheduler.SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])
