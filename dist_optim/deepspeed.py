"""``import dist_optim.deepspeed``: our optimizers under DeepSpeed ZeRO (see
dist_optim.integrations.deepspeed). Importing marks them ZeRO-supported."""

from .integrations.deepspeed import VALID_TYPES, build_from_config, initialize, mark_zero_supported, prepare

__all__ = ["VALID_TYPES", "build_from_config", "initialize", "mark_zero_supported", "prepare"]

try:
    mark_zero_supported()
except ImportError:  # deepspeed is not installed: initialize() will say so when called
    pass
