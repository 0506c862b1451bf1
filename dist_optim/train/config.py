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
from ..state.layout import check_state_dtype

STRATEGIES = ("single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
MIXED_PRECISION = ("no", "bf16", "fp16")  # accelerate's names
# The model's own weights: fp32, or bf16 with no fp32 master copy (pure-bf16 training, where
# ``bf16_update`` decides how each update is rounded into the weights).
PARAM_DTYPES = ("fp32", "bf16")
BF16_UPDATES = ("nearest", "stochastic", "kahan")
LAUNCHERS = ("dist-optim", "accelerate", "external")
# schedule when the ds_config's "scheduler" section sets the lr (DeepSpeed steps it in engine.step()).
DS_SCHEDULE = "ds_config"
# Warmup steps when none are given: this many, but at most a tenth of a short run.
DEFAULT_WARMUP = 20
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
    warmup: int | None = None  # None: min(DEFAULT_WARMUP, steps // 10)
    accum: int = 1
    max_grad_norm: float | None = 1.0
    state_dtype: str = "fp32"
    param_dtype: str = "fp32"
    bf16_update: str = "nearest"
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
    mixed_precision: str = "no"
    # Who started the ranks: accelerate's runs are prepared with accelerate's own functions.
    launcher: str = "dist-optim"
    # zero1/2/3 only: the DeepSpeed config the engine gets as is (a launcher's config file, resolved
    # by dist_optim.train.accelerate_launch); None builds one from the flags above.
    ds_config: dict | None = None

    def __post_init__(self) -> None:
        if self.ds_optimizer is not None:
            # The ds_config's optimizer runs; the record names it as written there.
            self.optimizer = str(self.ds_optimizer.get("type", ""))
        elif self.optimizer.lower() not in optimizer_names():
            raise ValueError(f"Invalid optimizer: {self.optimizer!r} (choose from {', '.join(optimizer_names())})")
        else:
            self.optimizer = self.optimizer.lower()
        _checks.one_of("strategy", self.strategy, STRATEGIES)
        _checks.one_of("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _checks.one_of("launcher", self.launcher, LAUNCHERS)
        if self.ds_config is not None and not self.strategy.startswith("zero"):
            raise ValueError(f"Invalid ds_config: given with strategy {self.strategy!r} (it configures zero1/zero2/zero3)")
        if self.mixed_precision == "fp16" and not self.strategy.startswith("zero"):
            raise ValueError(
                f"Invalid mixed_precision: 'fp16' with strategy {self.strategy!r} (fp16 needs loss scaling, which "
                "only the DeepSpeed strategies run here; use bf16)"
            )
        if self.schedule == DS_SCHEDULE:
            if self.ds_config is None or "scheduler" not in self.ds_config:
                raise ValueError(f"Invalid schedule: {DS_SCHEDULE!r} (no ds_config with a scheduler section)")
        else:
            _checks.one_of("schedule", self.schedule, DECAYS)
        _checks.one_of("device", self.device, ("cpu", "cuda"))
        for name in ("nproc", "steps", "accum", "batch_size", "context", "dim", "layers", "heads", "data_bytes",
                     "log_every", "eval_every", "ckpt_every"):
            _checks.positive_int(name, getattr(self, name))
        if self.strategy == "single" and self.nproc != 1:
            raise ValueError(f"Invalid nproc: {self.nproc} (strategy 'single' runs one process)")
        if self.warmup is None:
            self.warmup = min(DEFAULT_WARMUP, self.steps // 10)
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"Invalid warmup: {self.warmup} (must be in [0, steps={self.steps}))")
        if self.lr is not None:
            _checks.positive("lr", self.lr)
        _checks.max_grad_norm(self.max_grad_norm)
        check_state_dtype(self.state_dtype)
        if self.state_dtype != "fp32" and self.ds_optimizer is not None:
            raise ValueError(f"Invalid state_dtype: {self.state_dtype!r} with a ds_config naming the optimizer "
                             "(set \"state_dtype\" in its \"params\")")
        _checks.one_of("param_dtype", self.param_dtype, PARAM_DTYPES)
        _checks.one_of("bf16_update", self.bf16_update, BF16_UPDATES)
        if self.bf16_update != "nearest" and self.param_dtype != "bf16":
            raise ValueError(f"Invalid bf16_update: {self.bf16_update!r} with param_dtype {self.param_dtype!r} "
                             "(it rounds updates into bf16 weights: pass param_dtype='bf16')")
        if self.param_dtype == "bf16":
            if self.strategy.startswith("zero"):
                raise ValueError(f"Invalid param_dtype: 'bf16' with strategy {self.strategy!r} (DeepSpeed steps fp32 "
                                 "master copies; use its bf16 mixed precision: mixed_precision='bf16')")
            if self.mixed_precision != "no":
                raise ValueError(f"Invalid param_dtype: 'bf16' with mixed_precision {self.mixed_precision!r} (the "
                                 "weights are already bf16; mixed precision keeps fp32 weights)")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"Invalid data: {self.data!r} (no such file)")

    @property
    def ds_optimizer(self) -> dict | None:
        """The ds_config's ``"optimizer"`` entry, when the DeepSpeed config names the optimizer."""
        return None if self.ds_config is None else self.ds_config.get("optimizer")

    def optimizer_kwargs(self) -> dict:
        """What the flags give the optimizer's constructor (state_dtype and bf16_update only where
        they are not the default, so that optimizers without them take these kwargs too)."""
        kwargs = dict(lr=self.learning_rate, max_grad_norm=self.max_grad_norm)
        if self.state_dtype != "fp32":
            kwargs["state_dtype"] = self.state_dtype
        if self.bf16_update != "nearest":
            kwargs["bf16_update"] = self.bf16_update
        return kwargs

    @property
    def torch_param_dtype(self):
        import torch

        return torch.bfloat16 if self.param_dtype == "bf16" else torch.float32

    @property
    def learning_rate(self) -> float:
        base = self.optimizer.removeprefix("lookahead-")
        return self.lr if self.lr is not None else DEFAULT_LR[base]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls(**json.loads(text))
