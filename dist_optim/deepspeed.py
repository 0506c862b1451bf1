"""``import dist_optim.deepspeed``: our optimizers under DeepSpeed (see
dist_optim.integrations.deepspeed). ``import dist_optim`` alone already teaches DeepSpeed's engine
our optimizers; this module gathers the DeepSpeed-specific helpers."""

from .integrations.deepspeed import (
    VALID_TYPES,
    build_from_config,
    initialize,
    install,
    load_checkpoint,
    mark_zero_supported,
    save_checkpoint_atomic,
)
from .integrations.ds_universal import ds_to_universal, load_universal

__all__ = [
    "VALID_TYPES", "build_from_config", "initialize", "install", "load_checkpoint", "mark_zero_supported",
    "save_checkpoint_atomic", "ds_to_universal", "load_universal",
]

install()
