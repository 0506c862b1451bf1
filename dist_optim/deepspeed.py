"""``import dist_optim.deepspeed``: our optimizers under DeepSpeed ZeRO (see
dist_optim.integrations.deepspeed). Importing marks them ZeRO-supported."""

from .integrations.deepspeed import (
    VALID_TYPES,
    build_from_config,
    initialize,
    load_checkpoint,
    mark_zero_supported,
    prepare,
    save_checkpoint_atomic,
)
from .integrations.ds_universal import ds_to_universal, load_universal

__all__ = [
    "VALID_TYPES", "build_from_config", "initialize", "load_checkpoint", "mark_zero_supported", "prepare",
    "save_checkpoint_atomic", "ds_to_universal", "load_universal",
]

try:
    mark_zero_supported()
except ImportError:  # deepspeed is not installed: initialize() will say so when called
    pass
