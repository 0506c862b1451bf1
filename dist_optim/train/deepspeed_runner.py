"""zero1/zero2/zero3: the char-LM under a DeepSpeed engine with our optimizer as ZeRO's inner
optimizer; the engine does gradient accumulation, bf16/fp16 and checkpoints (atomically, see
dist_optim.integrations.deepspeed). The engine's config is the launcher's DeepSpeed config when
there is one (``cfg.ds_config``, its optimizer included), else one built from the flags."""

from __future__ import annotations

import copy

import torch

from .. import deepspeed as dod  # the public entry: also marks our optimizers ZeRO-supported
from ..registry import build_optimizer
from .config import TrainConfig
from .model import lm_loss
from .report import optimizer_label


class DeepSpeedRunner:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> None:
        config = copy.deepcopy(cfg.ds_config) if cfg.ds_config is not None else _config_from_flags(cfg)
        client = None
        if cfg.ds_optimizer is None:
            client = build_optimizer(cfg.optimizer, model.parameters(), **cfg.optimizer_kwargs())
        self.engine, self.zero_optimizer, _, _ = dod.initialize(model=model, optimizer=client, config=config)
        # The optimizer the engine steps (ours from the flags or the one its config names): the
        # schedule sets its lr and its counters tell skipped steps.
        self.optimizer = self.engine.basic_optimizer
        self.device = device

    def _base(self):
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def _skips(self) -> int:
        return getattr(self._base(), "skipped_steps", 0) + int(getattr(self.engine, "skipped_steps", 0))

    def facts(self) -> dict:
        """What the engine runs, read back from it rather than from the config it was given."""
        engine = self.engine
        return dict(
            engine="deepspeed",
            zero_stage=engine.zero_optimization_stage(),
            micro_batch_size=engine.train_micro_batch_size_per_gpu(),
            gradient_accumulation_steps=engine.gradient_accumulation_steps(),
            mixed_precision="bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "no",
            gradient_clipping=engine.gradient_clipping(),
            optimizer=optimizer_label(self.optimizer),
            final_lr=self.optimizer.param_groups[0]["lr"],
            lr_scheduler=type(engine.lr_scheduler).__name__ if engine.lr_scheduler is not None else None,
        )

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
            return getattr(self._base(), "last_grad_norm", None)
        return float(norm)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(lm_loss(self.engine, x.to(self.device), y.to(self.device)))

    def save(self, root: str, step: int, extra: dict) -> None:
        dod.save_checkpoint_atomic(self.engine, root, step, extra=extra)

    def load(self, path: str) -> dict:
        return dod.load_checkpoint(self.engine, path)


def _config_from_flags(cfg: TrainConfig) -> dict:
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
    if cfg.mixed_precision != "no":
        config[cfg.mixed_precision] = {"enabled": True}
    if cfg.max_grad_norm is None:
        config["gradient_clipping"] = 0.0  # no clipping asked for: not DeepSpeed's default 1.0 either
    return config
