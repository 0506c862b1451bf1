"""The launchers' device-resident step (no host sync): step-derived scalars computed in the kernel
from per-tensor step counts (``steps=``), Lookahead's sync decided per tensor (``la_steps=``, ``k=``),
``step_control`` (clip scale, non-finite skip, step counters) and ``sumsq_nonfinite``'s launches.

The reference is the launch the host drives today: the same kernel with the step-derived scalars
computed on the host in Python double (dist_optim.functional's formulas) and handed over as floats
(rounded to fp32). Under the interpreter every comparison here is bit for bit. The kernel's
beta**t is a multiply-only binary exponentiation where Python calls C pow(), so the fp64 powers
can differ in their last bits (they do for most t); the fp32 values derived from them round the
same — ``test_step_scalars_sweep`` checks every t up to 600 and a few large ones (a numpy run of the
same arithmetic found no fp32 difference for t up to 20000 at six betas).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import triton_kernels
from dist_optim.functional.adagrad import adagrad_clr
from dist_optim.functional.radam import radam_step_size
from tests.kernels import _against_torch as shared
from tests.kernels._against_torch import at_offset, clone
from tests._triton import device  # noqa: F401 (a fixture)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

SIZES = [1, 7, 1003, 0, 601, 512]  # as in test_kernels: full chunks, tails, an empty tensor
T = [1, 2, 5, 6, 7, 100, 10000]



make = functools.partial(shared.make, sizes=SIZES)


def counters(values, device):
    """0-dim fp32 counters, as torch.optim's capturable optimizers keep state["step"]."""
    return [torch.tensor(float(v), device=device) for v in values]


def lagging(t):
    """Per-tensor step counts around t: params whose grad was None on some steps lag."""
    return [max(1, t - i) for i in range(len(SIZES))]


def assert_same_bits(a, b):
    for x, y in zip(a[0] + [s for v in a[2].values() for s in v], b[0] + [s for v in b[2].values() for s in v]):
        assert torch.equal(x, y)


def one_by_one(data, fn, per_tensor):
    """Launch ``fn`` on each tensor alone, with that tensor's own arguments (the host reference)."""
    params, grads, states = data
    for i, extra in enumerate(per_tensor):
        fn([params[i]], [grads[i]], {k: [v[i]] for k, v in states.items()}, **extra)


# ---------------------------------------------------------------------------------------------
# 1. steps=: step-derived scalars from per-tensor counts


def adam_host(lr, beta1, beta2, t):
    return dict(step_size=lr / (1.0 - beta1**t), bias_correction2_sqrt=math.sqrt(1.0 - beta2**t))


ADAM = [
    dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False),
    dict(lr=0.003, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=True),
    dict(lr=0.01, beta1=0.3, beta2=0.9, eps=1e-8, weight_decay=0.01, decoupled=False, amsgrad=True),
]


def adam_keys(kw):
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kw["amsgrad"] else [])


@pytest.mark.parametrize("t", T)
@pytest.mark.parametrize("kw", ADAM, ids=["adam", "adamw-amsgrad", "low-beta1"])
def test_adam_steps_give_the_host_scalars_bits(device, kw, t):
    host = make(torch.bfloat16, device, adam_keys(kw))
    dev = clone(*host)
    triton_kernels.adam_step(*host, **kw, **adam_host(kw["lr"], kw["beta1"], kw["beta2"], t), grad_scale=0.7)
    triton_kernels.adam_step(*dev, **kw, step_size=None, bias_correction2_sqrt=None, grad_scale=0.7,
                             steps=counters([t] * len(SIZES), device))
    assert_same_bits(host, dev)


@pytest.mark.parametrize("t", [7, 10000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam_tensors_at_different_steps_in_one_launch(device, dtype, t):
    kw = ADAM[1]
    host = make(dtype, device, adam_keys(kw))
    dev = clone(*host)
    ts = lagging(t)
    one_by_one(host, functools.partial(triton_kernels.adam_step, **kw, grad_scale=0.7),
               [adam_host(kw["lr"], kw["beta1"], kw["beta2"], s) for s in ts])
    triton_kernels.adam_step(*dev, **kw, grad_scale=0.7, steps=counters(ts, device))
    assert_same_bits(host, dev)


def test_adam_lr_as_a_device_tensor(device):
    """With lr on the device the kernel derives step_size from that fp32 value; the host reference
    computes with the same value as a Python float."""
    kw = dict(ADAM[1])
    lr32 = float(torch.tensor(kw.pop("lr"), dtype=torch.float32))
    host = make(torch.float32, device, adam_keys(kw))
    dev = clone(*host)
    ts = lagging(100)
    one_by_one(host, functools.partial(triton_kernels.adam_step, lr=lr32, **kw, grad_scale=1.0),
               [adam_host(lr32, kw["beta1"], kw["beta2"], s) for s in ts])
    lr = torch.tensor([lr32], device=device)
    triton_kernels.adam_step(*dev, lr=lr, **kw, grad_scale=1.0, steps=counters(ts, device))
    assert_same_bits(host, dev)


RADAM = dict(lr=0.01, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.05)


def radam_host(t, rho_threshold=5.0, lr=RADAM["lr"]):
    rectified, step_size = radam_step_size(lr, RADAM["beta1"], RADAM["beta2"], t, rho_threshold)
    return dict(rectified=rectified, step_size=step_size)


@pytest.mark.parametrize("t", T)
@pytest.mark.parametrize("ranger", [False, True], ids=["radam", "ranger-sync"])
@pytest.mark.parametrize("decoupled", [False, True])
def test_radam_steps_give_the_host_scalars_bits(device, t, ranger, decoupled):
    keys = ["exp_avg", "exp_avg_sq"] + (["slow_buffer"] if ranger else [])
    alpha = 0.3 if ranger else None
    host = make(torch.bfloat16, device, keys)
    dev = clone(*host)
    kw = dict(RADAM, decoupled=decoupled, lookahead_alpha=alpha, grad_scale=1.3)
    triton_kernels.radam_step(*host, **kw, **radam_host(t))
    triton_kernels.radam_step(*dev, **kw, steps=counters([t] * len(SIZES), device), rho_threshold=5.0)
    assert_same_bits(host, dev)


def test_radam_tensors_on_both_sides_of_the_rectification_threshold(device):
    """At beta2=0.999, rho_t > 5 from t=6: tensors at t=2..7 in one launch take both branches."""
    host = make(torch.float32, device, ["exp_avg", "exp_avg_sq"])
    dev = clone(*host)
    ts = [7, 6, 5, 4, 3, 2]
    assert [radam_host(s)["rectified"] for s in ts] == [True, True, False, False, False, False]
    kw = dict(RADAM, decoupled=True, lookahead_alpha=None, grad_scale=1.0)
    one_by_one(host, functools.partial(triton_kernels.radam_step, **kw), [radam_host(s) for s in ts])
    triton_kernels.radam_step(*dev, **kw, steps=counters(ts, device), rho_threshold=5.0)
    assert_same_bits(host, dev)


@pytest.mark.parametrize("t", T)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adagrad_steps_give_the_host_clr_bits(device, t, weight_decay):
    host = make(torch.bfloat16, device, ["sum"])
    dev = clone(*host)
    kw = dict(weight_decay=weight_decay, eps=1e-10, grad_scale=0.37)
    triton_kernels.adagrad_step(*host, **kw, clr=adagrad_clr(0.1, 0.01, t))
    triton_kernels.adagrad_step(*dev, **kw, steps=counters([t] * len(SIZES), device), lr=0.1, lr_decay=0.01)
    assert_same_bits(host, dev)


def test_adagrad_tensors_at_different_steps_and_lr_on_the_device(device):
    host = make(torch.float32, device, ["sum"])
    dev = clone(*host)
    lr32 = float(torch.tensor(0.1, dtype=torch.float32))
    ts = lagging(10000)
    kw = dict(weight_decay=0.1, eps=1e-10, grad_scale=1.0)
    one_by_one(host, functools.partial(triton_kernels.adagrad_step, **kw),
               [dict(clr=adagrad_clr(lr32, 0.003, s)) for s in ts])
    triton_kernels.adagrad_step(*dev, **kw, steps=counters(ts, device), lr=torch.tensor([lr32], device=device),
                                lr_decay=0.003)
    assert_same_bits(host, dev)


# The scalars alone, over many t: a test kernel runs the launchers' own per-program helpers.
@triton.jit
def _scalars_kernel(STEPS, OUT, lr, lr_exact: tl.float64, beta1: tl.float64, beta2: tl.float64,
                    rho_threshold: tl.float64, lr_decay: tl.float64):
    from triton_kernels.adagrad import adagrad_clr as clr_of
    from triton_kernels.adam import adam_scalars
    from triton_kernels.radam import radam_scalars

    t = tl.program_id(0).to(tl.int64)
    step_size, bias_correction2_sqrt = adam_scalars(STEPS, t, lr, lr_exact, beta1, beta2)
    rectified, radam_size = radam_scalars(STEPS, t, lr, lr_exact, beta1, beta2, rho_threshold)
    row = OUT + 5 * t
    tl.store(row, step_size)
    tl.store(row + 1, bias_correction2_sqrt)
    tl.store(row + 2, rectified.to(tl.float32))
    tl.store(row + 3, radam_size)
    tl.store(row + 4, clr_of(STEPS, t, lr, lr_exact, lr_decay))


@pytest.mark.parametrize("beta1,beta2", [(0.9, 0.999), (0.95, 0.99), (0.3, 0.9), (0.9, 0.9999)])
def test_step_scalars_sweep(device, beta1, beta2):
    """Every t in 1..600 and a few up to 2^24 (fp32 counters are exact up to there): the kernel's
    fp32 scalars equal the host's double computations rounded to fp32, bit for bit."""
    from triton_kernels import _launch, _multi_tensor

    ts = list(range(1, 601)) + [1000, 4095, 4096, 10000, 65537, 1_000_003, 2**24]
    steps = counters(ts, device)
    table = _multi_tensor.TABLES.pointers(steps, device)
    out = torch.empty(len(ts), 5, device=device)
    lr, lr_decay = 0.01, 0.003
    _launch.run(_scalars_kernel, (len(ts),), device, table, out, lr, lr, beta1, beta2, 5.0, lr_decay)
    host = []
    for t in ts:
        rectified, size = radam_step_size(lr, beta1, beta2, t, 5.0)
        h = adam_host(lr, beta1, beta2, t)
        host.append([h["step_size"], h["bias_correction2_sqrt"], float(rectified), size, adagrad_clr(lr, lr_decay, t)])
    expected = torch.tensor(host, dtype=torch.float64).to(torch.float32)
    mismatch = (out.cpu() != expected).any(dim=1)
    assert not mismatch.any(), [ts[i] for i in mismatch.nonzero().flatten().tolist()][:10]


# ---------------------------------------------------------------------------------------------
# 2. la_steps=: Lookahead's sync per tensor


LA = [4, 3, 6, 5, 2, 8]  # k=2: tensors 0, 2, 4 and 5 sync (tensor 3 is empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranger_syncs_only_tensors_whose_count_is_a_multiple_of_k(device, dtype):
    keys = ["exp_avg", "exp_avg_sq", "slow_buffer"]
    host = make(dtype, device, keys)
    dev = clone(*host)
    ts = lagging(12)
    kw = dict(RADAM, decoupled=True, grad_scale=1.3)
    one_by_one(host, functools.partial(triton_kernels.radam_step, **kw),
               [dict(radam_host(t), lookahead_alpha=0.3 if la % 2 == 0 else None) for t, la in zip(ts, LA)])
    triton_kernels.radam_step(*dev, **kw, lookahead_alpha=0.3, steps=counters(ts, device), rho_threshold=5.0,
                              la_steps=counters(LA, device), k=2)
    assert_same_bits(host, dev)


def test_ranger_la_steps_with_host_scalars(device):
    """la_steps= also goes with the host's rectified / step_size (one step count for all tensors)."""
    keys = ["exp_avg", "exp_avg_sq", "slow_buffer"]
    host = make(torch.float32, device, keys)
    dev = clone(*host)
    kw = dict(RADAM, decoupled=False, grad_scale=1.0, **radam_host(9))
    one_by_one(host, functools.partial(triton_kernels.radam_step, **kw),
               [dict(lookahead_alpha=0.5 if la % 3 == 0 else None) for la in LA])
    triton_kernels.radam_step(*dev, **kw, lookahead_alpha=0.5, la_steps=counters(LA, device), k=3)
    assert_same_bits(host, dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookahead_sync_per_tensor(device, dtype):
    host = make(dtype, device, ["slow_buffer"])
    dev = clone(*host)
    before = clone(*host)
    for i, la in enumerate(LA):
        if la % 4 == 0:
            triton_kernels.lookahead_sync([host[0][i]], [host[2]["slow_buffer"][i]], alpha=0.3)
    triton_kernels.lookahead_sync(dev[0], dev[2]["slow_buffer"], alpha=0.3, la_steps=counters(LA, device), k=4)
    assert_same_bits(host, dev)
    assert torch.equal(dev[0][1], before[0][1]) and torch.equal(dev[2]["slow_buffer"][1], before[2]["slow_buffer"][1])
    triton_kernels.lookahead_sync(dev[0], dev[2]["slow_buffer"], alpha=0.3)  # no la_steps: every tensor
    for i in range(len(SIZES)):
        triton_kernels.lookahead_sync([host[0][i]], [host[2]["slow_buffer"][i]], alpha=0.3)
    assert_same_bits(host, dev)


# ---------------------------------------------------------------------------------------------
# 3. step_control


def host_control(sumsq, flag, grad_scale, max_grad_norm, skip_nonfinite):
    """dist_optim.optim.base's host arithmetic: (scale, skip, norm)."""
    sumsq = torch.tensor(sumsq, dtype=torch.float32)
    bad = flag > 0 or not bool(torch.isfinite(sumsq))
    scale32 = torch.tensor(grad_scale, dtype=torch.float32)
    norm = sumsq.sqrt() * scale32
    coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) if max_grad_norm is not None else torch.tensor(1.0)
    return coef * scale32, float(bad and skip_nonfinite), norm


def run_control(device, stats, **kw):
    control = torch.tensor([9.0, 9.0, 9.0, 3.0], device=device)
    cs = counters([1, 5, 7], device)
    triton_kernels.step_control(control, stats=None if stats is None else torch.tensor(stats, device=device),
                                counters=cs, **kw)
    return control.cpu(), [float(c) for c in cs]


@pytest.mark.parametrize("sumsq", [0.0, 0.25, 1.0, 3.7, 1e6, 123456.78])
@pytest.mark.parametrize("grad_scale", [1.0, 0.5, 2.0**-10, 0.7, 0.1, 1 / 3])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0, 0.3])
def test_step_control_matches_the_host_decision(device, sumsq, grad_scale, max_grad_norm):
    """scale and norm equal the host's bits, also for a grad_scale fp32 cannot hold (both take it
    as an fp32 value and compute in fp32)."""
    control, cs = run_control(device, [sumsq, 0.0], grad_scale=grad_scale, max_grad_norm=max_grad_norm,
                              skip_nonfinite=True)
    scale, skip, norm = host_control(sumsq, 0.0, grad_scale, max_grad_norm, True)
    assert control[1] == 0 and control[3] == 3.0 and cs == [2.0, 6.0, 8.0]
    assert torch.equal(control[2], norm)
    assert torch.equal(control[0], scale)


@pytest.mark.parametrize("stats", [[float("inf"), 0.0], [float("nan"), 0.0], [4.0, 1.0], [4.0, 3.0]],
                         ids=["inf", "nan", "flag", "flag-from-3-ranks"])
def test_step_control_skips_a_non_finite_step(device, stats):
    control, cs = run_control(device, stats, grad_scale=0.5, max_grad_norm=1.0, skip_nonfinite=True)
    assert control[1] == 1.0 and control[3] == 4.0
    assert cs == [1.0, 5.0, 7.0]  # not advanced on a skipped step


def test_step_control_without_skipping_applies_a_nan_coefficient(device):
    control, cs = run_control(device, [float("nan"), 0.0], grad_scale=1.0, max_grad_norm=1.0, skip_nonfinite=False)
    assert control[1] == 0 and control[3] == 3.0 and cs == [2.0, 6.0, 8.0]
    assert control[0].isnan() and control[2].isnan()  # torch.clamp keeps NaN: so does the kernel
    control, _ = run_control(device, [float("inf"), 0.0], grad_scale=1.0, max_grad_norm=1.0, skip_nonfinite=False)
    assert control[0] == 0.0 and control[2] == float("inf")  # 1 / inf: everything clipped to zero


def test_step_control_without_stats(device):
    control, cs = run_control(device, None, grad_scale=0.25)
    assert control.tolist() == [0.25, 0.0, 9.0, 3.0] and cs == [2.0, 6.0, 8.0]


def test_step_control_grad_scale_on_the_device(device):
    gs = torch.tensor([0.5], device=device)
    control, _ = run_control(device, [16.0, 0.0], grad_scale=gs, max_grad_norm=1.0, skip_nonfinite=True)
    scale, _, norm = host_control(16.0, 0.0, 0.5, 1.0, True)
    assert torch.equal(control[0], scale) and torch.equal(control[2], norm)


def test_step_control_many_counters_and_a_cached_table(device, monkeypatch):
    """More counters than a block (the loop), in any storage (views of one buffer too); the pointer
    table is built once per set of counters."""
    from triton_kernels import _multi_tensor

    flat = torch.arange(300, dtype=torch.float32, device=device)
    cs = [flat[i:i + 1] for i in range(0, 300, 3)] + counters(range(100), device)
    control = torch.zeros(4, device=device)
    triton_kernels.step_control(control, counters=cs)
    builds = _multi_tensor.TABLES.builds

    def no_tables(*args, **kwargs):
        raise AssertionError("a steady-state step built a table")

    monkeypatch.setattr(torch, "tensor", no_tables)
    triton_kernels.step_control(control, counters=cs)
    monkeypatch.undo()
    assert _multi_tensor.TABLES.builds == builds
    expected = torch.arange(300, dtype=torch.float32).clone()
    expected[::3] += 2
    assert torch.equal(flat.cpu(), expected)
    assert [float(c) for c in cs[100:]] == [float(i + 2) for i in range(100)]


def test_update_kernels_read_control_views(device):
    """grad_scale=control[0:1] and skip=control[1:2] (views into the 4-element tensor)."""
    kw = dict(ADAM[1])
    keys = adam_keys(kw)
    host = make(torch.float32, device, keys)
    dev = clone(*host)
    control = torch.zeros(4, device=device)
    triton_kernels.step_control(control, stats=torch.tensor([9.0, 0.0], device=device), grad_scale=1.0,
                                max_grad_norm=1.0, skip_nonfinite=True)
    scale = float(control[0])
    triton_kernels.adam_step(*host, **kw, **adam_host(kw["lr"], kw["beta1"], kw["beta2"], 3), grad_scale=scale)
    triton_kernels.adam_step(*dev, **kw, grad_scale=control[0:1], skip=control[1:2],
                             steps=counters([3] * len(SIZES), device))
    assert_same_bits(host, dev)
    before = clone(*dev)
    triton_kernels.step_control(control, stats=torch.tensor([float("inf"), 0.0], device=device), grad_scale=1.0,
                                max_grad_norm=1.0, skip_nonfinite=True)
    triton_kernels.adam_step(*dev, **kw, grad_scale=control[0:1], skip=control[1:2],
                             steps=counters([4] * len(SIZES), device))
    assert_same_bits(before, dev)


# ---------------------------------------------------------------------------------------------
# 4. sumsq_nonfinite: a partials launch per bucket and one finishing launch


def count_launches(monkeypatch):
    from triton_kernels import _launch

    seen = []
    real = _launch.run
    monkeypatch.setattr(_launch, "run", lambda kernel, *a, **k: seen.append(kernel.fn.__name__) or real(kernel, *a, **k))
    return seen


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["one-bucket", "three-buckets"])
def test_sumsq_launches(device, monkeypatch, dtypes):
    import dist_optim.functional as F

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen).to(device=device, dtype=dtypes[i % len(dtypes)]) for i, n in enumerate(SIZES)]
    seen = count_launches(monkeypatch)
    ours = triton_kernels.sumsq_nonfinite(grads)
    assert seen == ["_sumsq_kernel"] * len(dtypes) + ["_sumsq_finish_kernel"]
    assert ours.dtype == torch.float32 and ours.shape == (2,) and ours.device == grads[0].device
    torch.testing.assert_close(ours.cpu(), F.grad_sumsq_and_flag(grads, backend="torch").cpu(), rtol=1e-5, atol=0)
    assert torch.equal(ours, triton_kernels.sumsq_nonfinite(grads))  # fixed order: the same bits


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sumsq_flags_in_any_bucket(device, bad):
    grads = [torch.ones(300, device=device), torch.ones(700, device=device, dtype=torch.bfloat16)]
    grads[1][650] = bad
    assert triton_kernels.sumsq_nonfinite(grads)[1] == 1.0
    big = [torch.full((600,), 3e18, device=device)]  # finite elements, an overflowing sum
    out = triton_kernels.sumsq_nonfinite(big)
    assert out[0] == float("inf") and out[1] == 1.0


# ---------------------------------------------------------------------------------------------
# Bad input, tables


def test_bad_counters_are_value_errors(device):
    data = make(torch.float32, device, ["exp_avg", "exp_avg_sq"])
    kw = dict(ADAM[0], grad_scale=1.0)
    with pytest.raises(ValueError, match=r"steps\[1\] must be a one-element fp32 tensor"):
        triton_kernels.adam_step(*data, **kw, steps=[torch.ones(())] + [torch.ones(2)] * 5)
    with pytest.raises(ValueError, match="steps: 1 tensors for 6 params"):
        triton_kernels.adam_step(*data, **kw, steps=counters([1], device))
    with pytest.raises(ValueError, match="must be a one-element fp32"):
        triton_kernels.adam_step(*data, **kw, steps=[torch.ones((), dtype=torch.int64)] * 6)
    with pytest.raises(ValueError, match="pass None"):
        triton_kernels.adam_step(*data, **kw, step_size=0.1, steps=counters([1] * 6, device))
    with pytest.raises(ValueError, match="must be given"):
        triton_kernels.adam_step(*data, **kw, step_size=0.1)
    with pytest.raises(ValueError, match="rho_threshold"):
        triton_kernels.radam_step(*data, **dict(RADAM, decoupled=True), lookahead_alpha=None, grad_scale=1.0,
                                  steps=counters([1] * 6, device))
    with pytest.raises(ValueError, match="k >= 1"):
        triton_kernels.lookahead_sync(data[0], data[2]["exp_avg"], alpha=0.5, la_steps=counters([1] * 6, device))
    with pytest.raises(ValueError, match="control must be"):
        triton_kernels.step_control(torch.zeros(3, device=device))


def test_counters_do_not_decide_which_chunks_are_fast(device):
    """A step counter at any address (a view into a buffer) leaves its tensor's full chunks fast."""
    from triton_kernels import _multi_tensor

    params, grads, states = make(torch.float32, device, ["sum"], sizes=[1003, 5])
    steps = [at_offset(torch.ones(1, device=device), 1), at_offset(torch.ones(1, device=device), 3)]
    cache = _multi_tensor.TableCache()
    plain = cache.get([params, grads, states["sum"]], [0, 1], device)
    counted = cache.get([params, grads, states["sum"], steps], [0, 1], device, elementwise=3)
    assert torch.equal(plain[1], counted[1]) and cache.builds == 2


def test_steady_state_launch_with_counters_builds_no_table(device, monkeypatch):
    from triton_kernels import _launch, _multi_tensor

    data = make(torch.float32, device, ["exp_avg", "exp_avg_sq", "slow_buffer"])
    steps, la = counters([3] * 6, device), counters([2] * 6, device)
    monkeypatch.setattr(_launch, "run", lambda *a, **k: None)
    kw = dict(RADAM, decoupled=True, lookahead_alpha=0.5, grad_scale=1.0, steps=steps, rho_threshold=5.0,
              la_steps=la, k=2)
    triton_kernels.radam_step(*data, **kw)
    builds = _multi_tensor.TABLES.builds

    def no_tables(*args, **kwargs):
        raise AssertionError("a steady-state step built a table")

    monkeypatch.setattr(torch, "tensor", no_tables)
    triton_kernels.radam_step(*data, **kw)
    assert _multi_tensor.TABLES.builds == builds


def test_the_superseded_device_flag_forms_are_refused(device):
    data = make(torch.float32, device, ["exp_avg", "exp_avg_sq", "slow_buffer"])
    kw = dict(RADAM, decoupled=True, lookahead_alpha=0.5, grad_scale=1.0, step_size=0.1)
    with pytest.raises(ValueError, match="pass steps="):
        triton_kernels.radam_step(*data, **kw, rectified=torch.ones(1, device=device))
    with pytest.raises(TypeError):
        triton_kernels.radam_step(*data, **kw, rectified=True, sync=torch.ones(1, device=device))
