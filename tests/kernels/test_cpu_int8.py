"""int8 moments in the fused CPU kernels (``cpu_kernels`` with dist_optim.state's format: uint8 codes
and one fp32 absmax per 256 elements) against the torch path with int8 state (dist_optim.functional
with backend="torch": dequantize, the fp32 math, quantize), every family with moments, every switch,
fp32/bf16/fp16 params, sizes below one quantization block, on its edges, ragged, and over several
32K-element chunks (several threads' work).

What must agree and why:
- Codes and absmax bit for bit wherever the kernel's fp32 moment equals the torch path's: the moments
  of every family except RMSprop's momentum buffer are computed without sqrt (the one operation where
  the CPU kernels and torch's CPU kernels round differently, see tests/kernels/test_cpu_backend.py),
  and dequantization (one product) and quantization (products and comparisons) are exact, so each
  step from identical inputs must give identical codes and absmax.
- RMSprop's momentum buffer (b = momentum * b + g / (sqrt(v) + eps)) inherits the sqrt's ulp: its
  absmax within test_cpu_backend's state tolerance (rtol 2e-6; 2e-5 centered, where sqrt(v - m^2)
  cancels), and a code may differ only by one and only where the torch path's fp32 value lies
  within that tolerance of the threshold between the two codes (checked against the unquantized
  fp32 moment of the same step).
- Params: the fp32-state tolerances of test_cpu_backend (an ulp or two from the sqrt): fp32 rtol 2e-6 /
  atol 1e-6, bf16/fp16 one ulp of the param dtype; every step restarts both sides from the
  reference's params and state, so a difference cannot compound.
- Within the CPU kernels everything is exact: the int8 step equals the fp32-state step on the
  dequantized moments, bit for bit, params and every role, and its codes are the reference
  quantization of that step's moments.
- End to end (the optimizer classes, 6 steps, params feeding back): the ulps do compound there, so
  params within the optimizers' suite tolerance and moments within one quantization step.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import cpu_kernels
import dist_optim
import dist_optim.functional as F
from dist_optim.functional._common import fused_kernels
from dist_optim.state import MIN_QUANTIZED_NUMEL
from dist_optim.state.codes import max_half_gap, thresholds
from dist_optim.state.layout import QBLOCK, absmax_key, code_map, dequantize_state, quantize_state
from tests.kernels._against_torch import ADAM_CASES, ADAM_IDS, RMSPROP_CASES, RMSPROP_IDS, POSITIVE, assert_match

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler to build cpu_kernels"
)

# Below one quantization block, exactly one, one plus one, ragged over a 1K staged block, an empty
# shard, and three 32K chunks with a partial last quantization block.
SIZES = [1, 7, 255, 256, 257, 1003, 0, 70001]
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["fp32", "bf16", "fp16", "bf16-fp32grad"]
dtypes = pytest.mark.parametrize("dtype,grad_dtype", DTYPES, ids=DTYPE_IDS)


def make(dtype, int8_keys, fp32_keys=(), *, sizes=SIZES, grad_dtype=None, seed=0, zero_keys=()):
    """Params, grads and states; ``int8_keys`` held as codes + absmax (quantized from random fp32
    moments, >= 0 for second moments, 0 for ``zero_keys``), ``fp32_keys`` (Ranger's slow weights) as
    fp32."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(grad_dtype or dtype) for n in sizes]
    states = {}
    for key in int8_keys:
        for n in sizes:
            values = torch.randn(n, generator=gen) * (key not in zero_keys)
            codes, absmax = quantize_state(values.abs() if key in POSITIVE else values, key)
            states.setdefault(key, []).append(codes)
            states.setdefault(absmax_key(key), []).append(absmax)
    for key in fp32_keys:
        states[key] = [torch.randn(n, generator=gen) for n in sizes]
    return params, grads, states


def clone(data):
    params, grads, states = data
    return [p.clone() for p in params], [g.clone() for g in grads], {k: [t.clone() for t in v] for k, v in states.items()}


def unquantized_moments(step_fn, data, t):
    """The torch path's fp32 moments after this step, before quantization: the same step on fp32
    states holding the dequantized moments."""
    params, grads, states = clone(data)
    fp32 = {}
    for key, ts in states.items():
        if key.endswith("_absmax"):
            continue
        if absmax_key(key) in states:
            fp32[key] = [dequantize_state(c, a, key) for c, a in zip(ts, states[absmax_key(key)])]
        else:
            fp32[key] = ts
    step_fn(params, grads, fp32, t=t, backend="torch")
    return fp32


def assert_codes_match(ours, ref, x, key, exact, rtol):
    """Codes and absmax of one int8 moment: equal, or (not ``exact``) absmax within ``rtol`` and codes
    apart by one only where the fp32 value ``x`` (the torch path's, before quantization) is within
    ``rtol`` (the fp32 moments' own agreement) of the threshold between them."""
    (codes, absmax), (ref_codes, ref_absmax) = ours, ref
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    if exact:
        assert torch.equal(codes, ref_codes), f"{key}: {(codes != ref_codes).sum()} codes differ"
        assert torch.equal(absmax, ref_absmax), f"{key}: absmax differs"
        return
    torch.testing.assert_close(absmax, ref_absmax, rtol=rtol, atol=0, msg=f"{key}: absmax")
    differ = codes != ref_codes
    if not bool(differ.any()):
        return
    lo = torch.minimum(codes, ref_codes)[differ].long()
    assert bool(((codes.int() - ref_codes.int()).abs()[differ] == 1).all()), f"{key}: codes more than one apart"
    scale = ref_absmax.repeat_interleave(QBLOCK)[: codes.numel()][differ]
    threshold = thresholds(code_map(key))[lo] * scale
    # the moments' agreement, plus a few ulps of the block's absmax for the threshold's own rounding
    near = (x[differ] - threshold).abs() <= rtol * x[differ].abs() + 4 * 2**-23 * scale
    assert bool(near.all()), f"{key}: codes differ away from a threshold"


def compare(step_fn, dtype, int8_keys, *, fp32_keys=(), inexact=(), grad_dtype=None, steps=3, sizes=SIZES,
            state_rtol=2e-6, zero_keys=()):
    """``steps`` steps of the CPU kernels against the torch path, each from the reference's params and
    state; codes exact except for the roles in ``inexact``."""
    ref = make(dtype, int8_keys, fp32_keys, grad_dtype=grad_dtype, sizes=sizes, zero_keys=zero_keys)
    assert fused_kernels("cpu", ref[0], ref[1], ref[2]) is cpu_kernels  # int8 state takes the kernels
    for t in range(1, steps + 1):
        ours = clone(ref)
        x = unquantized_moments(step_fn, ref, t)
        step_fn(*ours, t=t, backend="cpu")
        step_fn(*ref, t=t, backend="torch")
        for key in int8_keys:
            for i in range(len(sizes)):
                assert_codes_match((ours[2][key][i], ours[2][absmax_key(key)][i]),
                                   (ref[2][key][i], ref[2][absmax_key(key)][i]), x[key][i].reshape(-1), key,
                                   exact=key not in inexact, rtol=state_rtol)
        fp32_states = {k: ours[2][k] for k in fp32_keys}
        assert_match((ours[0], None, fp32_states), (ref[0], None, {k: ref[2][k] for k in fp32_keys}), state_rtol)


@dtypes
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, grad_scale=0.5),
        dict(lr=0.05, momentum=0.8, dampening=0.0, weight_decay=0.1, nesterov=True, grad_scale=-1.0),  # maximize
    ],
    ids=["momentum-dampening-wd", "nesterov-maximize"],
)
def test_sgd(dtype, grad_dtype, kw):
    def step(p, g, s, *, t, backend):
        F.sgd_step(p, g, s, first_step=t == 1, backend=backend, **kw)

    compare(step, dtype, ["momentum_buffer"], grad_dtype=grad_dtype)


@dtypes
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, -0.37)])
def test_adagrad(dtype, grad_dtype, weight_decay, grad_scale):
    def step(p, g, s, *, t, backend):
        F.adagrad_step(p, g, s, lr=0.1, lr_decay=0.01, weight_decay=weight_decay, eps=1e-10, step=t,
                       grad_scale=grad_scale, backend=backend)

    compare(step, dtype, ["sum"], grad_dtype=grad_dtype)


@dtypes
@pytest.mark.parametrize("kw", RMSPROP_CASES, ids=RMSPROP_IDS)
def test_rmsprop(dtype, grad_dtype, kw):
    keys = ["square_avg"] + (["grad_avg"] if kw["centered"] else []) + (["momentum_buffer"] if kw["momentum"] else [])

    def step(p, g, s, *, t, backend):
        F.rmsprop_step(p, g, s, lr=0.01, eps=1e-8, grad_scale=-0.8, backend=backend, **kw)

    # a zero grad_avg keeps square_avg >= grad_avg^2: a real centered average (no NaN from the sqrt)
    compare(step, dtype, keys, inexact=("momentum_buffer",), grad_dtype=grad_dtype, zero_keys=("grad_avg",),
            state_rtol=2e-5 if kw["centered"] else 2e-6)


@dtypes
@pytest.mark.parametrize("kw", ADAM_CASES, ids=ADAM_IDS)
def test_adam(dtype, grad_dtype, kw):
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kw["amsgrad"] else [])

    def step(p, g, s, *, t, backend):
        F.adam_step(p, g, s, lr=0.01, eps=1e-8, step=t, grad_scale=-0.5, backend=backend, **kw)

    compare(step, dtype, keys, grad_dtype=grad_dtype)


@dtypes
@pytest.mark.parametrize("first_step", [1, 12], ids=["unrectified", "rectified"])
@pytest.mark.parametrize("sync", [None, 0.3], ids=["radam", "ranger-sync"])
@pytest.mark.parametrize("decoupled", [False, True])
def test_radam_and_ranger_sync(dtype, grad_dtype, first_step, sync, decoupled):
    """Ranger's fused sync step with int8 moments and fp32 slow buffers (given here at the launcher;
    the optimizer's default slow dtype is the param's)."""
    def step(p, g, s, *, t, backend):
        F.radam_step(p, g, s, lr=0.01, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.05, decoupled=decoupled,
                     rho_threshold=5.0, step=first_step + t - 1, lookahead_alpha=sync, grad_scale=1.3, backend=backend)

    compare(step, dtype, ["exp_avg", "exp_avg_sq"], fp32_keys=["slow_buffer"] if sync is not None else [],
            grad_dtype=grad_dtype)


def test_centered_rmsprop_clamps_the_variance_of_int8_moments():
    """Rounded moments need not keep square_avg >= grad_avg^2: the torch path clamps v - m^2 at 0
    for int8 state before the sqrt (else NaN), and so must the kernels. A square_avg far below the
    grad_avg's square makes every element take the clamp."""
    ref = make(torch.float32, ["square_avg", "grad_avg", "momentum_buffer"], sizes=[700])
    ref[2]["square_avg"][0].zero_()  # code 0 of the unsigned map: its smallest value, ~1e-9 x absmax
    ref[1][0].mul_(1e-3)  # small grads: v stays ~1e-8 while grad_avg keeps ~0.99 of its N(0, 1) start
    ours = clone(ref)
    kw = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True, grad_scale=1.0)
    F.rmsprop_step(*ours, backend="cpu", **kw)
    F.rmsprop_step(*ref, backend="torch", **kw)
    assert ours[0][0].isfinite().all() and ref[0][0].isfinite().all()
    for key in ("square_avg", "grad_avg"):
        assert torch.equal(ours[2][key][0], ref[2][key][0]), key
    # the momentum buffer is g / (0 + eps): no sqrt left to differ by an ulp
    assert torch.equal(ours[2]["momentum_buffer"][0], ref[2]["momentum_buffer"][0])
    assert_match((ours[0], None, {}), (ref[0], None, {}))


def adamw_step(p, g, s, *, t, backend):
    F.adam_step(p, g, s, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=True,
                step=t, grad_scale=1.0, backend=backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_block_codes_as_the_torch_path_does(bad):
    """A NaN or inf grad makes its block's moments non-finite: absmax NaN/inf and all codes 0 on both
    sides (``nonfinite="apply"``: the step is taken and stays visible); the other blocks unchanged."""
    ref = make(torch.float32, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], sizes=[1003, 300])
    ref[1][0][600] = bad
    ours = clone(ref)
    adamw_step(*ours, t=1, backend="cpu")
    adamw_step(*ref, t=1, backend="torch")
    for key in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]:
        for mine, theirs in zip(ours[2][key] + ours[2][absmax_key(key)], ref[2][key] + ref[2][absmax_key(key)]):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True, msg=key)
        absmax = ours[2][absmax_key(key)][0]
        assert not torch.isfinite(absmax[600 // QBLOCK]) and torch.isfinite(absmax[[0, 1, 3]]).all()
        assert int(ours[2][key][0][512:768].max()) == 0


def test_zero_blocks_code_to_zero():
    """A block of zero moments (absmax 0) codes to each map's zero entry, dequantizing to 0 (signed)
    and to the unsigned map's smallest value times 0 = 0, as the torch path."""
    ref = make(torch.float32, ["momentum_buffer"], sizes=[700])
    ref[1][0][256:512] = 0.0
    ours = clone(ref)
    for data, backend in ((ours, "cpu"), (ref, "torch")):
        F.sgd_step(*data, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True,
                   backend=backend)
    assert torch.equal(ours[2]["momentum_buffer"][0], ref[2]["momentum_buffer"][0])
    assert ours[2][absmax_key("momentum_buffer")][0][1] == 0
    assert bool((dequantize_state(ours[2]["momentum_buffer"][0], ours[2][absmax_key("momentum_buffer")][0],
                                  "momentum_buffer")[256:512] == 0).all())


def test_threads_do_not_change_int8_results():
    """Threads split the work at 32K-element chunks, multiples of the quantization block: the same
    codes, absmax and params at any thread count."""
    data = make(torch.bfloat16, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], sizes=[100003, 5, 40000])
    other = clone(data)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        adamw_step(*data, t=3, backend="cpu")
        torch.set_num_threads(max(2, before))
        adamw_step(*other, t=3, backend="cpu")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(data[0], other[0]):
        assert torch.equal(a, b)
    for key in data[2]:
        for a, b in zip(data[2][key], other[2][key]):
            assert torch.equal(a, b), key


def test_a_new_absmax_storage_gets_fresh_tables():
    """The pointer tables are cached on every role's storage, the absmax included: an absmax moved to
    new storage is written there, never to the old address."""
    ref = make(torch.float32, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], sizes=[5000])
    ours = clone(ref)
    for t in (1, 2):
        for data in (ours, ref):
            old = data[2][absmax_key("exp_avg")][0]
            data[2][absmax_key("exp_avg")][0] = old.clone()
            old.fill_(-1.0)  # what a stale table would write to (or read from)
        adamw_step(*ours, t=t, backend="cpu")
        adamw_step(*ref, t=t, backend="torch")
        for key in ours[2]:
            assert torch.equal(ours[2][key][0], ref[2][key][0]), key


def test_int8_state_is_refused_in_a_malformed_layout():
    params, grads, states = make(torch.float32, ["exp_avg", "exp_avg_sq"], sizes=[600])
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, amsgrad=False, step=1)
    short = dict(states, exp_avg_absmax=[states["exp_avg_absmax"][0][:2]])  # 600 elements need 3 blocks
    with pytest.raises(ValueError, match="absmax must hold one value per 256"):
        F.adam_step(params, grads, short, backend="cpu", **kw)
    # codes without their absmax are not a layout the kernels know: refused by accepts
    no_absmax = {k: v for k, v in states.items() if k != "exp_avg_absmax"}
    assert not cpu_kernels.accepts(params, grads, no_absmax)
    assert cpu_kernels.accepts(params, grads, states)
    with pytest.raises(ValueError, match="backend='cpu' takes"):
        F.adam_step(params, grads, no_absmax, backend="cpu", **kw)


# The optimizer classes, end to end: params above the min-size rule (int8 state, a partial last block,
# several chunks) beside a small one (fp32 state), a grad None on some steps.
CLASSES = {
    "SGD": lambda ps, **kw: dist_optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=0.01, nesterov=True, **kw),
    "Adagrad": lambda ps, **kw: dist_optim.Adagrad(ps, lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, **kw),
    "RMSprop": lambda ps, **kw: dist_optim.RMSprop(ps, lr=0.001, momentum=0.5, centered=True, **kw),
    "Adam": lambda ps, **kw: dist_optim.Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.01, **kw),
    "AdamW": lambda ps, **kw: dist_optim.AdamW(ps, lr=0.01, **kw),
    "AdamW-maximize": lambda ps, **kw: dist_optim.AdamW(ps, lr=0.01, maximize=True, amsgrad=True, **kw),
    "RAdam": lambda ps, **kw: dist_optim.RAdam(ps, lr=0.01, betas=(0.9, 0.9), **kw),
    # slow weights in the params' dtype (the default)
    "Ranger": lambda ps, **kw: dist_optim.Ranger(ps, lr=0.01, betas=(0.9, 0.9), k=2, alpha=0.5, **kw),
    "Ranger-fp32-slow": lambda ps, **kw: dist_optim.Ranger(ps, lr=0.01, betas=(0.9, 0.9), k=2, alpha=0.5,
                                                           slow_dtype=torch.float32, **kw),
}
SHAPES = [(MIN_QUANTIZED_NUMEL + 5,), (37, 1000), (7,)]


def class_params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def set_grads(params, step):
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(100 * step + i)
        p.grad = None if (i == 1 and step % 3 == 2) else torch.randn(p.shape, generator=gen).to(p.dtype)


def assert_close_but_for_flips(a, b, *, rtol, atol, flip, fraction=1e-3, msg=""):
    """a == b within (rtol, atol) except on at most ``fraction`` of the elements, and those within
    ``flip`` more: where an ulp of the fp32 math carried a moment across a threshold, its code differs
    by one and so does that element's update, by up to a quantization step's worth, which later
    steps carry on (the param feeds the next gradient)."""
    a, b = a.detach().double(), b.detach().double()
    close = atol + rtol * b.abs()
    off = (a - b).abs() > close
    assert off.double().mean() <= fraction, f"{msg}: {int(off.sum())} of {off.numel()} elements off"
    assert bool(((a - b).abs() <= close + flip).all()), f"{msg}: {float((a - b).abs().max())} > {flip}"


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_optimizers_with_int8_state_on_the_cpu_kernels(name, dtype, monkeypatch):
    """Each class with state_dtype="int8" and backend="cpu" over 6 steps (clipping on) against
    backend="torch". The kernels must really run: the torch path's dequantization is counted.
    Tolerances: as test_cpu_backend's optimizer test (fp32 rtol 1e-5 / atol 1e-6: per-step ulps through
    the steps and the clip coefficient; bf16/fp16 two ulps of the dtype) on all but 0.1% of the
    elements; those are where a code flipped (see assert_close_but_for_flips), within 3 lr (the lr
    is 0.05 at most: a few lr of update spread over the remaining steps). Moments: dequantized
    within two quantization steps of the block (a flip, plus the ulps a flip feeds back), codes
    different on under 1% of the elements."""
    import dist_optim.state.layout as layout

    calls = []
    real = layout.dequantize_state  # the torch path's int8 step reads it at call time
    monkeypatch.setattr(layout, "dequantize_state", lambda *a, **k: calls.append(1) or real(*a, **k))
    p_cpu, p_ref = class_params(dtype), class_params(dtype)
    ours = CLASSES[name](p_cpu, backend="cpu", state_dtype="int8", max_grad_norm=50.0)
    ref = CLASSES[name](p_ref, backend="torch", state_dtype="int8", max_grad_norm=50.0)
    for opt, params in ((ours, p_cpu), (ref, p_ref)):
        for step in range(6):
            set_grads(params, step)
            opt.step()
        if opt is ours:
            assert not calls  # every step of every param ran on the CPU kernels
    assert calls
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 * eps, atol=2 * eps)
    flip = 3 * max(g["lr"] for g in ref.param_groups)
    for a, b in zip(p_cpu, p_ref):
        assert_close_but_for_flips(a, b, **tol, flip=flip, msg="param")
        sa, sb = ours.state[a], ref.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if absmax_key(key) in sa:
                x = dequantize_state(sa[key], sa[absmax_key(key)], key)
                y = dequantize_state(sb[key], sb[absmax_key(key)], key)
                gap = 2 * max_half_gap(code_map(key)) * sb[absmax_key(key)].repeat_interleave(QBLOCK)[: x.numel()]
                assert bool(((x - y).abs() <= 2 * gap).all()), key
                assert (sa[key] != sb[key]).float().mean() < 0.01, key
            elif not key.endswith("_absmax"):
                assert_close_but_for_flips(sa[key], sb[key], **tol, flip=flip, msg=key)


def _family_steps():
    """(int8 keys, fp32 keys, step(params, grads, states, t, backend)) per family and switch set."""
    def sgd(p, g, s, t, backend):
        F.sgd_step(p, g, s, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True, first_step=t == 1,
                   grad_scale=0.5, backend=backend)

    def adagrad(p, g, s, t, backend):
        F.adagrad_step(p, g, s, lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, step=t, grad_scale=-0.37,
                       backend=backend)

    def rmsprop(p, g, s, t, backend):
        F.rmsprop_step(p, g, s, lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.01, momentum=0.5, centered=True,
                       grad_scale=0.8, backend=backend)

    def adam(p, g, s, t, backend):
        F.adam_step(p, g, s, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=False, amsgrad=True,
                    step=t, grad_scale=-0.5, backend=backend)

    def ranger(p, g, s, t, backend):
        F.radam_step(p, g, s, lr=0.01, beta1=0.95, beta2=0.9, eps=1e-5, weight_decay=0.05, decoupled=True,
                     rho_threshold=5.0, step=t, lookahead_alpha=0.3, grad_scale=1.3, backend=backend)

    return {"sgd": (["momentum_buffer"], [], sgd), "adagrad": (["sum"], [], adagrad),
            "rmsprop": (["square_avg", "grad_avg", "momentum_buffer"], [], rmsprop),
            "adam": (["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], [], adam),
            "ranger": (["exp_avg", "exp_avg_sq"], ["slow_buffer"], ranger)}


FAMILY_STEPS = _family_steps()


@pytest.mark.parametrize("family", sorted(FAMILY_STEPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_step_is_the_fp32_kernel_step_on_dequantized_state(family, dtype):
    """Within the CPU kernels, bit for bit and for every role (RMSprop's momentum buffer included):
    the int8 step's params equal the fp32-state step's on the dequantized moments, and its codes and
    absmax are the torch reference quantization of that step's fp32 moments. t = 1 and t = 6 (RAdam's
    momentum step, then its rectified one)."""
    int8_keys, fp32_keys, step = FAMILY_STEPS[family]
    data = make(dtype, int8_keys, fp32_keys, zero_keys=("grad_avg",))  # a real centered average
    for t in (1, 6):
        params, grads, states = clone(data)
        fp32 = {k: [dequantize_state(c, a, k) for c, a in zip(states[k], states[absmax_key(k)])] for k in int8_keys}
        fp32.update({k: states[k] for k in fp32_keys})
        step(*data, t, "cpu")
        step(params, grads, fp32, t, "cpu")
        for a, b in zip(data[0], params):
            assert torch.equal(a, b)
        for key in int8_keys:
            for codes, absmax, x in zip(data[2][key], data[2][absmax_key(key)], fp32[key]):
                want_codes, want_absmax = quantize_state(x, key)
                assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax), key
        for key in fp32_keys:
            for a, b in zip(data[2][key], fp32[key]):
                assert torch.equal(a, b), key
