"""How the model and optimizer are set up and stepped under each strategy. The training loop only
sees a runner: ``train_step(window) -> (mean loss, skipped)``, ``save``/``load``, ``optimizer`` and
``facts()`` (what actually runs, for the record)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from ..distributed.accumulation import GradientAccumulation
from ..distributed.checkpoint import load_checkpoint, save_checkpoint
from ..registry import build_optimizer
from .config import TrainConfig
from .model import lm_loss
from .report import optimizer_label




class TorchRunner:
    """single, ddp and fsdp2: our optimizer stepping the module's (local) params, accumulation with
    gradient sync only on the last micro-batch, DCP checkpoints. Under ``accelerate launch`` the
    model and optimizer are prepared by accelerate (see accelerate_prepare)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.mp_policy = None  # FSDP2's MixedPrecisionPolicy, when bf16 runs that way
        # bf16 without FSDP2 (single, ddp) runs under autocast; FSDP2 casts through its policy.
        self._autocast = cfg.mixed_precision == "bf16" and cfg.strategy != "fsdp2"
        if cfg.launcher == "accelerate":
            from .accelerate_prepare import prepare

            self.model, self.optimizer, self.mp_policy = prepare(cfg, model, device, self._make_optimizer)
            self._autocast = False  # accelerate's prepare wrapped the forward in autocast where it runs one
        else:
            self.model = self._prepare(cfg, model, device)
            self.optimizer = self._make_optimizer(self.model)
        self.accum = GradientAccumulation(self.model, self.optimizer, cfg.accum)

    def _make_optimizer(self, model: torch.nn.Module):
        return build_optimizer(self.cfg.optimizer, model.parameters(), **self.cfg.optimizer_kwargs())

    def _prepare(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            if cfg.mixed_precision == "bf16":
                # bf16 compute, fp32 gradient reduction: the sum over ranks keeps fp32's precision.
                self.mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            kwargs = dict(mesh=mesh, mp_policy=self.mp_policy or MixedPrecisionPolicy())
            for block in model.blocks:
                fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)
        return model

    def _forward_context(self) -> contextlib.AbstractContextManager:
        if self._autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def facts(self) -> dict:
        facts = dict(
            engine=self.cfg.strategy,
            prepared_by=self.cfg.launcher if self.cfg.launcher == "accelerate" else "dist-optim",
            mixed_precision=self.cfg.mixed_precision,
            optimizer=optimizer_label(self.optimizer),
            final_lr=self.optimizer.param_groups[0]["lr"],
            sharded=any(type(p).__name__ == "DTensor" for p in self.model.parameters()),
            activation_checkpointing=any(isinstance(m, CheckpointWrapper) for m in self.model.modules()),
            weights_dtype=str(next(self.model.parameters()).dtype),
        )
        if self.mp_policy is not None:
            facts.update(param_dtype=str(self.mp_policy.param_dtype), reduce_dtype=str(self.mp_policy.reduce_dtype))
        elif self.cfg.mixed_precision == "bf16":
            facts.update(autocast="torch.bfloat16")
        return facts

    def train_step(self, window: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, bool]:
        total = torch.zeros((), device=self.device)
        for (x, y), sync in self.accum.micro_batches(window):
            with sync:
                with self._forward_context():
                    loss = lm_loss(self.model, x.to(self.device), y.to(self.device))
                loss.backward()
            total += loss.detach().float()
        skipped_before = self.optimizer.skipped_steps
        self.accum.step()
        return float(total) / len(window), self.optimizer.skipped_steps != skipped_before

    @property
    def grad_norm(self) -> float | None:
        return self.optimizer.last_grad_norm

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad(), self._forward_context():
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
