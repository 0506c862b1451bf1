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

from .integrations.deepspeed import install as _install_deepspeed
from .integrations.torch_zero import install as _install_torch_zero

__version__ = "0.1.0"

# DeepSpeed's engine learns our optimizers (ds_config types, ZeRO support, clipping ownership, the
# data-parallel group) whenever DeepSpeed is imported, so plain deepspeed.initialize and
# accelerate's plugin work without a wrapper; torch's ZeroRedundancyOptimizer binds its group into
# ours. Nothing is imported until then.
_install_deepspeed()
_install_torch_zero()

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "Lookahead", "Ranger", "LBFGS",
    "FusedOptimizer", "NonFiniteGradientError",
]
