"""zero1/zero2/zero3: the char-LM under a DeepSpeed engine with our optimizer as ZeRO's inner
optimizer; the engine does gradient accumulation and checkpoints (atomically, see
dist_optim.integrations.deepspeed)."""

from __future__ import annotations

import torch

from ..integrations import deepspeed as dod
from ..registry import build_optimizer
from .config import TrainConfig
from .model import lm_loss


class DeepSpeedRunner:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> None:
        stage = int(cfg.strategy[-1])
        zero = {"stage": stage}
        if stage == 3:
            zero["stage3_param_persistence_threshold"] = 0
        config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.accum,
            "zero_optimization": zero,
            "steps_per_print": 10**9,
        }
        if cfg.max_grad_norm is None:
            config["gradient_clipping"] = 0.0  # no clipping asked for: not DeepSpeed's default 1.0 either
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm)
        self.engine, self.zero_optimizer, _, _ = dod.initialize(model=model, optimizer=self.optimizer, config=config)
        self.device = device

    def _skips(self) -> int:
        base = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        return base.skipped_steps + int(getattr(self.engine, "skipped_steps", 0))

    def train_step(self, window) -> tuple[float, bool]:
        before = self._skips()
        total = 0.0
        for x, y in window:  # the engine accumulates and steps at the boundary
            loss = lm_loss(self.engine, x.to(self.device), y.to(self.device))
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        return total / len(window), self._skips() != before

    @property
    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            base = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            return base.last_grad_norm
        return float(norm)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(lm_loss(self.engine, x.to(self.device), y.to(self.device)))

    def save(self, root: str, step: int, extra: dict) -> None:
        dod.save_checkpoint_atomic(self.engine, root, step, extra=extra)

    def load(self, path: str) -> dict:
        return dod.load_checkpoint(self.engine, path)
