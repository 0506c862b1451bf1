"""warmup_schedule: linear warmup, then each decay, on every optimizer including Lookahead."""

from __future__ import annotations

import math

import pytest
import torch

import dist_optim
from dist_optim.optim.schedules import warmup_schedule
from tests.optim._factories import CONFIGS


def lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_warmup_then_cosine_on_every_optimizer(name):
    opt = CONFIGS[name]([torch.zeros(3, requires_grad=True)], backend="torch")
    base = opt.param_groups[0]["lr"]
    got = lrs(opt, warmup_schedule(opt, total_steps=12, warmup_steps=4, decay="cosine"), 12)
    warm = [base * (i + 1) / 5 for i in range(4)]
    cos = [base * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert got == pytest.approx(warm + cos, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "decay,kw,expected",
    [
        ("linear", dict(min_lr_ratio=0.5), [1.0, 1.0 - 0.5 / 4, 1.0 - 1 / 4, 1.0 - 1.5 / 4, 0.5, 0.5]),
        ("step", dict(step_size=2, gamma=0.1), [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]),
        ("cyclic", dict(cycle_steps=4, min_lr_ratio=0.2), [0.2, 0.6, 1.0, 0.6, 0.2, 0.6]),
        ("constant", {}, [1.0] * 6),
        ("cosine", dict(min_lr_ratio=0.1), [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, 4) / 4)) for i in range(6)]),
    ],
)
def test_decays_without_warmup(decay, kw, expected):
    opt = dist_optim.Lookahead(dist_optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0))
    assert lrs(opt, warmup_schedule(opt, total_steps=4, decay=decay, **kw), 6) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(total_steps=0), "total_steps: 0"),
        (dict(total_steps=5, warmup_steps=5), "warmup_steps: 5"),
        (dict(total_steps=5, decay="exp"), "decay: 'exp'"),
        (dict(total_steps=5, decay="step"), "step_size: None"),
        (dict(total_steps=5, min_lr_ratio=2.0), "min_lr_ratio: 2.0"),
    ],
)
def test_bad_schedule_arguments(kw, message):
    opt = dist_optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=message):
        warmup_schedule(opt, **kw)
