"""state_dict round trips continue bit-identically; a state_dict that does not fit is refused with a
ValueError before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch

import dist_optim
from tests.optim._factories import CONFIGS, assert_identical, snapshot
from tests.optim._setup import clone_params, make_params, run


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_mid_run_continues_bit_identically(name):
    params = make_params()
    opt = CONFIGS[name](params, backend="torch")
    run(opt, params, 0, 10)
    saved_params, saved_sd = clone_params(params), copy.deepcopy(opt.state_dict())
    run(opt, params, 10, 25)

    resumed = clone_params(saved_params)
    opt2 = CONFIGS[name](resumed, backend="torch")
    opt2.load_state_dict(saved_sd)
    run(opt2, resumed, 10, 25)
    assert_identical(snapshot(opt, params), snapshot(opt2, resumed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loaded_state_is_a_copy_in_fp32(name):
    params = make_params(torch.bfloat16)
    opt = CONFIGS[name](params, backend="torch")
    run(opt, params, 0, 4)
    sd = opt.state_dict()
    opt2 = CONFIGS[name](clone_params(params), backend="torch")
    opt2.load_state_dict(sd)
    for pstate, loaded in zip(sd["state"].values(), opt2.state_dict()["state"].values()):
        for key, value in loaded.items():
            # slow weights are kept in the param's dtype (slow_dtype's default), the rest in fp32
            assert value.dtype == (torch.bfloat16 if key == "slow_buffer" else torch.float32), key
            assert value.numel() == 0 or value.data_ptr() != pstate[key].data_ptr()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loaded_hyperparameters_are_copies(name):
    """A tensor lr from a state_dict is the loader's own, as torch.optim's loading deep-copies the
    groups: a scheduler stepping the loaded optimizer leaves the source's lr alone."""
    params = make_params()
    opt = CONFIGS[name](params, backend="torch")
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]))
    run(opt, params, 0, 2)
    opt2 = CONFIGS[name](clone_params(params), backend="torch")
    opt2.load_state_dict(opt.state_dict())
    before = [float(g["lr"]) for g in opt.param_groups]
    for group in opt2.param_groups:
        group["lr"].mul_(0.5)  # what a scheduler does to a tensor lr
    assert [float(g["lr"]) for g in opt.param_groups] == before


def _trained(name, params=None):
    params = make_params() if params is None else params
    opt = CONFIGS[name](params, backend="torch")
    run(opt, params, 0, 4)
    return opt, params


@pytest.mark.parametrize(
    "source,target",
    [("Adam", "SGD"), ("SGD", "RMSprop"), ("AdamW", "Ranger"), ("Ranger", "Adagrad"), ("Lookahead(AdamW)", "RAdam")],
)
def test_state_from_another_optimizer_is_refused_and_changes_nothing(source, target):
    src, _ = _trained(source)
    dst, params = _trained(target)
    before = snapshot(dst, params)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in dst.param_groups])
    with pytest.raises(ValueError, match="different optimizer class or configuration"):
        dst.load_state_dict(src.state_dict())
    assert_identical(before, snapshot(dst, params))
    assert groups_before == [{k: v for k, v in g.items() if k != "params"} for g in dst.param_groups]


def test_state_for_other_shapes_is_refused_and_changes_nothing():
    src, _ = _trained("AdamW")
    other = [torch.zeros(s, requires_grad=True) for s in [(2,), (7,), (3, 5), (0,), (33,), (4, 4)]] + [torch.zeros(3)]
    dst, params = _trained("AdamW", other)
    before = snapshot(dst, params)
    with pytest.raises(ValueError, match=r"has shape \(1,\), but its param has shape \(2,\)"):
        dst.load_state_dict(src.state_dict())
    assert_identical(before, snapshot(dst, params))


def test_state_with_other_group_layout_is_refused():
    src, _ = _trained("Adam")
    params = make_params()
    dst = dist_optim.Adam([{"params": params[:3]}, {"params": params[3:]}])
    with pytest.raises(ValueError, match="param groups"):
        dst.load_state_dict(src.state_dict())


def test_loads_torch_optim_adam_state():
    """Same algorithm, same state keys: a torch.optim.Adam checkpoint resumes in ours."""
    p_torch, p_ours = make_params(), make_params()
    theirs = torch.optim.Adam(p_torch, lr=0.01)
    run(theirs, p_torch, 0, 5)
    ours = dist_optim.Adam(clone_params(p_torch), lr=0.01, backend="torch")
    resumed = ours.param_groups[0]["params"]
    ours.load_state_dict(theirs.state_dict())
    run(theirs, p_torch, 5, 10)
    run(ours, resumed, 5, 10)
    for a, b in zip(resumed, p_torch):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    del p_ours
