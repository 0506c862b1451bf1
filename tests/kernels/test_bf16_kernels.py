"""The Triton kernels' bf16 param stores (``bf16_update``: "nearest", "stochastic", "kahan") and
Lookahead's slow weights in fp32/bf16/fp16, bit for bit against dist_optim.state.rounding.

Reference: the fp32 result ``x`` of a step comes from the same launcher run on fp32 copies of the
params (an fp32 param is stored as is, whatever the mode), from the same grads and states; the bf16
param the kernel must then store is ``rounding.round_nearest_bf16(x)``,
``rounding.stochastic_round_bf16(x, step_stream(base, t), index)`` or
``rounding.kahan_add_bf16(p_old, comp, x - p_old)``, and the states must equal the fp32 run's bit
for bit. That the fp32 math itself is the torch path's (dist_optim.functional) is
tests/kernels/test_kernels.py's business (within fp32 tolerances); here it is checked once more at
those tolerances (``test_the_fp32_reference_is_the_torch_path``), so the chain ends at the
specification. Under the interpreter every comparison except that one is exact.

Several tensors per launch: odd sizes crossing the interpreter's 256-element chunks (full chunks
run unmasked, tails masked), an empty one, and one param (and its Kahan buffer) at an unaligned
address. Host flow (``sr_step``, host scalars) and device flow (per-tensor ``steps`` counters, a
skip flag) both, fp32 and int8 state.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import dist_optim.functional as F
import triton_kernels
from dist_optim.functional.adagrad import adagrad_clr
from dist_optim.functional.radam import radam_step_size
from dist_optim.state import rounding
from dist_optim.state.layout import absmax_key, quantize_state
from tests._triton import device  # noqa: F401 (a fixture)
from tests.kernels._against_torch import at_offset

pytest.importorskip("triton")

SIZES = [1, 7, 1003, 0, 601, 512]
UNALIGNED = 2  # the tensor of SIZES placed one element into its buffer (params and Kahan buffers)
MODES = ["nearest", "stochastic", "kahan"]
SEED = 12345
LA = [4, 3, 6, 5, 2, 8]  # Lookahead counts: with k=2, tensors 0, 2, 4 and 5 sync (3 is empty)


def bases():
    return [rounding.param_base(SEED, i, rank=0) for i in range(len(SIZES))]


def counters(values, device):
    return [torch.tensor(float(v), device=device) for v in values]


class Family:
    """A launcher with fixed hyperparameters, in the host flow (one t, host scalars) or the device
    flow (per-tensor counters)."""

    def __init__(self, name, keys, host, device_kw, launcher, positive=(), zero=False, slow=False):
        self.name, self.keys, self.host, self.device_kw, self.launcher = name, keys, host, device_kw, launcher
        self.positive, self.zero, self.slow = positive, zero, slow

    def run(self, params, grads, states, *, device, t=None, ts=None, skip=None, **rounding_kw):
        if ts is None:  # host flow: one step count t, scalars computed here
            return self.launcher(params, grads, states, **self.host(t), **rounding_kw)
        steps = counters(ts, device)
        extra = dict(self.device_kw)
        if self.slow:
            extra.update(la_steps=counters(LA, device), k=2)
        return self.launcher(params, grads, states, steps=steps, skip=skip, **extra, **rounding_kw)


RADAM = dict(lr=0.01, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.05, decoupled=False, grad_scale=1.3)
ADAM = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False,
            grad_scale=0.7)


def _adam_host(t):
    return dict(ADAM, step_size=ADAM["lr"] / (1.0 - ADAM["beta1"] ** t),
                bias_correction2_sqrt=math.sqrt(1.0 - ADAM["beta2"] ** t))


def _radam_host(t, alpha=None):
    rectified, step_size = radam_step_size(RADAM["lr"], RADAM["beta1"], RADAM["beta2"], t, 5.0)
    return dict(RADAM, rectified=rectified, step_size=step_size, lookahead_alpha=alpha)


SGD = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, first_step=False, grad_scale=0.5)
RMSPROP = dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.01, momentum=0.5, centered=True, grad_scale=0.8)
ADAGRAD = dict(weight_decay=0.1, eps=1e-10, grad_scale=0.37)

FAMILIES = {
    "sgd": Family("sgd", ["momentum_buffer"], lambda t: SGD, SGD, triton_kernels.sgd_step),
    "adagrad": Family("adagrad", ["sum"], lambda t: dict(ADAGRAD, clr=adagrad_clr(0.1, 0.01, t)),
                      dict(ADAGRAD, lr=0.1, lr_decay=0.01), triton_kernels.adagrad_step, positive=("sum",)),
    "rmsprop": Family("rmsprop", ["square_avg", "grad_avg", "momentum_buffer"], lambda t: RMSPROP, RMSPROP,
                      triton_kernels.rmsprop_step, zero=True),
    "adam": Family("adam", ["exp_avg", "exp_avg_sq"], _adam_host,
                   {k: v for k, v in ADAM.items()}, triton_kernels.adam_step, positive=("exp_avg_sq",)),
    "radam": Family("radam", ["exp_avg", "exp_avg_sq"], _radam_host,
                    dict(RADAM, lookahead_alpha=None, rho_threshold=5.0), triton_kernels.radam_step,
                    positive=("exp_avg_sq",)),
    # Ranger: in the host flow every tensor syncs (the param gets the slow value whatever the mode);
    # in the device flow the tensors whose Lookahead count is even sync and the others take the mode.
    "ranger": Family("ranger", ["exp_avg", "exp_avg_sq", "slow_buffer"], functools.partial(_radam_host, alpha=0.3),
                     dict(RADAM, lookahead_alpha=0.3, rho_threshold=5.0), triton_kernels.radam_step,
                     positive=("exp_avg_sq",), slow=True),
}


def make(family, device, *, int8=False, seed=0):
    """bf16 params (tensor UNALIGNED at an odd address), bf16 grads, states (fp32 or int8; bf16 slow
    weights, the default slow_dtype for bf16 params), Kahan buffers holding small residuals."""
    gen = torch.Generator().manual_seed(seed)
    offsets = [1 if i == UNALIGNED else 0 for i in range(len(SIZES))]
    params = [at_offset(torch.randn(n, generator=gen).to(device=device, dtype=torch.bfloat16), o)
              for n, o in zip(SIZES, offsets)]
    grads = [torch.randn(n, generator=gen).to(device=device, dtype=torch.bfloat16) for n in SIZES]
    states = {}
    for key in family.keys:
        values = [torch.randn(n, generator=gen) for n in SIZES]
        if family.zero:
            values = [torch.zeros_like(v) for v in values]
        if key in family.positive:
            values = [v.abs() for v in values]
        if key == "slow_buffer":
            states[key] = [(p.float() + 0.1 * v.to(device)).bfloat16() for p, v in zip(params, values)]
        elif int8:
            coded = [quantize_state(v, key) for v in values]
            states[key] = [c.to(device) for c, _ in coded]
            states[absmax_key(key)] = [a.to(device) for _, a in coded]
        else:
            states[key] = [v.to(device) for v in values]
    states["kahan_comp"] = [at_offset((torch.randn(n, generator=gen) * 2**-10).to(device=device, dtype=torch.bfloat16), o)
                            for n, o in zip(SIZES, offsets)]
    return params, grads, states


def copy(data, param_dtype=None):
    """Copies keeping each tensor's offset in its buffer; params optionally converted (exactly)."""
    params, grads, states = data
    keep = lambda t: at_offset(t, t.storage_offset())  # noqa: E731
    ps = [keep(p) if param_dtype is None else at_offset(p.to(param_dtype), p.storage_offset()) for p in params]
    return ps, [keep(g) for g in grads], {k: [keep(t) for t in v] for k, v in states.items()}


def seeds(device):
    return [torch.tensor(b, dtype=torch.int64, device=device) for b in bases()]


def expected_params(mode, before, x32, ts, synced):
    """The bf16 params (and Kahan buffers) the write rule gives for fp32 results ``x32``."""
    params, comps = [], []
    for i, (p_old, comp, x) in enumerate(zip(before[0], before[2]["kahan_comp"], x32)):
        if synced[i] or mode == "nearest":  # a synced param gets the slow value, to nearest
            params.append(rounding.round_nearest_bf16(x))
            comps.append(comp)
        elif mode == "stochastic":
            stream = rounding.step_stream(bases()[i], ts[i])
            params.append(rounding.stochastic_round_bf16(x, stream, torch.arange(x.numel(), device=x.device)))
            comps.append(comp)
        else:
            new, c = rounding.kahan_add_bf16(p_old, comp, x - p_old.float())
            params.append(new)
            comps.append(c)
    return params, comps


def rounding_kw(mode, device, *, t=None):
    kw = dict(bf16_update=mode)
    if mode == "stochastic":
        kw["sr_seeds"] = seeds(device)
        if t is not None:
            kw["sr_step"] = t
    return kw


def check_step(family, mode, device, *, flow, int8=False, t=7):
    data = make(family, device, int8=int8)
    before = copy(data)
    ref = copy(data, torch.float32)
    host = flow == "host"
    ts = [t] * len(SIZES) if host else [max(1, t - i) for i in range(len(SIZES))]  # tensors at different steps
    synced = [family.slow and (host or LA[i] % 2 == 0) for i in range(len(SIZES))]
    family.run(*ref, ts=None if host else ts, device=device, t=t)
    if host:
        family.run(*data, ts=None, device=device, **rounding_kw(mode, device, t=t), t=t)
    else:
        family.run(*data, ts=ts, device=device, skip=torch.zeros(1, device=device), **rounding_kw(mode, device))
    params, comps = expected_params(mode, before, ref[0], ts, synced)
    for i, (a, b) in enumerate(zip(data[0], params)):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), (i, (a != b).sum().item())
    for i, (a, b) in enumerate(zip(data[2]["kahan_comp"], comps)):
        assert torch.equal(a, b), ("kahan_comp", i)
    for key, tensors in ref[2].items():
        if key == "kahan_comp":
            continue
        for i, (a, b) in enumerate(zip(data[2][key], tensors)):
            assert torch.equal(a, b), (key, i)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flow", ["host", "device"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_store_is_the_rounding_reference(device, name, flow, mode):
    check_step(FAMILIES[name], mode, device, flow=flow)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("flow", ["host", "device"])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop", "adam", "ranger"])
def test_bf16_store_with_int8_state(device, name, flow, mode):
    check_step(FAMILIES[name], mode, device, flow=flow, int8=True)


@pytest.mark.parametrize("t", [1, 2**31 + 5])
def test_stochastic_stream_follows_the_step(device, t):
    """The stream is step_stream(base, t): another t draws other bits (t past 2**31 too, where a
    32-bit argument would not hold it), and the host flow's sr_step equals the device flow's count."""
    family = FAMILIES["adam"]
    data = make(family, device)
    other = copy(data)
    family.run(*data, ts=None, device=device, t=t, **rounding_kw("stochastic", device, t=t))
    family.run(*other, ts=None, device=device, t=t, **rounding_kw("stochastic", device, t=t + 1))
    before = make(family, device)
    ref = copy(before, torch.float32)
    family.run(*ref, ts=None, device=device, t=t)
    expected, _ = expected_params("stochastic", before, ref[0], [t] * len(SIZES), [False] * len(SIZES))
    assert all(torch.equal(a, b) for a, b in zip(data[0], expected))
    assert any(not torch.equal(a, b) for a, b in zip(data[0], other[0]))


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adam", "ranger"])
def test_a_skipped_step_changes_nothing(device, name, mode):
    family = FAMILIES[name]
    data = make(family, device)
    before = copy(data)
    family.run(*data, ts=[3] * len(SIZES), device=device, skip=torch.ones(1, device=device),
               **rounding_kw(mode, device))
    for a, b in zip(data[0], before[0]):
        assert torch.equal(a, b)
    for key in data[2]:
        for a, b in zip(data[2][key], before[2][key]):
            assert torch.equal(a, b), key


def test_modes_touch_only_bf16_params(device):
    """fp32 and fp16 params in the same call as bf16 ones take round-to-nearest (fp16) or are stored
    as computed (fp32); Kahan buffers and seeds of those params are never read (None is accepted)."""
    family = FAMILIES["adam"]
    data = make(family, device)
    params = [p.to(dt) for p, dt in zip(data[0], [torch.float32, torch.float16, torch.bfloat16] * 2)]
    grads = [g.float() if p.dtype == torch.float32 else g.to(p.dtype) for g, p in zip(data[1], params)]
    states = {k: v for k, v in data[2].items()}
    ref_states = {k: [t.clone() for t in v] for k, v in states.items()}
    states["kahan_comp"] = [c if p.dtype == torch.bfloat16 else None for c, p in zip(states["kahan_comp"], params)]
    ref_params = [p.clone() for p in params]
    kahan_before = [None if c is None else c.clone() for c in states["kahan_comp"]]
    family.run(params, grads, states, ts=None, device=device, t=3, bf16_update="kahan")
    family.run(ref_params, [g.clone() for g in grads], ref_states, ts=None, device=device, t=3)
    for p, r, c, c0 in zip(params, ref_params, states["kahan_comp"], kahan_before):
        if p.dtype != torch.bfloat16:
            assert torch.equal(p, r)
        elif p.numel():
            assert c is not None and not torch.equal(c, c0)  # the bf16 ones took the Kahan path


@pytest.mark.parametrize("slow_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["all", "la_steps"])
def test_lookahead_sync_slow_dtypes(device, param_dtype, slow_dtype, per_tensor):
    """slow' = slow + alpha (p - slow) in fp32, stored to nearest in slow_dtype; p' = slow' to
    nearest in the param dtype: against that rule written out in torch."""
    gen = torch.Generator().manual_seed(3)
    offsets = [1 if i == UNALIGNED else 0 for i in range(len(SIZES))]
    params = [at_offset(torch.randn(n, generator=gen).to(device=device, dtype=param_dtype), o)
              for n, o in zip(SIZES, offsets)]
    slows = [at_offset(torch.randn(n, generator=gen).to(device=device, dtype=slow_dtype), o)
             for n, o in zip(SIZES, offsets)]
    p0, s0 = [p.clone() for p in params], [s.clone() for s in slows]
    alpha = 0.3
    if per_tensor:
        triton_kernels.lookahead_sync(params, slows, alpha=alpha, la_steps=counters(LA, device), k=4)
    else:
        triton_kernels.lookahead_sync(params, slows, alpha=alpha)
    for i, (p, s, p_old, s_old) in enumerate(zip(params, slows, p0, s0)):
        if per_tensor and LA[i] % 4:
            assert torch.equal(p, p_old) and torch.equal(s, s_old)
            continue
        slow32 = s_old.float()
        slow32 = slow32 + alpha * (p_old.float() - slow32)
        stored = to_nearest(slow32, slow_dtype)
        assert torch.equal(s, stored), i
        assert torch.equal(p, to_nearest(stored.float(), param_dtype)), i


def to_nearest(x, dtype):
    if dtype == torch.bfloat16:
        return rounding.round_nearest_bf16(x)
    return x.to(dtype)


@pytest.mark.parametrize("slow_dtype", [torch.float32, torch.float16])
def test_ranger_sync_with_other_slow_dtypes(device, slow_dtype):
    """Ranger's fused sync with fp32 or fp16 slow weights for bf16 params: the slow weights and the
    params equal the unfused reference (RAdam's fp32 result from the fp32-param launch, then the
    sync rule written out), and non-syncing tensors take the mode."""
    family = FAMILIES["ranger"]
    data = make(family, device)
    data[2]["slow_buffer"] = [s.to(slow_dtype) for s in data[2]["slow_buffer"]]
    before = copy(data)
    ref = copy(data, torch.float32)
    ref[2].pop("slow_buffer")
    FAMILIES["radam"].run(*ref, ts=None, device=device, t=9)  # RAdam alone: x, no sync
    family.run(*data, ts=None, device=device, t=9, **rounding_kw("kahan", device))
    for i, (p, s, s_old, x) in enumerate(zip(data[0], data[2]["slow_buffer"], before[2]["slow_buffer"], ref[0])):
        slow32 = s_old.float()
        stored = to_nearest(slow32 + 0.3 * (x - slow32), slow_dtype)
        assert torch.equal(s, stored), i
        assert torch.equal(p, to_nearest(stored.float(), torch.bfloat16)), i
        assert torch.equal(data[2]["kahan_comp"][i], before[2]["kahan_comp"][i])  # a sync leaves it


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop", "adam", "radam"])
def test_the_fp32_reference_is_the_torch_path(device, name):
    """The fp32 results the tests above round are the specification's (dist_optim.functional, torch
    path) within test_kernels' fp32 tolerances (rtol 2e-6, atol 1e-6: FMA contraction and torch's
    fused add-with-alpha round differently in the last bit)."""
    family = FAMILIES[name]
    data = copy(make(family, device), torch.float32)
    spec = copy(data)
    t = 7
    family.run(*data, ts=None, device=device, t=t)
    hyper = {k: v for k, v in family.host(t).items() if k not in ("step_size", "bias_correction2_sqrt", "rectified",
                                                                  "clr", "lookahead_alpha")}
    states = {k: v for k, v in spec[2].items() if k != "kahan_comp"}
    if name == "sgd":
        F.sgd_step(*spec[:2], states, **hyper, backend="torch")
    elif name == "adagrad":
        F.adagrad_step(*spec[:2], states, lr=0.1, lr_decay=0.01, step=t, **hyper, backend="torch")
    elif name == "rmsprop":
        F.rmsprop_step(*spec[:2], states, **hyper, backend="torch")
    elif name == "adam":
        F.adam_step(*spec[:2], states, **hyper, step=t, backend="torch")
    else:
        F.radam_step(*spec[:2], states, **hyper, rho_threshold=5.0, step=t, backend="torch")
    for a, b in zip(data[0], spec[0]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


def test_bad_rounding_arguments_are_value_errors(device):
    family = FAMILIES["adam"]
    data = make(family, device)
    with pytest.raises(ValueError, match="bf16_update.*'fast'"):
        family.run(*data, ts=None, device=device, t=1, bf16_update="fast")
    with pytest.raises(ValueError, match="sr_seeds"):
        family.run(*data, ts=None, device=device, t=1, bf16_update="stochastic", sr_step=1)
    with pytest.raises(ValueError, match="exactly one"):
        family.run(*data, ts=None, device=device, t=1, bf16_update="stochastic", sr_seeds=seeds(device))
    with pytest.raises(ValueError, match="sr_step"):
        family.run(*data, ts=None, device=device, t=1, bf16_update="stochastic", sr_seeds=seeds(device), sr_step=-1)
    bad = [s.to(torch.int32) for s in seeds(device)]
    with pytest.raises(ValueError, match=r"sr_seeds\[0\]"):
        family.run(*data, ts=None, device=device, t=1, bf16_update="stochastic", sr_seeds=bad, sr_step=1)
    data[2]["kahan_comp"] = [c.float() for c in data[2]["kahan_comp"]]
    with pytest.raises(ValueError, match=r"kahan_comp\[0\]"):
        family.run(*data, ts=None, device=device, t=1, bf16_update="kahan")
    del data[2]["kahan_comp"]
    with pytest.raises(ValueError, match="kahan_comp"):
        family.run(*data, ts=None, device=device, t=1, bf16_update="kahan")
    slows = [torch.zeros(n, device=device, dtype=torch.float64) for n in SIZES]
    with pytest.raises(ValueError, match="slow weights"):
        triton_kernels.lookahead_sync(data[0], slows, alpha=0.5)
