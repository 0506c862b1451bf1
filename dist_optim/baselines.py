"""What each of our optimizers is measured against: the torch.optim class with the same algorithm
(None where torch.optim has none) and the bytes one step moves per element, for the benchmarks' GB/s.

Tests and benchmarks both import this table, so the comparison a test proves is the one a benchmark
times.
"""

from __future__ import annotations

import torch

# name -> (torch.optim class or None, fp32 tensors read, fp32 tensors written) per element, with
# the configuration the benchmarks run (momentum on for SGD; RMSprop plain).
BASELINES: dict[str, tuple[type | None, int, int]] = {
    "SGD": (torch.optim.SGD, 3, 2),  # read p, g, momentum; write p, momentum
    "Adagrad": (torch.optim.Adagrad, 3, 2),  # p, g, sum
    "RMSprop": (torch.optim.RMSprop, 3, 2),  # p, g, square_avg
    "Adam": (torch.optim.Adam, 4, 3),  # p, g, exp_avg, exp_avg_sq
    "AdamW": (torch.optim.AdamW, 4, 3),
    "RAdam": (torch.optim.RAdam, 4, 3),
    "Ranger": (None, 5, 4),  # RAdam's + slow weights, on a sync step
}

BENCH_KWARGS: dict[str, dict] = {
    "SGD": dict(lr=1e-3, momentum=0.9),
    "Adagrad": dict(lr=1e-2),
    "RMSprop": dict(lr=1e-3),
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3),
    "RAdam": dict(lr=1e-3),
    "Ranger": dict(lr=1e-3, k=1),  # k=1: every step is a sync step, the fused kernel's worst case
}


def torch_equivalent(name: str) -> type | None:
    return BASELINES[name][0]
