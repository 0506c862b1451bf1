"""Checkpoints of int8 state (one process): ``state_dict()`` saves each quantized moment as codes
and absmax where the param's shape has an int8 checkpoint form (a 1-D param; m % 256 == 0
elements per dim-0 slice) and in fp32 form otherwise; a same-layout resume is bit-exact in both
forms, in memory and through torch.save; fp32-state and int8-state checkpoints load into either
mode; malformed int8 entries are refused naming the entry."""

from __future__ import annotations

import copy

import io

import pytest
import torch

import dist_optim
from dist_optim.state import MIN_QUANTIZED_NUMEL
from dist_optim.state.layout import QBLOCK, absmax_key, codes_key, dequantize_state, quantize_state
from tests.optim._factories import assert_identical, snapshot
from tests.optim.test_int8_state import FAMILIES, MOMENTS, int8_params, run

ROWS_OF_512 = (48, 512)  # two blocks per dim-0 slice: int8 form, absmax [48, 2]


def ckpt_params(seed: int = 0) -> list[torch.Tensor]:
    """int8_params (1-D int8-form params of 4101 and 4096 elements, a (65, 66) fp32-form one, the
    small fp32-state ones, a grad-None-sometimes one, a frozen one) plus a (48, 512) matrix."""
    params = int8_params(seed)
    gen = torch.Generator().manual_seed(seed + 2)
    return params[:-1] + [torch.randn(ROWS_OF_512, generator=gen).requires_grad_()] + params[-1:]


def clones(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def expected_form(p: torch.Tensor) -> str | None:
    if p.numel() < MIN_QUANTIZED_NUMEL:
        return None
    return "int8" if p.dim() == 1 or (p[0].numel() % QBLOCK == 0) else "fp32"


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
def test_checkpoint_form_per_param_shape(name):
    """int8 form: uint8 codes shaped like the param and absmax per dim-0 slice, views of the live
    state (no copy); fp32 form where a block would straddle two dim-0 slices."""
    params = ckpt_params()
    opt = FAMILIES[name](params, backend="torch", state_dtype="int8")
    run(opt, params, 0, 4)
    sd = opt.state_dict()
    seen = set()
    for i, p in enumerate(params):
        live = opt.state.get(p, {})
        for key in MOMENTS[name]:
            if key not in live and codes_key(key) not in sd["state"].get(i, {}):
                continue
            saved = sd["state"][i]
            form = expected_form(p)
            seen.add(form)
            if form == "int8":
                codes, absmax = saved[codes_key(key)], saved[absmax_key(key)]
                assert key not in saved and codes.dtype == torch.uint8 and codes.shape == p.shape
                blocks = (-(-p.numel() // QBLOCK),) if p.dim() == 1 else (p.shape[0], p[0].numel() // QBLOCK)
                assert absmax.dtype == torch.float32 and absmax.shape == blocks
                assert codes.data_ptr() == live[key].data_ptr() and absmax.data_ptr() == live[absmax_key(key)].data_ptr()
            else:
                assert codes_key(key) not in saved and absmax_key(key) not in saved
                assert saved[key].dtype == torch.float32 and saved[key].shape == p.shape
    assert {"int8", "fp32", None} <= seen
    assert any(absmax_key(MOMENTS[name][0]) in opt.state[p] for p in params)  # the live state stays int8


def _through_torch_save(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("via_file", [False, True], ids=["in_memory", "torch_save"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_same_layout_resume_is_bit_exact(name, via_file):
    """Codes, absmax, counters and params identical after the load, and after three more steps."""
    params = ckpt_params()
    opt = FAMILIES[name](params, backend="torch", state_dtype="int8")
    run(opt, params, 0, 4)
    sd = opt.state_dict()
    if via_file:
        sd = _through_torch_save(sd)
    resumed_params = clones(params)
    resumed = FAMILIES[name](resumed_params, backend="torch", state_dtype="int8")
    resumed.load_state_dict(sd)
    assert_identical(snapshot(opt, params), snapshot(resumed, resumed_params))
    run(opt, params, 4, 7)
    run(resumed, resumed_params, 4, 7)
    assert_identical(snapshot(opt, params), snapshot(resumed, resumed_params))


def _saved_bytes(sd) -> int:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.tell()


def test_an_int8_checkpoint_takes_about_a_byte_per_element_and_a_quarter_of_fp32():
    """AdamW on a (256, 1024) matrix: each moment is N bytes of codes plus 4 N / 256 of absmax
    (2.031 N in all, against 8 N for fp32 state); torch.save's framing adds a few kB."""
    n = 256 * 1024
    sizes = {}
    for dtype in ("fp32", "int8"):
        p = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).requires_grad_()
        opt = dist_optim.AdamW([p], backend="torch", state_dtype=dtype)
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
        opt.step()
        sd = opt.state_dict()
        tensor_bytes = sum(v.numel() * v.element_size() for v in sd["state"][0].values() if v.dim() > 0)
        sizes[dtype] = (tensor_bytes, _saved_bytes(sd))
    assert sizes["int8"][0] == 2 * (n + 4 * n // QBLOCK)
    assert sizes["fp32"][0] == 2 * 4 * n
    framing = 8192
    assert sizes["int8"][1] <= sizes["int8"][0] + framing and sizes["fp32"][1] >= sizes["fp32"][0]
    assert sizes["int8"][1] / sizes["fp32"][1] < 0.26


@pytest.mark.parametrize("name", ["AdamW", "Ranger", "RMSprop"])
def test_fp32_checkpoint_into_int8_optimizer_and_back(name):
    """fp32 state loads quantized block by block over each param (exactly quantize_state of the
    saved values); int8 state loads into an fp32 optimizer as its dequantized values, from either
    checkpoint form."""
    params = ckpt_params()
    fp32 = FAMILIES[name](params, backend="torch")
    run(fp32, params, 0, 3)
    sd = fp32.state_dict()

    int8_copies = clones(params)
    into_int8 = FAMILIES[name](int8_copies, backend="torch", state_dtype="int8")
    into_int8.load_state_dict(sd)
    checked = 0
    for i, p in enumerate(int8_copies):
        state = into_int8.state.get(p)
        for key in MOMENTS[name]:
            if not state or key not in state:
                continue
            saved = sd["state"][i][key]
            if p.numel() >= MIN_QUANTIZED_NUMEL:
                codes, absmax = quantize_state(saved, key)
                assert torch.equal(state[key], codes) and torch.equal(state[absmax_key(key)], absmax)
                checked += 1
            else:
                assert torch.equal(state[key], saved)
    assert checked >= 4

    int8_sd = into_int8.state_dict()
    assert any(codes_key(k) in s for s in int8_sd["state"].values() for k in MOMENTS[name])
    back_params = clones(params)
    back = FAMILIES[name](back_params, backend="torch")
    back.load_state_dict(_through_torch_save(int8_sd))
    for p, src_p in zip(back_params, int8_copies):
        src = into_int8.state.get(src_p, {})
        for key in MOMENTS[name]:
            if key not in src:
                continue
            got = back.state[p][key]
            assert got.dtype == torch.float32 and got.shape == p.shape
            want = dequantize_state(src[key], src[absmax_key(key)], key, p.shape) if absmax_key(key) in src else src[key]
            assert torch.equal(got, want)


def test_lookahead_round_trip_of_int8_state():
    params = ckpt_params()
    opt = dist_optim.Lookahead(dist_optim.AdamW(params, lr=0.01, backend="torch", state_dtype="int8"), k=2)
    run(opt, params, 0, 3)
    sd = opt.state_dict()
    assert codes_key("exp_avg") in sd["state"][len(params) - 2] and "slow_buffer" in sd["state"][len(params) - 2]
    copies = clones(params)
    other = dist_optim.Lookahead(dist_optim.AdamW(copies, lr=0.01, backend="torch", state_dtype="int8"), k=2)
    other.load_state_dict(_through_torch_save(sd))
    run(opt, params, 3, 6)
    run(other, copies, 3, 6)
    assert_identical(snapshot(opt, params), snapshot(other, copies))


def _trained_adamw():
    params = ckpt_params()
    opt = FAMILIES["AdamW"](params, backend="torch", state_dtype="int8")
    run(opt, params, 0, 1)
    return params, opt


def test_a_state_dict_holding_codes_in_the_live_layout_is_refused_with_the_reason():
    params, opt = _trained_adamw()
    raw = torch.optim.Optimizer.state_dict(opt)  # torch's packing of the live int8 state
    fresh = FAMILIES["AdamW"](clones(params), backend="torch", state_dtype="int8")
    with pytest.raises(ValueError, match="live layout .*exp_avg with exp_avg_absmax"):
        fresh.load_state_dict(raw)
    assert not fresh.state


def _matrix_entry(sd, params):
    return sd["state"][next(i for i, p in enumerate(params) if p.shape == ROWS_OF_512)]


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.__setitem__("exp_avg_absmax", s["exp_avg_absmax"][:, :1].clone()),
     r"\['exp_avg_absmax'\] must be fp32 of shape \(48, 2\).*\(48, 1\)"),
    (lambda s: s.__setitem__("exp_avg_sq_absmax", s["exp_avg_sq_absmax"].double()),
     r"\['exp_avg_sq_absmax'\] must be fp32 .*torch.float64"),
    (lambda s: s.__setitem__("exp_avg_codes", s["exp_avg_codes"].to(torch.int8)),
     r"\['exp_avg_codes'\] must be uint8 codes .*torch.int8"),
    (lambda s: s.__setitem__("exp_avg_codes", s["exp_avg_codes"].float()),
     r"\['exp_avg_codes'\] must be uint8 codes .*torch.float32"),
    (lambda s: s.__setitem__("exp_avg_codes", s["exp_avg_codes"].reshape(96, 256)),
     r"\['exp_avg_codes'\] must be uint8 codes shaped like its param \(48, 512\).*\(96, 256\)"),
    (lambda s: s.pop("exp_avg_absmax"), r"'exp_avg_codes' without 'exp_avg_absmax'"),
    (lambda s: s.__setitem__("exp_avg", torch.zeros(ROWS_OF_512)), r"'exp_avg' in both int8 and fp32 form"),
], ids=["absmax_shape", "absmax_dtype", "codes_int8", "codes_float", "codes_shape", "no_absmax", "both_forms"])
def test_a_malformed_int8_entry_is_refused_naming_it(damage, match):
    params, opt = _trained_adamw()
    sd = opt.state_dict()
    entry = dict(_matrix_entry(sd, params))
    damage(entry)
    sd["state"][next(i for i, p in enumerate(params) if p.shape == ROWS_OF_512)] = entry
    fresh = FAMILIES["AdamW"](clones(params), backend="torch", state_dtype="int8")
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(sd)
    assert not fresh.state


def test_int8_form_for_a_shape_without_one_is_refused():
    """A (65, 66) param's blocks straddle dim-0 slices: codes and absmax for it cannot have come
    from our state_dict()."""
    params, opt = _trained_adamw()
    sd = opt.state_dict()
    i = next(i for i, p in enumerate(params) if p.shape == (65, 66))
    s = sd["state"][i]
    codes, absmax = quantize_state(s.pop("exp_avg"), "exp_avg")
    s["exp_avg_codes"], s["exp_avg_absmax"] = codes.view(65, 66), absmax
    fresh = FAMILIES["AdamW"](clones(params), backend="torch", state_dtype="int8")
    with pytest.raises(ValueError, match=r"\['exp_avg_codes'\]: a param of shape \(65, 66\) has no int8 checkpoint form"):
        fresh.load_state_dict(sd)


def test_non_moment_float_state_keeps_its_saved_dtype_and_moments_become_fp32():
    """Ranger's slow weights saved in bf16 (as slow_dtype="bf16" keeps them) load bit-exactly into
    a Ranger keeping bf16 slow weights; a moment saved in bf16 is widened to fp32, the dtype the
    update kernels read. A Ranger keeping fp32 slow weights (fp32 params, the default slow_dtype)
    gets them in fp32: the loader's slow_dtype wins, as in a DCP load into its own state."""
    params = ckpt_params()
    opt = dist_optim.Ranger(params, lr=0.01, k=2, backend="torch")
    run(opt, params, 0, 2)
    sd = opt.state_dict()
    i = next(i for i, p in enumerate(params) if p.shape == ROWS_OF_512)
    sd["state"][i]["slow_buffer"] = sd["state"][i]["slow_buffer"].to(torch.bfloat16)
    sd["state"][i]["exp_avg"] = sd["state"][i]["exp_avg"].to(torch.bfloat16)
    copies = clones(params)
    other = dist_optim.Ranger(copies, lr=0.01, k=2, backend="torch", slow_dtype="bf16")
    other.load_state_dict(copy.deepcopy(sd))
    state = other.state[copies[i]]
    assert state["slow_buffer"].dtype == torch.bfloat16 and torch.equal(state["slow_buffer"], sd["state"][i]["slow_buffer"])
    assert state["exp_avg"].dtype == torch.float32 and torch.equal(state["exp_avg"], sd["state"][i]["exp_avg"].float())
    default = dist_optim.Ranger(clones(params), lr=0.01, k=2, backend="torch")
    default.load_state_dict(sd)
    slow = next(s["slow_buffer"] for p, s in default.state.items() if p.shape == ROWS_OF_512)
    assert slow.dtype == torch.float32 and torch.equal(slow, sd["state"][i]["slow_buffer"].float())
