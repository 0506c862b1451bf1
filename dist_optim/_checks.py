"""Argument checks shared by the optimizers: each raises ValueError naming the argument and value."""

from __future__ import annotations

import math
from typing import Any

import torch

BACKENDS = ("auto", "torch", "triton", "cpu")
NONFINITE_MODES = ("skip", "raise", "apply")
BF16_UPDATES = ("nearest", "stochastic", "kahan")
# Lookahead's slow-weight dtypes by name (None: each param's own dtype)
SLOW_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _real(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        # A one-element tensor (lr as torch.optim allows it: changed in place by a scheduler, read
        # by the kernels on the device). Its value is read here, at construction or load, only.
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a real number or a one-element float tensor, got {value!r}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    v = _real(name, value)
    if v < 0.0 or math.isinf(v):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and >= 0)")
    return v


def positive(name: str, value: Any) -> float:
    v = _real(name, value)
    if v <= 0.0 or math.isinf(v):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and > 0)")
    return v


def in_unit_interval(name: str, value: Any, *, closed: bool = False) -> float:
    """0 <= value < 1, or 0 <= value <= 1 with closed=True."""
    v = _real(name, value)
    ok = 0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0
    if not ok:
        bound = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {bound})")
    return v


def betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid betas: {value!r} (must be a pair (beta1, beta2))")
    return in_unit_interval("betas[0]", value[0]), in_unit_interval("betas[1]", value[1])


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")
    return value


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {', '.join(map(repr, choices))})")
    return value


def grad_scale(value: Any):
    """A positive float, or a one-element fp32 tensor (an accumulation divisor kept on the device)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype != torch.float32:
            raise ValueError(f"grad_scale must be a positive float or a one-element fp32 tensor, got {value!r}")
        return value
    return positive("grad_scale", value)


def max_grad_norm(value: Any) -> float | None:
    return None if value is None else positive("max_grad_norm", value)


def bf16_update(value: Any) -> str:
    return one_of("bf16_update", value, BF16_UPDATES)


def rounding_seed(value: Any) -> int:
    """A seed of stochastic rounding's streams: an int in [0, 2**64) (hashed as two 32-bit words)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"Invalid rounding_seed: {value!r} (must be an integer in [0, 2**64))")
    return value


def slow_dtype(value: Any) -> torch.dtype | None:
    """Lookahead's slow-weight dtype: None (the param's), a torch dtype or a name of SLOW_DTYPES."""
    if value is None:
        return None
    if isinstance(value, str) and value in SLOW_DTYPES:
        return SLOW_DTYPES[value]
    if isinstance(value, torch.dtype) and value in SLOW_DTYPES.values():
        return value
    names = ", ".join(["None", *map(repr, SLOW_DTYPES), "torch.float32", "torch.bfloat16", "torch.float16"])
    raise ValueError(f"Invalid slow_dtype: {value!r} (must be one of {names})")
