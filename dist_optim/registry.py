"""Optimizers by name, for the command line and config files, with a clear error for an unknown one."""

from __future__ import annotations

from typing import Any

from . import optim

OPTIMIZERS: dict[str, type] = {
    "sgd": optim.SGD,
    "adagrad": optim.Adagrad,
    "rmsprop": optim.RMSprop,
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "radam": optim.RAdam,
    "ranger": optim.Ranger,
}
# "lookahead-<name>": Lookahead around <name>.
LOOKAHEAD_PREFIX = "lookahead-"


def names() -> list[str]:
    return [*OPTIMIZERS, *(LOOKAHEAD_PREFIX + n for n in OPTIMIZERS if n != "ranger")]


def build_optimizer(name: str, params: Any, *, lookahead: dict | None = None, **kwargs: Any):
    """``OPTIMIZERS[name](params, **kwargs)``, wrapped in Lookahead(**lookahead) for 'lookahead-<name>'."""
    key = name.lower()
    inner = key[len(LOOKAHEAD_PREFIX):] if key.startswith(LOOKAHEAD_PREFIX) else key
    if inner not in OPTIMIZERS or (inner != key and inner == "ranger"):
        raise ValueError(f"Invalid optimizer: {name!r} (choose from {', '.join(names())})")
    opt = OPTIMIZERS[inner](params, **kwargs)
    return optim.Lookahead(opt, **(lookahead or {})) if inner != key else opt
