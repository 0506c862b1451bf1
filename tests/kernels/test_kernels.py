"""Every Triton kernel against the torch path (dist_optim.functional with backend="torch"): the
interpreter on CPU, real kernels on CUDA (`cuda` mark). Several tensors per launch with odd sizes
and an empty one, fp32/bf16/fp16 params (and fp32 grads for low-precision params), every switch.

Tolerances: fp32 params and all (fp32) state rtol 2e-6 / atol 1e-6 — the kernel evaluates the same
expressions, but a GPU may contract a multiply-add into an FMA (and torch's CPU add-with-alpha does),
an ulp or two apart. bf16/fp16 params: one ulp of the param dtype — the fp32 results may sit on
either side of a rounding boundary, and the Triton interpreter converts fp32 to bf16 by truncation
where torch and GPUs round to nearest even. Because a one-ulp param difference feeds the next step,
low-precision runs are compared step by step from identical inputs; fp32 runs over several steps.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dist_optim.functional as F
import triton_kernels
from tests.kernels import _against_torch as shared
from tests.kernels._against_torch import (ADAM_CASES, ADAM_IDS, RMSPROP_CASES, RMSPROP_IDS, assert_match, at_offset,
                                          clone)
from tests._triton import device  # noqa: F401 (a fixture)

# Under the interpreter a chunk is 256 elements: 512 is two full chunks and no tail, 1003 three full
# chunks and a tail of 235, the rest a tail only.
SIZES = [1, 7, 1003, 0, 601, 512]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]



make = functools.partial(shared.make, sizes=SIZES)
compare = functools.partial(shared.compare, backend="triton", sizes=SIZES)


low_precision_grads = pytest.mark.parametrize(
    "dtype,grad_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)]
)


@low_precision_grads
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, grad_scale=1.0),
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, grad_scale=0.5),
        dict(lr=0.05, momentum=0.8, dampening=0.0, weight_decay=0.1, nesterov=True, grad_scale=-1.0),
    ],
)
def test_sgd(device, dtype, grad_dtype, kw):
    keys = ["momentum_buffer"] if kw["momentum"] else []

    def step(p, g, s, *, t, backend):
        F.sgd_step(p, g, s, first_step=t == 1, backend=backend, **kw)

    compare(step, dtype, device, keys, grad_dtype=grad_dtype)


@low_precision_grads
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_adagrad(device, dtype, grad_dtype, weight_decay, grad_scale):
    def step(p, g, s, *, t, backend):
        F.adagrad_step(p, g, s, lr=0.1, lr_decay=0.01, weight_decay=weight_decay, eps=1e-10, step=t,
                       grad_scale=grad_scale, backend=backend)

    compare(step, dtype, device, ["sum"], grad_dtype=grad_dtype)


@low_precision_grads
# Not the fourth case (momentum, weight decay, zero initial state) here: where 0.8 g + 0.1 p cancels
# to near zero, g / (sqrt(v) + eps) turns the interpreter's unfused multiply-add (torch's CPU ops fuse
# it) into differences beyond the fp32 state tolerance; the CPU kernels, which fuse as torch does,
# run it (test_cpu_backend.py).
@pytest.mark.parametrize("kw", RMSPROP_CASES[:3], ids=RMSPROP_IDS[:3])
def test_rmsprop(device, dtype, grad_dtype, kw):
    keys = ["square_avg"] + (["grad_avg"] if kw["centered"] else []) + (["momentum_buffer"] if kw["momentum"] else [])

    def step(p, g, s, *, t, backend):
        F.rmsprop_step(p, g, s, lr=0.01, eps=1e-8, grad_scale=0.8, backend=backend, **kw)

    # A centered average needs square_avg >= grad_avg^2 to stay real: start both at zero. Centered,
    # sqrt(v - m^2) cancels: ulps of v and m grow by (v + m^2) / (v - m^2), hence rtol 2e-5 there.
    data = make(dtype, device, keys, grad_dtype=grad_dtype)
    for key in keys:
        for t in data[2][key]:
            t.zero_()
    compare(step, dtype, device, keys, data=data, state_rtol=2e-5 if kw["centered"] else 2e-6)


@low_precision_grads
@pytest.mark.parametrize("kw", ADAM_CASES, ids=ADAM_IDS)
def test_adam(device, dtype, grad_dtype, kw):
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kw["amsgrad"] else [])

    def step(p, g, s, *, t, backend):
        F.adam_step(p, g, s, lr=0.01, eps=1e-8, step=t, grad_scale=-0.5, backend=backend, **kw)

    compare(step, dtype, device, keys, grad_dtype=grad_dtype)


@low_precision_grads
@pytest.mark.parametrize("first_step", [1, 12], ids=["unrectified", "rectified"])
@pytest.mark.parametrize("sync", [None, 0.3], ids=["radam", "ranger-sync"])
@pytest.mark.parametrize("decoupled", [False, True])
def test_radam_and_ranger_sync(device, dtype, grad_dtype, first_step, sync, decoupled):
    keys = ["exp_avg", "exp_avg_sq"] + (["slow_buffer"] if sync is not None else [])

    def step(p, g, s, *, t, backend):
        F.radam_step(p, g, s, lr=0.01, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.05, decoupled=decoupled,
                     rho_threshold=5.0, step=first_step + t - 1, lookahead_alpha=sync, grad_scale=1.3, backend=backend)

    assert (F.radam_rho(0.999, 1) > 5.0) is False and F.radam_rho(0.999, 12) > 5.0
    compare(step, dtype, device, keys, grad_dtype=grad_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lookahead_sync(device, dtype):
    def step(p, g, s, *, t, backend):
        F.lookahead_sync(p, s["slow_buffer"], alpha=0.3, backend=backend)

    compare(step, dtype, device, ["slow_buffer"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sumsq_matches_torch(device, dtype):
    _, grads, _ = make(dtype, device, [])
    ours = F.grad_sumsq_and_flag(grads, backend="triton")
    ref = F.grad_sumsq_and_flag(grads, backend="torch")
    torch.testing.assert_close(ours.cpu(), ref.cpu(), rtol=1e-5, atol=0)  # summation order differs
    assert ours[1] == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_sumsq_flags_nonfinite(device, bad):
    _, grads, _ = make(torch.float32, device, [])
    grads[2][500] = bad
    assert F.grad_sumsq_and_flag(grads, backend="triton")[1] == 1


def test_sumsq_is_bitwise_reproducible(device):
    _, grads, _ = make(torch.float32, device, [])
    first = F.grad_sumsq_and_flag(grads, backend="triton")
    assert torch.equal(first, F.grad_sumsq_and_flag(grads, backend="triton"))


def test_mixed_dtypes_in_one_call_use_one_launch_per_bucket(device, monkeypatch):
    from triton_kernels import _multi_tensor

    launches = []
    real = _multi_tensor.tables
    monkeypatch.setattr(_multi_tensor, "tables", lambda *a, **k: launches.append(1) or real(*a, **k))
    params = [torch.randn(n, device=device, dtype=d) for n, d in [(5, torch.float32), (9, torch.bfloat16), (3, torch.float32)]]
    grads = [torch.randn_like(p) for p in params]
    states = {"exp_avg": [torch.zeros(p.numel(), device=device) for p in params],
              "exp_avg_sq": [torch.zeros(p.numel(), device=device) for p in params]}
    ref = clone(params, grads, states)
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, amsgrad=False, step=1)
    F.adam_step(params, grads, states, backend="triton", **kw)
    F.adam_step(*ref, backend="torch", **kw)
    assert len(launches) == 2
    assert_match((params, grads, states), ref)


def test_bad_input_is_a_value_error(device):
    p = [torch.zeros(8, device=device)]
    g = [torch.zeros(8, device=device)]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False, step=1, backend="triton")
    strided = torch.zeros(16, device=device)[::2]
    with pytest.raises(ValueError, match=r"state\[0\] is not contiguous"):
        F.adam_step(p, g, {"exp_avg": [strided], "exp_avg_sq": [torch.zeros(8, device=device)]}, **kw)
    with pytest.raises(ValueError, match="2 tensors for 1 params"):
        F.adam_step(p, g + g, {"exp_avg": [torch.zeros(8, device=device)], "exp_avg_sq": [torch.zeros(8, device=device)]}, **kw)
    with pytest.raises(ValueError, match="must be fp32"):
        F.adam_step(p, g, {"exp_avg": [torch.zeros(8, device=device, dtype=torch.bfloat16)], "exp_avg_sq": [torch.zeros(8, device=device)]}, **kw)


# Full chunks of tensors whose every role is 16-byte aligned run unmasked with 128-bit accesses; a
# tail, or any tensor with one role at an unaligned address (a view starting at element 1, as a
# ZeRO flat-buffer slice can be), runs masked. Both paths must give the torch path's numbers.
def _adam(p, g, s, *, t, backend):
    F.adam_step(p, g, s, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=True,
                step=t, grad_scale=0.7, backend=backend)


FAMILIES = {
    "sgd": (["momentum_buffer"], lambda p, g, s, *, t, backend: F.sgd_step(
        p, g, s, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, first_step=t == 1,
        grad_scale=0.5, backend=backend)),
    "adagrad": (["sum"], lambda p, g, s, *, t, backend: F.adagrad_step(
        p, g, s, lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, step=t, grad_scale=0.37, backend=backend)),
    "rmsprop": (["square_avg", "momentum_buffer"], lambda p, g, s, *, t, backend: F.rmsprop_step(
        p, g, s, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.01, momentum=0.5, centered=False, grad_scale=0.8,
        backend=backend)),
    "adam": (["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], _adam),
    "ranger-sync": (["exp_avg", "exp_avg_sq", "slow_buffer"], lambda p, g, s, *, t, backend: F.radam_step(
        p, g, s, lr=0.01, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.05, decoupled=True, rho_threshold=5.0,
        step=11 + t, lookahead_alpha=0.3, grad_scale=1.3, backend=backend)),
    "lookahead": (["slow_buffer"], lambda p, g, s, *, t, backend: F.lookahead_sync(
        p, s["slow_buffer"], alpha=0.3, backend=backend)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unaligned_views_match_torch(device, family, dtype):
    keys, step = FAMILIES[family]
    data = make(dtype, device, keys, offsets={"params": 1, "grads": 1, "states": 1})
    assert all(p.data_ptr() % 16 for p in data[0] if p.numel())
    compare(step, dtype, device, keys, data=data)


@pytest.mark.parametrize("role", ["params", "grads", "states"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_unaligned_role_matches_torch(device, role, dtype):
    keys = FAMILIES["adam"][0]
    compare(_adam, dtype, device, keys, data=make(dtype, device, keys, offsets={role: 1}))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sumsq_on_unaligned_views(device, dtype):
    _, grads, _ = make(dtype, device, [], offsets={"grads": 3})
    ours = F.grad_sumsq_and_flag(grads, backend="triton")
    ref = F.grad_sumsq_and_flag(grads, backend="torch")
    torch.testing.assert_close(ours.cpu(), ref.cpu(), rtol=1e-5, atol=0)
    grads[2][1000] = float("nan")  # in the tail of an unaligned tensor
    assert F.grad_sumsq_and_flag(grads, backend="triton")[1] == 1


def test_chunk_table_marks_full_aligned_chunks_fast():
    from triton_kernels._multi_tensor import chunk_rows

    rows = chunk_rows([512, 300, 256, 3], [True, True, False, True], chunk=256)
    assert [tuple(rows[i:i + 4]) for i in range(0, len(rows), 4)] == [
        (0, 0, 256, 1), (0, 256, 512, 1),  # full chunks of an aligned tensor
        (1, 0, 256, 1), (1, 256, 300, 0),  # the tail is masked
        (2, 0, 256, 0),  # an unaligned tensor is masked throughout
        (3, 0, 3, 0),
    ]


def test_tables_are_built_once_per_storage(device):
    from triton_kernels import _multi_tensor

    cache = _multi_tensor.TableCache(maxsize=2)
    params, grads, states = make(torch.float32, device, ["exp_avg"], sizes=[1003, 5])
    roles = [params, grads, states["exp_avg"]]
    first = cache.get(roles, [0, 1], device)
    assert cache.get(roles, [0, 1], device) is first and cache.builds == 1
    fast = first[1].view(-1, 4)[:, 3].tolist()
    assert fast == [1, 1, 1, 0, 0]  # tensor 0: three full chunks and a tail; tensor 1: a tail
    states["exp_avg"][0] = at_offset(states["exp_avg"][0], 1)  # new storage, unaligned
    rebuilt = cache.get(roles, [0, 1], device)
    assert cache.builds == 2 and rebuilt[1].view(-1, 4)[:, 3].tolist() == [0, 0, 0, 0, 0]
    cache.get([params, grads, None], [0, 1], device)
    assert len(cache._tables) == 2  # bounded: the least recently used entry went
    assert cache.get(roles, [0, 1], device) is rebuilt and cache.builds == 3  # not the one used last


def test_compile_only_launches_nothing_but_sees_the_specialization(device):
    """compile_only=True (the warm-up before a run) compiles what the step would launch and
    changes no tensor."""
    from triton_kernels import _launch

    params, grads, states = make(torch.float32, device, ["exp_avg", "exp_avg_sq", "slow_buffer"])
    before = clone(params, grads, states)
    with _launch.recording() as calls:
        triton_kernels.radam_step(params, grads, states, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                  decoupled=False, rectified=True, step_size=0.1, lookahead_alpha=0.5, grad_scale=1.0,
                                  compile_only=True)
    assert len(calls) == 1 and calls[0][2]["SYNC"] and calls[0][2]["RECTIFIED"]
    for a, b in zip(params + grads + [t for v in states.values() for t in v],
                    before[0] + before[1] + [t for v in before[2].values() for t in v]):
        assert torch.equal(a, b)


def test_steady_state_launch_builds_no_table(device, monkeypatch):
    """A second step over the same storage reuses the cached tables: no torch.tensor(list), no
    host-to-device copy (the launch itself is stubbed: this counts host work only)."""
    from triton_kernels import _launch, _multi_tensor

    keys = ["exp_avg", "exp_avg_sq"]
    params, grads, states = make(torch.float32, device, keys)
    launches = []
    monkeypatch.setattr(_launch, "run", lambda kernel, grid, dev, *a, **k: launches.append(grid))
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, amsgrad=False,
              step_size=0.01, bias_correction2_sqrt=1.0, grad_scale=1.0)
    triton_kernels.adam_step(params, grads, states, **kw)
    builds = _multi_tensor.TABLES.builds

    def no_tables(*args, **kwargs):
        raise AssertionError("a steady-state step built a table")

    monkeypatch.setattr(torch, "tensor", no_tables)
    triton_kernels.adam_step(params, grads, states, **kw)
    assert _multi_tensor.TABLES.builds == builds and len(launches) == 2


ADAM_KW = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=True,
               step_size=0.013, bias_correction2_sqrt=0.3, grad_scale=0.7)
PER_STEP = ("lr", "step_size", "bias_correction2_sqrt", "grad_scale")  # the values a sync-free step keeps on the device


def _states_equal(a, b):
    for x, y in zip(a[0] + [t for v in a[2].values() for t in v], b[0] + [t for v in b[2].values() for t in v]):
        assert torch.equal(x, y)


def test_per_step_values_as_device_tensors_give_the_same_bits(device):
    keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    floats = make(torch.float32, device, keys)
    tensors = clone(*floats)
    triton_kernels.adam_step(*floats, **ADAM_KW)
    kw = {k: torch.tensor([v], dtype=torch.float32, device=device) if k in PER_STEP else v for k, v in ADAM_KW.items()}
    triton_kernels.adam_step(*tensors, **kw)
    _states_equal(floats, tensors)
    with pytest.raises(ValueError, match="one-element fp32 tensor"):
        triton_kernels.adam_step(*tensors, **dict(kw, lr=torch.tensor([0.1, 0.2], device=device)))


@pytest.mark.parametrize("family", ["adam", "ranger-sync", "lookahead"])
def test_a_set_skip_flag_changes_nothing(device, family):
    keys = FAMILIES[family][0]
    data = make(torch.bfloat16, device, keys)
    before = clone(*data)
    skip = torch.ones(1, dtype=torch.int32, device=device)
    if family == "adam":
        triton_kernels.adam_step(*data, **ADAM_KW, skip=skip)
    elif family == "ranger-sync":
        triton_kernels.radam_step(*data, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-5, weight_decay=0.1, decoupled=True,
                                  rectified=True, step_size=0.01, lookahead_alpha=0.5, grad_scale=1.0, skip=skip)
    else:
        triton_kernels.lookahead_sync(data[0], data[2]["slow_buffer"], alpha=0.5, skip=skip)
    _states_equal(data, before)


def test_a_clear_skip_flag_steps_as_without_one(device):
    keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    plain = make(torch.float32, device, keys)
    flagged = clone(*plain)
    triton_kernels.adam_step(*plain, **ADAM_KW)
    triton_kernels.adam_step(*flagged, **ADAM_KW, skip=torch.zeros(1, device=device))
    _states_equal(plain, flagged)


@pytest.mark.parametrize("change", ["dtype", "transposed", "size"])
def test_a_cached_launch_plan_is_not_reused_for_other_grads_at_the_same_addresses(device, change):
    """A launch's buckets and tables are cached under the tensors' addresses; grads are not ours, so
    a grad of another dtype, layout or size at a cached address must not run as the cached one
    (another dtype is rebuilt and updated right; a transposed view or a size mismatch is refused)."""
    n = 96
    buf = torch.randn(2 * n, device=device)
    p, m = torch.randn(n, device=device), torch.zeros(n, device=device)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True, grad_scale=1.0)
    square = change == "transposed"
    shaped = (lambda t: t.view(8, 12)) if square else (lambda t: t)
    F.sgd_step([shaped(p)], [shaped(buf[:n])], {"momentum_buffer": [shaped(m)]}, backend="triton", **kw)
    kw["first_step"] = False
    if change == "dtype":  # bf16 grads at the fp32 grads' address, same element count
        grad = buf.view(torch.bfloat16)[:n]
        grad.copy_(torch.randn(n))  # finite values at the same address
        ref = clone([p], [grad], {"momentum_buffer": [m]})
        F.sgd_step([p], [grad], {"momentum_buffer": [m]}, backend="triton", **kw)
        F.sgd_step(*ref, backend="torch", **kw)
        assert_match(([p], [grad], {"momentum_buffer": [m]}), ref)
    elif change == "transposed":
        with pytest.raises(ValueError, match="not contiguous"):
            F.sgd_step([p.view(8, 12)], [buf[:n].view(12, 8).t()], {"momentum_buffer": [m.view(8, 12)]},
                       backend="triton", **kw)
    else:
        with pytest.raises(ValueError, match="elements"):
            F.sgd_step([p], [buf[: n // 2]], {"momentum_buffer": [m]}, backend="triton", **kw)


def test_grads_checked_by_a_steps_statistics_serve_that_step_only_and_those_tensors_only(device, monkeypatch):
    """Within ``one_step`` an update plan over the very grad tensors the statistics plan checked
    takes their pointers from it (no second read); a list holding another tensor, or a later step
    (a grad object may get new storage between steps), reads its own."""
    from triton_kernels import _multi_tensor

    cache = _multi_tensor.TableCache()
    params = [torch.randn(n, device=device) for n in (5, 7)]
    grads = [torch.randn_like(p) for p in params]
    reads = []
    real_data_ptr = _multi_tensor._data_ptr
    monkeypatch.setattr(_multi_tensor, "_data_ptr", lambda t: reads.append(t) or real_data_ptr(t))

    def build(tag):
        return lambda: [tag]

    with cache.one_step():
        cache.plan([grads], 0, build("stats"))
        reads.clear()
        assert cache.plan([params, list(grads)], 1, build("update")) == ["update"]
        assert len(reads) == len(params)  # the params' pointers only
        other = [grads[0], torch.randn_like(params[1])]
        reads.clear()
        assert cache.plan([params, other], 1, build("other")) == ["other"]
        assert len(reads) == 2 * len(params)
    assert cache.plan([params, other], 1, build("miss")) == ["other"]  # keyed on other's own pointers
    grads[1].data = torch.randn_like(params[1])  # the same object, new storage
    with cache.one_step():
        assert cache.plan([params, grads], 1, build("new storage")) == ["new storage"]
