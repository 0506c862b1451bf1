"""The training job's configuration, validated on construction so that bad input fails before any
process is started or any file is written."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .. import _checks
from ..optim.schedules import DECAYS
from ..registry import names as optimizer_names

STRATEGIES = ("single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
# Learning rates that train the default char-LM well, per optimizer family.
DEFAULT_LR = {"sgd": 0.3, "adagrad": 0.03, "rmsprop": 1e-3, "adam": 3e-3, "adamw": 3e-3, "radam": 3e-3, "ranger": 3e-3}


@dataclass(kw_only=True)
class TrainConfig:
    optimizer: str = "adamw"
    strategy: str = "fsdp2"
    nproc: int = 2
    steps: int = 300
    out: str = "out/train"
    lr: float | None = None
    schedule: str = "cosine"
    warmup: int = 20
    accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    batch_size: int = 8
    context: int = 128
    dim: int = 128
    layers: int = 2
    heads: int = 4
    data: str | None = None
    data_bytes: int = 2_000_000
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 100
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.optimizer.lower() not in optimizer_names():
            raise ValueError(f"Invalid optimizer: {self.optimizer!r} (choose from {', '.join(optimizer_names())})")
        self.optimizer = self.optimizer.lower()
        _checks.one_of("strategy", self.strategy, STRATEGIES)
        _checks.one_of("schedule", self.schedule, DECAYS)
        _checks.one_of("device", self.device, ("cpu", "cuda"))
        for name in ("nproc", "steps", "accum", "batch_size", "context", "dim", "layers", "heads", "data_bytes",
                     "log_every", "eval_every", "ckpt_every"):
            _checks.positive_int(name, getattr(self, name))
        if self.strategy == "single" and self.nproc != 1:
            raise ValueError(f"Invalid nproc: {self.nproc} (strategy 'single' runs one process)")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"Invalid warmup: {self.warmup} (must be in [0, steps={self.steps}))")
        if self.lr is not None:
            _checks.positive("lr", self.lr)
        _checks.max_grad_norm(self.max_grad_norm)
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"Invalid data: {self.data!r} (no such file)")

    @property
    def learning_rate(self) -> float:
        base = self.optimizer.removeprefix("lookahead-")
        return self.lr if self.lr is not None else DEFAULT_LR[base]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls(**json.loads(text))
