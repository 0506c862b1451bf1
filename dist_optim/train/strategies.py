"""How the model and optimizer are set up and stepped under each strategy. The training loop only
sees a runner: ``train_step(window) -> (mean loss, skipped)``, ``save``/``load``, ``optimizer``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..distributed.accumulation import GradientAccumulation
from ..distributed.checkpoint import load_checkpoint, save_checkpoint
from ..registry import build_optimizer
from .config import TrainConfig
from .model import lm_loss


def _optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return dict(lr=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm)


class TorchRunner:
    """single, ddp and fsdp2: our optimizer stepping the module's (local) params, accumulation with
    gradient sync only on the last micro-batch, DCP checkpoints."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> None:
        if cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        elif cfg.strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.model, self.device = model, device
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters(), **_optimizer_kwargs(cfg))
        self.accum = GradientAccumulation(model, self.optimizer, cfg.accum)

    def train_step(self, window: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, bool]:
        total = torch.zeros((), device=self.device)
        for (x, y), sync in self.accum.micro_batches(window):
            with sync:
                loss = lm_loss(self.model, x.to(self.device), y.to(self.device))
                loss.backward()
            total += loss.detach()
        skipped_before = self.optimizer.skipped_steps
        self.accum.step()
        return float(total) / len(window), self.optimizer.skipped_steps != skipped_before

    @property
    def grad_norm(self) -> float | None:
        return self.optimizer.last_grad_norm

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(lm_loss(self.model, x.to(self.device), y.to(self.device)))

    def save(self, root: str, step: int, extra: dict) -> None:
        save_checkpoint(root, self.model, self.optimizer, step=step, extra=extra)

    def load(self, root: str) -> dict:
        return load_checkpoint(root, self.model, self.optimizer)


def make_runner(cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
    if cfg.strategy.startswith("zero"):
        from .deepspeed_runner import DeepSpeedRunner

        return DeepSpeedRunner(cfg, model, device)
    return TorchRunner(cfg, model, device)
