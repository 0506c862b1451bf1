"""dist-optim: fused, numerically exact optimizers for DeepSpeed ZeRO and PyTorch FSDP2."""

from .optim import (
    SGD,
    Adagrad,
    Adam,
    AdamW,
    LBFGS,
    FusedOptimizer,
    Lookahead,
    NonFiniteGradientError,
    RAdam,
    Ranger,
    RMSprop,
)

__version__ = "0.1.0"

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "Lookahead", "Ranger", "LBFGS",
    "FusedOptimizer", "NonFiniteGradientError",
]
