"""Checkpoints of int8 state: ``state_dict()`` holds every moment in fp32 form shaped like its param,
a load quantizes it again; at the same layout the round trip is bit-exact, and fp32-state and
int8-state checkpoints load into either mode."""

from __future__ import annotations

import pytest
import torch

import dist_optim
from dist_optim.state import MIN_QUANTIZED_NUMEL
from dist_optim.state.layout import QBLOCK, absmax_key, dequantize_state, quantize_state
from tests.optim._factories import assert_identical, snapshot
from tests.optim.test_int8_state import FAMILIES, MOMENTS, int8_params, run


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_requantizing_dequantized_codes_gives_them_back(key):
    """The exactness a same-layout resume rests on, over blocks of very different scales, heavy
    tails, a zero block and a partial last block."""
    gen = torch.Generator().manual_seed(0)
    n = 40 * QBLOCK + 77
    x = torch.randn(n, generator=gen) ** 3 * torch.logspace(-12, 3, n).roll(5000)
    if key == "exp_avg_sq":
        x = x.abs()
    x[QBLOCK: 2 * QBLOCK] = 0.0
    codes, absmax = quantize_state(x, key)
    again_codes, again_absmax = quantize_state(dequantize_state(codes, absmax, key), key)
    assert torch.equal(again_codes, codes)
    assert torch.equal(again_absmax.view(torch.int32), absmax.view(torch.int32))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_state_dict_is_fp32_and_a_same_layout_resume_is_bit_exact(name):
    params = int8_params()
    opt = FAMILIES[name](params, backend="torch", state_dtype="int8")
    run(opt, params, 0, 4)
    sd = opt.state_dict()
    for i, p in enumerate(params):
        for key, value in sd["state"].get(i, {}).items():
            assert not key.endswith("_absmax")
            if key in MOMENTS[name]:
                assert value.dtype == torch.float32 and value.shape == p.shape
    assert any(absmax_key(MOMENTS[name][0]) in opt.state[p] for p in params)  # the live state stays int8

    resumed_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    resumed = FAMILIES[name](resumed_params, backend="torch", state_dtype="int8")
    resumed.load_state_dict(sd)
    assert_identical(snapshot(opt, params), snapshot(resumed, resumed_params))
    run(opt, params, 4, 7)
    run(resumed, resumed_params, 4, 7)
    assert_identical(snapshot(opt, params), snapshot(resumed, resumed_params))


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_fp32_checkpoint_into_int8_optimizer_and_back(name):
    params = int8_params()
    fp32 = FAMILIES[name](params, backend="torch")
    run(fp32, params, 0, 3)
    sd = fp32.state_dict()

    into_int8 = FAMILIES[name]([p.detach().clone().requires_grad_(p.requires_grad) for p in params],
                               backend="torch", state_dtype="int8")
    into_int8.load_state_dict(sd)
    int8_params_ = [p for g in into_int8.param_groups for p in g["params"]]
    for i, p in enumerate(int8_params_):
        state = into_int8.state.get(p)
        if not state:
            continue
        for key in MOMENTS[name]:
            saved = sd["state"][i][key]
            if p.numel() >= MIN_QUANTIZED_NUMEL:  # quantized on load, block by block
                codes, absmax = quantize_state(saved, key)
                assert torch.equal(state[key], codes) and torch.equal(state[absmax_key(key)], absmax)
            else:
                assert torch.equal(state[key], saved)

    back = FAMILIES[name]([p.detach().clone().requires_grad_(p.requires_grad) for p in params], backend="torch")
    back.load_state_dict(into_int8.state_dict())
    back_params = [p for g in back.param_groups for p in g["params"]]
    for i, p in enumerate(back_params):
        for key in MOMENTS[name]:
            if p in back.state and key in back.state[p]:
                assert back.state[p][key].dtype == torch.float32 and back.state[p][key].shape == p.shape
                src = into_int8.state[int8_params_[i]]
                if absmax_key(key) in src:
                    want = dequantize_state(src[key], src[absmax_key(key)], key, p.shape)
                    assert torch.equal(back.state[p][key], want)


def test_lookahead_round_trip_of_int8_state():
    params = int8_params()
    opt = dist_optim.Lookahead(dist_optim.AdamW(params, lr=0.01, backend="torch", state_dtype="int8"), k=2)
    run(opt, params, 0, 3)
    copies = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    other = dist_optim.Lookahead(dist_optim.AdamW(copies, lr=0.01, backend="torch", state_dtype="int8"), k=2)
    other.load_state_dict(opt.state_dict())
    run(opt, params, 3, 6)
    run(other, copies, 3, 6)
    assert_identical(snapshot(opt, params), snapshot(other, copies))


def test_a_state_dict_holding_codes_is_refused_with_the_reason():
    params = int8_params()
    opt = FAMILIES["AdamW"](params, backend="torch", state_dtype="int8")
    run(opt, params, 0, 1)
    raw = torch.optim.Optimizer.state_dict(opt)  # torch's packing of the live int8 state
    fresh = FAMILIES["AdamW"]([p.detach().clone() for p in params], backend="torch", state_dtype="int8")
    with pytest.raises(ValueError, match="int8 codes .*exp_avg_absmax"):
        fresh.load_state_dict(raw)
    assert not fresh.state
