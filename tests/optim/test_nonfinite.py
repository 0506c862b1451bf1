"""nonfinite="skip" leaves params and state byte-identical and counts the skip; "raise" raises and
changes nothing; "apply" is torch's behaviour (the NaN flows into the params)."""

from __future__ import annotations

import pytest
import torch

from dist_optim import NonFiniteGradientError
from tests.optim._factories import CONFIGS, assert_identical, snapshot
from tests.optim._setup import clone_params, make_params, run, set_grads


def _poison(params, value):
    params[4].grad[5] = value


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_skip_changes_nothing_and_counts(name, bad):
    params = make_params()
    opt = CONFIGS[name](params, backend="torch")
    run(opt, params, 0, 3)
    before = snapshot(opt, params)
    set_grads(params, 3)
    _poison(params, bad)
    opt.step()
    assert opt.skipped_steps == 1
    assert_identical(before, snapshot(opt, params))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_skipped_step_is_as_if_it_never_happened(name):
    """Skipping does not roll the step counters (bias corrections, Lookahead's k) forward."""
    p_a, p_b = make_params(), make_params()
    a, b = CONFIGS[name](p_a, backend="torch"), CONFIGS[name](p_b, backend="torch")
    run(a, p_a, 0, 5)
    set_grads(p_a, 99)
    _poison(p_a, float("nan"))
    a.step()
    run(a, p_a, 5, 12)
    run(b, p_b, 0, 12)
    assert_identical(snapshot(a, p_a), snapshot(b, p_b))


@pytest.mark.parametrize("name", ["AdamW", "Lookahead(AdamW)", "Ranger"])
def test_skip_on_first_step_creates_no_state(name):
    params = make_params()
    opt = CONFIGS[name](params, backend="torch")
    set_grads(params, 0)
    _poison(params, float("nan"))
    opt.step()
    assert not any(opt.state.values())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_raise_mode_raises_and_changes_nothing(name):
    params = make_params()
    opt = CONFIGS[name](params, backend="torch", nonfinite="raise")
    run(opt, params, 0, 3)
    before = snapshot(opt, params)
    set_grads(params, 3)
    _poison(params, float("inf"))
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_identical(before, snapshot(opt, params))


def test_apply_mode_lets_nan_through_like_torch():
    params = make_params()
    opt = CONFIGS["AdamW"](params, backend="torch", nonfinite="apply")
    set_grads(params, 0)
    _poison(params, float("nan"))
    opt.step()
    assert torch.isnan(params[4][5]) and opt.skipped_steps == 0


def test_skip_with_clipping_reports_the_norm():
    params = clone_params(make_params())
    opt = CONFIGS["AdamW"](params, backend="torch", max_grad_norm=1.0)
    set_grads(params, 0)
    _poison(params, float("inf"))
    opt.step()
    assert opt.skipped_steps == 1 and opt.last_grad_norm == float("inf")
