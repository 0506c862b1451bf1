"""Training decisions that every rank takes identically at the same step: the metric is averaged
over the process group first (one scalar all-reduce), then the usual rule runs on that mean."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _checks
from .collectives import global_mean


class ReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """torch.optim.lr_scheduler.ReduceLROnPlateau on the metric's mean over ranks."""

    def __init__(self, optimizer: torch.optim.Optimizer, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(optimizer, *args, **kwargs)
        self.process_group = process_group

    def step(self, metrics: float, epoch: Any = None) -> None:  # type: ignore[override]
        mean = global_mean(float(metrics), self.process_group)
        if epoch is None:
            super().step(mean)
        else:
            super().step(mean, epoch)


class EarlyStopping:
    """Stop when the rank-averaged metric has not improved by ``min_delta`` for ``patience`` checks.

    ``step(metric)`` returns True on every rank at the same call once training should stop.
    """

    def __init__(self, patience: int = 10, *, min_delta: float = 0.0, mode: str = "min", process_group: Any = None):
        self.patience = _checks.positive_int("patience", patience)
        self.min_delta = _checks.non_negative("min_delta", min_delta)
        self.mode = _checks.one_of("mode", mode, ("min", "max"))
        self.process_group = process_group
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_checks = 0

    def step(self, metric: float) -> bool:
        value = global_mean(float(metric), self.process_group)
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.bad_checks = value, 0
        else:
            self.bad_checks += 1
        return self.bad_checks >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_checks = float(state["best"]), int(state["bad_checks"])
