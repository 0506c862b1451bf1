"""bf16 params without fp32 masters: ``bf16_update`` ("nearest", "stochastic", "kahan") on every
element-wise optimizer, against a plain-PyTorch reference written here from the formulas (fp32 math
per param, then the write of dist_optim.state.rounding's helpers), bit for bit on the torch path.

Also: stochastic rounding is unbiased, reproducible and seeded per param and rank; Kahan's buffer
keeps updates below half an ulp; a skipped step changes nothing; state_dict round trips keep the
buffers; memory_report counts them; bad arguments raise ValueError.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import dist_optim
import triton_kernels
from dist_optim.state import rounding
from tests.optim._factories import assert_identical, snapshot, torch_equal_bits
from tests.optim._setup import make_params, set_grads

MODES = ("nearest", "stochastic", "kahan")
SEED = 1234
STEPS = 7  # Ranger/Lookahead (k=3) sync twice; RAdam takes both its branches (rho_t > 5 from t = 6)

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not triton_kernels.supports(torch.device("cpu")),
                                                          reason="needs the Triton interpreter"))

# name -> (factory(params, **rounding kwargs), reference family, its hyperparameters)
OPTIMIZERS = {
    "SGD": (lambda ps, **kw: dist_optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, **kw),
            "sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "SGD(no momentum)": (lambda ps, **kw: dist_optim.SGD(ps, lr=0.05, **kw), "sgd", dict(lr=0.05)),
    "Adagrad": (lambda ps, **kw: dist_optim.Adagrad(ps, lr=0.05, lr_decay=0.01, **kw),
                "adagrad", dict(lr=0.05, lr_decay=0.01, eps=1e-10)),
    "RMSprop": (lambda ps, **kw: dist_optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True, **kw),
                "rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8, momentum=0.5)),
    "Adam": (lambda ps, **kw: dist_optim.Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.01, **kw),
             "adam", dict(lr=0.01, weight_decay=0.01, decoupled=False, amsgrad=True)),
    "AdamW": (lambda ps, **kw: dist_optim.AdamW(ps, lr=0.01, **kw),
              "adam", dict(lr=0.01, weight_decay=0.01, decoupled=True, amsgrad=False)),
    "RAdam": (lambda ps, **kw: dist_optim.RAdam(ps, lr=0.01, **kw), "radam", dict(lr=0.01)),
    "Ranger": (lambda ps, **kw: dist_optim.Ranger(ps, lr=0.01, k=3, alpha=0.3, **kw),
               "ranger", dict(lr=0.01, beta1=0.95, eps=1e-5)),
    "Lookahead(AdamW)": (lambda ps, **kw: dist_optim.Lookahead(dist_optim.AdamW(ps, lr=0.01, **kw), k=3, alpha=0.3),
                         "lookahead", dict(lr=0.01, weight_decay=0.01, decoupled=True, amsgrad=False)),
}


# --- the reference: one param at a time, the formulas in plain torch ops -------------------------

def sgd_math(p, g, st, t, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0):
    if weight_decay:
        g = g.add(p, alpha=weight_decay)
    if momentum:
        if "buf" not in st:
            st["buf"] = g.clone()
        else:
            st["buf"].mul_(momentum).add_(g, alpha=1.0 - dampening)
        g = st["buf"]
    return p.add(g, alpha=-lr)


def adagrad_math(p, g, st, t, *, lr, lr_decay, eps):
    clr = lr / (1.0 + (t - 1) * lr_decay)
    s = st.setdefault("sum", torch.zeros_like(p))
    s.addcmul_(g, g, value=1.0)
    return p.addcdiv(g * -clr, s.sqrt().add_(eps))


def rmsprop_math(p, g, st, t, *, lr, alpha, eps, momentum):
    sq, ga, buf = (st.setdefault(k, torch.zeros_like(p)) for k in ("sq", "ga", "buf"))
    sq.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
    ga.lerp_(g, 1.0 - alpha)
    avg = sq.addcmul(ga, ga, value=-1.0).sqrt_().add_(eps)
    buf.mul_(momentum).addcdiv_(g, avg)
    return p.add(buf, alpha=-lr)


def _moments(p, g, st, *, lr, beta1, beta2, weight_decay, decoupled):
    if weight_decay and decoupled:
        p = p.mul(1.0 - lr * weight_decay)
    elif weight_decay:
        g = g.add(p, alpha=weight_decay)
    m, v = st.setdefault("m", torch.zeros_like(p)), st.setdefault("v", torch.zeros_like(p))
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return p, m, v


def adam_math(p, g, st, t, *, lr, weight_decay, decoupled, amsgrad, beta1=0.9, beta2=0.999, eps=1e-8):
    p, m, v = _moments(p, g, st, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, decoupled=decoupled)
    if amsgrad:
        vmax = st.setdefault("vmax", torch.zeros_like(p))
        torch.maximum(vmax, v, out=vmax)
        v = vmax
    denom = v.sqrt().div_(math.sqrt(1.0 - beta2**t)).add_(eps)
    return p.addcdiv(m, denom, value=-lr / (1.0 - beta1**t))


def radam_math(p, g, st, t, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, rho_threshold=5.0):
    p, m, v = _moments(p, g, st, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, decoupled=False)
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
    if rho_t > rho_threshold:
        rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        return p.addcdiv(m, v.sqrt().add_(eps), value=-(lr * rect * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)))
    return p.add(m, alpha=-lr / (1.0 - beta1**t))


MATH = {"sgd": sgd_math, "adagrad": adagrad_math, "rmsprop": rmsprop_math, "adam": adam_math, "radam": radam_math,
        "ranger": radam_math, "lookahead": adam_math}


def write(mode, p, x, st, base, t):
    """The new param from the fp32 result ``x``: the contract's rule for bf16 params, round to
    nearest for the others."""
    if p.dtype != torch.bfloat16 or mode == "nearest" or p.numel() == 0:
        return x.to(p.dtype)
    if mode == "stochastic":
        index = torch.arange(x.numel()).reshape(x.shape)
        return rounding.stochastic_round_bf16(x, rounding.step_stream(base, t), index)
    new, st["comp"] = rounding.kahan_add_bf16(p, st.setdefault("comp", torch.zeros_like(p)), x - p.float())
    return new


def sync(p32, slow, alpha, dtype):
    """Lookahead's sync on fp32 fast weights: (new slow weights, new param)."""
    s32 = slow.float()
    s32 = s32.add(p32 - s32, alpha=alpha)
    slow = s32.to(slow.dtype)
    return slow, slow.float().to(dtype)


class Reference:
    """The optimizer ``name`` stepped by hand over ``params`` (plain tensors, updated here)."""

    def __init__(self, name, params, mode, *, seed=SEED, rank=0, k=3, alpha=0.3, slow_dtype=None):
        _, self.family, self.hyper = OPTIMIZERS[name]
        self.params, self.mode, self.k, self.alpha = [p.detach().clone() for p in params], mode, k, alpha
        self.bases = [rounding.param_base(seed, i, rank) for i in range(len(params))]
        self.state = [{"t": 0, "la": 0} for _ in params]
        self.members = [p.requires_grad for p in params]
        if self.family in ("ranger", "lookahead"):
            for p, st, member in zip(self.params, self.state, self.members):
                if member:
                    st["slow"] = p.to(slow_dtype or p.dtype)

    def step(self, grads):
        math_fn = MATH[self.family]
        for i, (p, g, st) in enumerate(zip(self.params, grads, self.state)):
            due = False
            if self.members[i] and self.family in ("ranger", "lookahead"):
                st["la"] += 1
                due = st["la"] % self.k == 0
            x = None
            if g is not None:
                st["t"] += 1
                x = math_fn(p.float(), g.float(), st, st["t"], **self.hyper)
            if self.family == "ranger" and due:  # the fp32 result feeds the slow weights
                st["slow"], self.params[i] = sync(p.float() if x is None else x, st["slow"], self.alpha, p.dtype)
                continue
            if x is not None:
                self.params[i] = write(self.mode, p, x, st, self.bases[i], st["t"])
            if self.family == "lookahead" and due:  # after the inner optimizer's write
                st["slow"], self.params[i] = sync(self.params[i].float(), st["slow"], self.alpha, p.dtype)


def mixed_params():
    """make_params' awkward bf16 set (size 1, odd sizes, empty, a grad None on some steps, frozen)
    with an fp32 and an fp16 param among them: the modes must leave those as nearest would."""
    ps = make_params(torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    extra = [torch.randn(5, generator=gen).requires_grad_(), torch.randn(6, generator=gen).half().requires_grad_()]
    return ps[:-1] + extra + ps[-1:]


def grads_of(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_mode_equals_the_plain_reference(name, mode, backend):
    params = mixed_params()
    opt = OPTIMIZERS[name][0](params, bf16_update=mode, rounding_seed=SEED, backend=backend)
    ref = Reference(name, params, mode)
    for step in range(STEPS):
        set_grads(params, step)
        ref.step(grads_of(params))
        opt.step()
    inner = getattr(opt, "optimizer", opt)
    for i, (p, r) in enumerate(zip(params, ref.params)):
        if backend == "torch":
            assert torch_equal_bits(p.detach(), r), (i, p.dtype)
        else:
            # the kernels' fp32 math may differ from the torch path's by an ulp, which can move a bf16
            # rounding by one bf16 ulp (2**-8 relative) now and then
            torch.testing.assert_close(p.detach().float(), r.float(), rtol=2**-7, atol=1e-5)
        state = inner.state[p] if p in inner.state else {}
        if mode == "kahan" and p.dtype == torch.bfloat16 and p.requires_grad:
            assert state["kahan_comp"].dtype == torch.bfloat16
            if backend == "torch":
                assert torch_equal_bits(state["kahan_comp"], ref.state[i].get("comp", torch.zeros_like(p)))
        else:
            assert "kahan_comp" not in state
        if "slow" in ref.state[i] and backend == "torch":
            assert torch_equal_bits(state["slow_buffer"], ref.state[i]["slow"]), i


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fp32_and_fp16_params_ignore_the_mode(name):
    """The modes apply to bf16 params only: fp32 and fp16 params get the same bits as under nearest."""
    results = {}
    for mode in MODES:
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(9, generator=gen).requires_grad_(),
                  torch.randn(4, 3, generator=gen).half().requires_grad_()]
        opt = OPTIMIZERS[name][0](params, bf16_update=mode, backend="torch")
        for step in range(STEPS):
            set_grads(params, step)
            opt.step()
        results[mode] = [p.detach().clone() for p in params]
        assert not any("kahan_comp" in s for s in getattr(opt, "optimizer", opt).state.values())
    for mode in ("stochastic", "kahan"):
        for a, b in zip(results[mode], results["nearest"]):
            assert torch_equal_bits(a, b)


def test_sgd_keeps_a_step_counter_only_for_stochastic_bf16_params():
    params = mixed_params()
    for mode, expect in (("nearest", set()), ("kahan", {"kahan_comp"}), ("stochastic", {"step"})):
        opt = dist_optim.SGD(params, lr=0.1, bf16_update=mode, backend="torch")
        set_grads(params, 0)
        opt.step()
        opt.step()
        for i, p in enumerate(params):
            keys = set(opt.state[p]) if p in opt.state else set()
            assert keys == (expect if p.dtype == torch.bfloat16 and p.requires_grad else set()), (mode, i)
        if mode == "stochastic":
            assert float(opt.state[params[0]]["step"]) == 2.0


# --- stochastic rounding's statistics and seeding -----------------------------------------------

ULP = 2.0**-7  # bf16's spacing in [1, 2)


def _tiny_updates(mode, steps, *, n=65536, lr=1e-3, seed=0):
    """SGD on a bf16 param at 1.5 with gradient 1: each step moves it by lr = 0.128 ulp, which
    round-to-nearest loses; returns the param."""
    p = torch.full((n,), 1.5, dtype=torch.bfloat16, requires_grad=True)
    opt = dist_optim.SGD([p], lr=lr, bf16_update=mode, rounding_seed=seed, backend="torch")
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach()


def test_stochastic_rounding_is_unbiased_where_nearest_loses_the_update():
    steps, n, lr = 20, 65536, 1e-3
    assert bool((_tiny_updates("nearest", steps, n=n, lr=lr) == 1.5).all())
    moved = _tiny_updates("stochastic", steps, n=n, lr=lr).double() - 1.5
    # each step's rounding error per element is in (-ulp, ulp) with mean 0 and variance <= ulp^2 / 4;
    # over `steps` steps and n independent elements the mean's standard deviation is at most
    # ulp * sqrt(steps / 4 / n) (6.8e-5 here): five of them bound it
    bound = 5 * ULP * math.sqrt(steps / 4 / n)
    assert abs(float(moved.mean()) - (-steps * lr)) <= bound
    assert set(torch.unique(moved).tolist()) <= {-k * ULP for k in range(steps + 1)}


def test_stochastic_rounding_is_reproducible_and_seeded():
    a, b = _tiny_updates("stochastic", 3, n=4096), _tiny_updates("stochastic", 3, n=4096)
    assert torch_equal_bits(a, b)
    other = _tiny_updates("stochastic", 3, n=4096, seed=1)
    assert not torch.equal(a, other)


def test_each_param_and_each_step_has_its_own_stream():
    """Two identical params with the same gradient round differently (their positions differ), and
    one param's rounding of the same value differs from step to step."""
    p, q = (torch.full((4096,), 1.5, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    opt = dist_optim.SGD([p, q], lr=1e-3, bf16_update="stochastic", backend="torch")
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    assert not torch.equal(p, q)
    down = p.detach() < 1.5
    for _ in range(2):  # the elements that stayed, pushed again from the same value
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.step()
    assert 0 < int(down.sum()) < 4096


def test_stream_bases_are_the_contracts():
    """base = param_base(rounding_seed, position in the param groups flattened, rank 0), kept out of
    the state; params added later continue the numbering."""
    params = [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    opt = dist_optim.AdamW(params[:2], bf16_update="stochastic", rounding_seed=5, backend="torch")
    opt.add_param_group({"params": [params[2]]})
    kw = opt._rounding_kwargs(params, "stochastic")
    expect = [rounding.param_base(5, i, 0) for i in range(3)]
    assert kw["sr_bases"] == expect
    assert [int(t) for t in kw["sr_seeds"]] == expect
    assert all(t.dtype == torch.int64 and t.dim() == 0 for t in kw["sr_seeds"])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in params)


# --- Kahan ------------------------------------------------------------------------------------------

def test_kahan_follows_fp32_where_nearest_does_not_move():
    steps, lr = 200, 1e-3
    x = torch.tensor(1.5, dtype=torch.float32)
    for _ in range(steps):
        x = x - lr  # what SGD computes with fp32 weights
    assert bool((_tiny_updates("nearest", steps, n=64, lr=lr) == 1.5).all())
    kahan = _tiny_updates("kahan", steps, n=64, lr=lr).float()
    # p + comp tracks the fp32 sum; p alone is within an ulp of it (comp holds at most about half
    # an ulp, plus its own rounding)
    assert float((kahan - x).abs().max()) <= ULP


# --- skipped steps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_skipped_step_changes_no_param_buffer_or_counter(name, mode, backend):
    params = mixed_params()
    opt = OPTIMIZERS[name][0](params, bf16_update=mode, backend=backend)
    for step in range(3):  # the first is a host-flow step; with Triton the others take the device flow
        set_grads(params, step)
        opt.step()
    before = snapshot(getattr(opt, "optimizer", opt), params)
    set_grads(params, 3)
    params[0].grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert_identical(before, snapshot(getattr(opt, "optimizer", opt), params))


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_a_skipped_first_step_creates_no_state(mode):
    params = mixed_params()
    opt = dist_optim.SGD(params, lr=0.1, bf16_update=mode, backend="torch")
    set_grads(params, 0)
    params[0].grad[0] = float("inf")
    opt.step()
    assert not any(opt.state.values())


# --- checkpoints -------------------------------------------------------------------------------------

def _saved(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("name", ["SGD(no momentum)", "AdamW", "Ranger", "Lookahead(AdamW)"])
def test_state_dict_round_trip_resumes_bit_exactly(name, mode):
    params = mixed_params()
    opt = OPTIMIZERS[name][0](params, bf16_update=mode, rounding_seed=SEED, backend="torch")
    for step in range(4):
        set_grads(params, step)
        opt.step()
    saved = _saved(opt)
    entries = [s for s in saved["state"].values() if "kahan_comp" in s or "slow_buffer" in s]
    if mode == "kahan" or name in ("Ranger", "Lookahead(AdamW)"):
        assert entries
    for s in entries:
        assert s.get("kahan_comp", torch.zeros((), dtype=torch.bfloat16)).dtype == torch.bfloat16
    resumed_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    resumed = OPTIMIZERS[name][0](resumed_params, bf16_update=mode, rounding_seed=SEED, backend="torch")
    resumed.load_state_dict(saved)
    inner, inner_resumed = getattr(opt, "optimizer", opt), getattr(resumed, "optimizer", resumed)
    assert_identical(snapshot(inner, params), snapshot(inner_resumed, resumed_params))  # dtypes included
    for step in range(4, 8):
        set_grads(params, step)
        set_grads(resumed_params, step)
        opt.step()
        resumed.step()
    assert_identical(snapshot(inner, params), snapshot(inner_resumed, resumed_params))


def test_a_kahan_state_is_refused_under_another_mode():
    params = mixed_params()
    opt = dist_optim.AdamW(params, bf16_update="kahan", backend="torch")
    set_grads(params, 0)
    opt.step()
    other = dist_optim.AdamW([p.detach().clone().requires_grad_(p.requires_grad) for p in params], backend="torch")
    with pytest.raises(ValueError, match="kahan_comp"):
        other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not any(other.state.values())


def test_a_nearest_state_loads_under_kahan_with_a_zero_buffer():
    params = mixed_params()
    opt = dist_optim.AdamW(params, backend="torch")
    set_grads(params, 0)
    opt.step()
    kahan = dist_optim.AdamW(params, bf16_update="kahan", backend="torch")
    kahan.load_state_dict(copy.deepcopy(opt.state_dict()))
    set_grads(params, 1)
    kahan.step()
    comp = kahan.state[params[0]]["kahan_comp"]
    assert comp.dtype == torch.bfloat16 and comp.shape == params[0].shape


# --- memory report ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, per_element", [("stochastic", 2 * (1 + 4 / 256)), ("kahan", 2 * (1 + 4 / 256) + 2)])
def test_memory_report_of_bf16_adamw_with_int8_state(mode, per_element):
    """int8 moments: a code per element and an fp32 absmax per 256 (2 x 1.0156 B); Kahan adds its
    bf16 buffer (2 B); the step counter is 4 B per param."""
    n = 65536
    p = torch.zeros(n, dtype=torch.bfloat16, requires_grad=True)
    opt = dist_optim.AdamW([p], state_dtype="int8", bf16_update=mode, backend="torch")
    p.grad = torch.ones_like(p)
    opt.step()
    report = opt.memory_report()
    assert report.bf16 == (2 * n if mode == "kahan" else 0)
    assert report.counters == 4 and report.fp32 == 0
    assert report.bytes_per_element == pytest.approx(per_element + 4 / n, rel=1e-12)
    assert round(report.bytes_per_element, 2) == (2.03 if mode == "stochastic" else 4.03)


# --- arguments --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bad_bf16_update_or_seed_is_a_value_error(name):
    params = mixed_params()
    factory = OPTIMIZERS[name][0]
    with pytest.raises(ValueError, match="bf16_update.*'round'.*'nearest', 'stochastic', 'kahan'"):
        factory(params, bf16_update="round")
    for seed in (-1, 2**64, 1.5, True, "0"):
        with pytest.raises(ValueError, match="rounding_seed"):
            factory(params, rounding_seed=seed)
    factory(params, rounding_seed=2**64 - 1)


# --- what kernel modules are sent -------------------------------------------------------------------

@pytest.mark.skipif(not triton_kernels.supports(torch.device("cpu")), reason="needs the Triton interpreter")
@pytest.mark.parametrize("listed", [True, False])
def test_kernels_get_the_contracts_arguments_only_for_modes_they_list(monkeypatch, listed):
    """A kernel module listing the modes (ROUNDING_MODES) gets bf16 calls with bf16_update, the
    stream bases as 0-dim int64 tensors, and t: ``sr_step`` in the host flow, the advanced counters
    (``steps``) in the device flow; a module that does not list them is not called for bf16 params
    (the torch path runs them), and fp32 params reach it with no rounding arguments."""
    calls = []

    def recorder(params, grads, states, **kw):
        calls.append((params[0].dtype, kw))

    if listed:
        monkeypatch.setattr(triton_kernels, "ROUNDING_MODES", MODES, raising=False)
    else:
        monkeypatch.delattr(triton_kernels, "ROUNDING_MODES", raising=False)
    monkeypatch.setattr(triton_kernels, "sgd_step", recorder)
    p = torch.full((8,), 1.5, dtype=torch.bfloat16, requires_grad=True)
    q = torch.zeros(8, requires_grad=True)
    opt = dist_optim.SGD([q, p], lr=0.1, bf16_update="stochastic", rounding_seed=3, backend="triton")
    for _ in range(2):  # a host-flow step (it builds the counter), then a device-flow one
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.step()
    fp32 = [kw for dtype, kw in calls if dtype == torch.float32]
    assert fp32 and all("bf16_update" not in kw for kw in fp32)
    bf16 = [kw for dtype, kw in calls if dtype == torch.bfloat16]
    if not listed:
        assert not bf16 and not torch.equal(p.detach(), torch.full_like(p, 1.5))  # the torch path stepped it
        return
    base = rounding.param_base(3, 1, 0)
    assert bf16 and all(kw["bf16_update"] == "stochastic" and [int(s) for s in kw["sr_seeds"]] == [base]
                        for kw in bf16)
    assert all(s.dtype == torch.int64 and s.dim() == 0 for kw in bf16 for s in kw["sr_seeds"])
    host = [kw for kw in bf16 if kw.get("skip") is None]
    device = [kw for kw in bf16 if kw.get("skip") is not None]
    assert host[0]["sr_step"] == 1 and "steps" not in host[0]
    assert device and all(len(kw["steps"]) == 1 and "sr_step" not in kw for kw in device)
    assert device[-1]["steps"][0] is opt.state[p]["step"] and float(opt.state[p]["step"]) == 2.0
