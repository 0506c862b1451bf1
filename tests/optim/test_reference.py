"""Optimizers whose algorithm torch.optim does not have (RAdam at rho_threshold=4, Lookahead, Ranger)
against plain per-tensor references written here, and the bf16/fp16 contract for every optimizer.

Tolerance against the plain references: rtol 1e-5 / atol 1e-6 in fp32 — the references compute the
same formulas with separate tensor ops (no lerp, no fused addcdiv), a few ulps apart per step.
"""

from __future__ import annotations

import math

import pytest
import torch

import dist_optim
from tests.optim._setup import groups, make_params, run

STEPS = 30
REF_TOL = dict(rtol=1e-5, atol=1e-6)


class PlainRAdam:
    """RAdam from the paper's formulas, one tensor at a time (eps added to sqrt(v), as torch and the
    authors' code do)."""

    def __init__(self, params, lr, betas, eps, weight_decay, decoupled, rho_threshold):
        self.params, self.lr, (self.b1, self.b2) = params, lr, betas
        self.eps, self.wd, self.decoupled, self.thr = eps, weight_decay, decoupled, rho_threshold
        self.state = {}

    @torch.no_grad()
    def step(self):
        b1, b2, lr = self.b1, self.b2, self.lr
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state.setdefault(p, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
            st["t"] += 1
            t, g = st["t"], p.grad.clone()
            if self.wd:
                if self.decoupled:
                    p.mul_(1 - lr * self.wd)
                else:
                    g = g + self.wd * p
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            rho_inf = 2 / (1 - b2) - 1
            rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
            if rho_t > self.thr:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                p.sub_(lr * r * math.sqrt(1 - b2**t) / (1 - b1**t) * st["m"] / (st["v"].sqrt() + self.eps))
            else:
                p.sub_(lr / (1 - b1**t) * st["m"])


class PlainLookahead:
    """Every k inner steps: slow += alpha * (fast - slow); fast = slow, for every param (phi_0 = theta_0)."""

    def __init__(self, inner, params, k, alpha):
        self.inner, self.params, self.k, self.alpha = inner, params, k, alpha
        self.slow, self.count = None, 0

    @torch.no_grad()
    def step(self):
        if self.slow is None:
            self.slow = [p.detach().clone() for p in self.params]
        self.inner.step()
        self.count += 1
        if self.count % self.k == 0:
            for p, s in zip(self.params, self.slow):
                s.add_(self.alpha * (p - s))
                p.copy_(s)


def assert_params_close(ours, ref, **tol):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **(tol or REF_TOL))


@pytest.mark.parametrize("decoupled", [False, True])
def test_radam_threshold_4_equals_plain_reference(decoupled):
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    p_ours, p_ref = make_params(), make_params()
    ours = dist_optim.RAdam(p_ours, **kw, decoupled_weight_decay=decoupled, rho_threshold=4.0, backend="torch")
    ref = PlainRAdam(p_ref, **kw, decoupled=decoupled, rho_threshold=4.0)
    run(ours, p_ours, 0, STEPS)
    run(ref, p_ref, 0, STEPS)
    assert_params_close(p_ours, p_ref)
    for p, q in zip(p_ours, p_ref):
        if q in ref.state:
            torch.testing.assert_close(ours.state[p]["exp_avg_sq"], ref.state[q]["v"], **REF_TOL)


def test_radam_threshold_is_honoured():
    """With beta2 = 0.999, rho_5 = 4.99: step 5 is adaptive at threshold 4 and not at 5."""
    assert 4.0 < dist_optim.functional.radam_rho(0.999, 5) < 5.0
    runs = []
    for thr in (4.0, 5.0):
        params = make_params()
        run(dist_optim.RAdam(params, lr=0.01, rho_threshold=thr, backend="torch"), params, 0, 5)
        runs.append(params)
    assert not torch.equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize(
    "inner",
    [
        ("AdamW", dict(lr=0.01, weight_decay=0.1)),
        ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ],
)
def test_lookahead_equals_plain_reference(inner):
    """alpha=0.3 pins the convention: a = 1 - alpha would move the slow weights the other way."""
    name, kw = inner
    p_ours, p_ref = make_params(), make_params()
    ours = dist_optim.Lookahead(getattr(dist_optim, name)(groups(p_ours, kw, kw), backend="torch"), k=3, alpha=0.3)
    ref = PlainLookahead(getattr(torch.optim, name)(groups(p_ref, kw, kw), foreach=False), p_ref, k=3, alpha=0.3)
    run(ours, p_ours, 0, STEPS)
    run(ref, p_ref, 0, STEPS)
    assert_params_close(p_ours, p_ref)
    for p, slow in zip(p_ours, ref.slow):
        if not p.requires_grad:  # frozen: its slow weight is itself, and no state is kept for it
            assert torch.equal(p, slow) and not ours.state.get(p)
            continue
        torch.testing.assert_close(ours.state[p]["slow_buffer"], slow, **REF_TOL)
        assert int(ours.state[p]["lookahead_step"]) == STEPS


def test_lookahead_alpha_convention_matters():
    results = []
    for alpha in (0.3, 0.7):
        params = make_params()
        run(dist_optim.Lookahead(dist_optim.SGD(params, lr=0.1, backend="torch"), k=2, alpha=alpha), params, 0, 4)
        results.append(params[0].detach().clone())
    assert not torch.allclose(results[0], results[1])


@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_ranger_equals_plain_reference(weight_decay, decoupled):
    kw = dict(lr=0.01, betas=(0.95, 0.999), eps=1e-5, weight_decay=weight_decay)
    p_ours, p_ref = make_params(), make_params()
    ours = dist_optim.Ranger(p_ours, **kw, k=4, alpha=0.3, decoupled_weight_decay=decoupled, backend="torch")
    inner = PlainRAdam(p_ref, **kw, decoupled=decoupled, rho_threshold=5.0)
    ref = PlainLookahead(inner, p_ref, k=4, alpha=0.3)
    run(ours, p_ours, 0, STEPS)
    run(ref, p_ref, 0, STEPS)
    assert_params_close(p_ours, p_ref)


def test_ranger_is_lookahead_of_radam_bitwise():
    """In fp32 the fused sync does exactly the ops of Lookahead's separate sync."""
    kw = dict(lr=0.01, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.01)
    p_a, p_b = make_params(), make_params()
    ranger = dist_optim.Ranger(groups(p_a, kw, {**kw, "lr": 0.003}), k=5, alpha=0.6, backend="torch")
    la = dist_optim.Lookahead(dist_optim.RAdam(groups(p_b, kw, {**kw, "lr": 0.003}), backend="torch"), k=5, alpha=0.6)
    run(ranger, p_a, 0, STEPS)
    run(la, p_b, 0, STEPS)
    for a, b in zip(p_a, p_b):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "slow_buffer", "step", "lookahead_step"):
            if key in ranger.state.get(a, {}):
                assert torch.equal(ranger.state[a][key], la.state[b][key]), key


def test_lookahead_works_with_lr_scheduler():
    params = make_params()
    opt = dist_optim.Lookahead(dist_optim.AdamW(params, lr=0.1, backend="torch"), k=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        run(opt, params, step, step + 1)
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adagrad": dict(lr=0.05, lr_decay=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),
    "Adam": dict(lr=0.01, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01),
    "RAdam": dict(lr=0.01, rho_threshold=4.0),
    "Ranger": dict(lr=0.01, k=2, alpha=0.3),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_low_precision_params_use_fp32_math_and_state(name, dtype):
    """A bf16/fp16 param's step is the fp32 step of its upcast value, rounded once; state stays fp32,
    except Ranger's slow weights, kept in the param's dtype (slow_dtype's default): the fp32 slow
    weights of the fp32 reference rounded once. Checked step by step against an fp32 optimizer that
    starts each step from our values."""
    p_low = make_params(dtype)
    ours = getattr(dist_optim, name)(p_low, **OPTIMIZERS[name], backend="torch")
    for step in range(6):
        p_ref = [p.detach().float().requires_grad_(p.requires_grad) for p in p_low]
        ref = getattr(dist_optim, name)(p_ref, **OPTIMIZERS[name], backend="torch")
        if ours.state:
            sd = ours.state_dict()
            ref.load_state_dict(sd)
        run(ours, p_low, step, step + 1)
        for p, q in zip(p_low, p_ref):
            q.grad = None if p.grad is None else p.grad.float()
        ref.step()
        for p, q in zip(p_low, p_ref):
            assert p.dtype == dtype
            assert torch.equal(p, q.to(dtype))
            for key, value in ours.state.get(p, {}).items():
                if key == "slow_buffer":
                    assert value.dtype == dtype and torch.equal(value, ref.state[q][key].to(dtype))
                    continue
                assert value.dtype == torch.float32, key
                assert torch.equal(value, ref.state[q][key]), key
