"""The fused CPU backend (``cpu_kernels``) against the torch path (dist_optim.functional with
backend="torch", the specification): every family and switch, fp32/bf16/fp16 params (and fp32 grads
for low-precision params), odd sizes crossing the kernel's 1K block and 32K chunk, an empty tensor,
non-contiguous and offset views; the grad statistics; thread-count invariance; and every optimizer
class with backend="auto" (which is this backend on CPU) against backend="torch".

Tolerances and why. The kernel evaluates the torch path's expressions in its order with its
roundings (fused multiply-adds exactly where torch's CPU add-with-alpha, lerp and addcmul fuse), so
most elements agree bit for bit; the exception is sqrt: torch's CPU sqrt (MKL's vsSqrt) is not
correctly rounded, ours is, one ulp apart on ~1 in 6 elements. Hence fp32 params and state: rtol
2e-6 / atol 1e-6 (an ulp or two, amplified where p + update cancels, which atol covers); bf16/fp16
params: one ulp of the param dtype, compared one step at a time from identical inputs because a
one-ulp param difference feeds the next step. Centered RMSprop's sqrt(v - m^2) cancels: state rtol
2e-5 there. The sum of squares: rtol 1e-5 (fp64 chunk partials here, torch's fp32 norms there).
"""

from __future__ import annotations

import shutil

import pytest
import torch

import cpu_kernels
import dist_optim
import dist_optim.functional as F
from dist_optim.functional._common import fused_kernels, resolve_backend
from dist_optim.state import rounding as R
from tests.kernels import _against_torch as shared
from tests.kernels._against_torch import ADAM_CASES, ADAM_IDS, RMSPROP_CASES, RMSPROP_IDS, assert_match, clone
from tests.optim._factories import CONFIGS
from tests.optim._setup import make_params, run

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler to build cpu_kernels"
)

# 70001 spans two 32K chunks and a ragged 1K block; 0 is an empty shard.
SIZES = [1, 7, 1003, 0, 601, 70001]
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["fp32", "bf16", "fp16", "bf16-fp32grad"]


def make(dtype, state_keys, *, sizes=SIZES, **kw):
    return shared.make(dtype, "cpu", state_keys, sizes=sizes, **kw)


def compare(step_fn, dtype, state_keys, **kw):
    shared.compare(step_fn, dtype, "cpu", state_keys, backend="cpu", sizes=SIZES, **kw)


dtypes = pytest.mark.parametrize("dtype,grad_dtype", DTYPES, ids=DTYPE_IDS)


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    p = [torch.zeros(3)]
    assert resolve_backend("auto", p) == "cpu"
    assert fused_kernels("auto", p, p) is cpu_kernels
    assert fused_kernels("torch", p, p) is None
    # fp64 is the torch path's: 'auto' falls back, an explicit 'cpu' says why it cannot
    p64 = [torch.zeros(3, dtype=torch.float64)]
    assert fused_kernels("auto", p64, p64) is None
    with pytest.raises(ValueError, match="backend='cpu' takes"):
        F.sgd_step(p64, p64, {}, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   first_step=True, backend="cpu")


@dtypes
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, grad_scale=1.0),
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, grad_scale=0.5),
        dict(lr=0.05, momentum=0.8, dampening=0.0, weight_decay=0.1, nesterov=True, grad_scale=-1.0),  # maximize
    ],
    ids=["plain", "momentum-dampening-wd", "nesterov-maximize"],
)
def test_sgd(dtype, grad_dtype, kw):
    keys = ["momentum_buffer"] if kw["momentum"] else []

    def step(p, g, s, *, t, backend):
        F.sgd_step(p, g, s, first_step=t == 1, backend=backend, **kw)

    compare(step, dtype, keys, grad_dtype=grad_dtype)


@dtypes
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
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
        F.rmsprop_step(p, g, s, lr=0.01, eps=1e-8, grad_scale=0.8, backend=backend, **kw)

    data = make(dtype, keys, grad_dtype=grad_dtype)
    for t in data[2].get("grad_avg", []):  # keep square_avg >= grad_avg^2: a real centered average
        t.zero_()
    compare(step, dtype, keys, data=data, state_rtol=2e-5 if kw["centered"] else 2e-6)


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
    keys = ["exp_avg", "exp_avg_sq"] + (["slow_buffer"] if sync is not None else [])

    def step(p, g, s, *, t, backend):
        F.radam_step(p, g, s, lr=0.01, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.05, decoupled=decoupled,
                     rho_threshold=5.0, step=first_step + t - 1, lookahead_alpha=sync, grad_scale=1.3, backend=backend)

    assert (F.radam_rho(0.999, 1) > 5.0) is False and F.radam_rho(0.999, 12) > 5.0
    compare(step, dtype, keys, grad_dtype=grad_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_lookahead_sync(dtype):
    def step(p, g, s, *, t, backend):
        F.lookahead_sync(p, s["slow_buffer"], alpha=0.3, backend=backend)

    compare(step, dtype, ["slow_buffer"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_non_contiguous_and_offset_views(dtype):
    """A transposed param (its grad and state laid out alike) and slices of one flat buffer at odd
    offsets, as ZeRO's flat partitions are: results land in the views themselves."""

    def build(seed):
        gen = torch.Generator().manual_seed(seed)
        flat_p = torch.randn(5000, generator=gen).to(dtype)
        flat_g = torch.randn(5000, generator=gen).to(dtype)
        flat_m, flat_v = torch.randn(5000, generator=gen), torch.rand(5000, generator=gen)
        base = [torch.randn(37, 23, generator=gen).to(dtype) for _ in range(2)] + [torch.randn(37, 23, generator=gen),
                                                                                 torch.rand(37, 23, generator=gen)]
        views = [t.t() for t in base]  # non-contiguous
        params = [flat_p[3:1003], flat_p[1003:4999], views[0]]
        grads = [flat_g[3:1003], flat_g[1003:4999], views[1]]
        states = {"exp_avg": [flat_m[1:1001], flat_m[1001:4997], views[2]],
                  "exp_avg_sq": [flat_v[1:1001], flat_v[1001:4997], views[3]]}
        return (params, grads, states), (flat_p, flat_m, flat_v)

    (ours, flats_ours), (ref, flats_ref) = build(0), build(0)
    assert not ours[0][2].is_contiguous() and ours[0][0].storage_offset() == 3
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False, step=1, grad_scale=0.5)
    F.adam_step(*ours, backend="cpu", **kw)
    F.adam_step(*ref, backend="torch", **kw)
    assert_match(ours, ref)
    for a, b in zip(flats_ours, flats_ref):  # untouched elements of the flat buffers stay untouched
        assert torch.equal(a[:3], b[:3]) and torch.equal(a[-1:], b[-1:])


def test_one_call_per_dtype_bucket(monkeypatch):
    from cpu_kernels import _build

    calls = []
    lib = _build.library()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            return lambda *a: calls.append(name) or fn(*a)

    monkeypatch.setattr("cpu_kernels.launch.library", lambda: Spy())
    params = [torch.randn(n, dtype=d) for n, d in [(5, torch.float32), (9, torch.bfloat16), (3, torch.float32), (0, torch.float16)]]
    grads = [torch.randn_like(p) for p in params]
    states = {"exp_avg": [torch.zeros(p.numel()) for p in params], "exp_avg_sq": [torch.zeros(p.numel()) for p in params]}
    ref = clone(params, grads, states)
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, amsgrad=False, step=1)
    F.adam_step(params, grads, states, backend="cpu", **kw)
    F.adam_step(*ref, backend="torch", **kw)
    assert calls == ["dist_optim_step", "dist_optim_step"]  # fp32 and bf16; the empty fp16 one needs none
    assert_match((params, grads, states), ref)


def test_tables_are_built_once_per_set_of_storages():
    """A steady-state step reuses its pointer tables; a tensor moved to new storage (``p.data = ...``),
    resized in place or given another dtype gets fresh ones, so the kernel never writes a stale
    address or size."""
    from cpu_kernels.launch import TABLES

    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False)

    def both(data, ref, step):
        F.adam_step(*data, step=step, backend="cpu", **kw)
        F.adam_step(*ref, step=step, backend="torch", **kw)
        assert_match(data, ref)

    data = make(torch.float32, ["exp_avg", "exp_avg_sq"], sizes=[5, 40000, 3])
    ref = clone(*data)
    both(data, ref, 1)
    builds = TABLES.builds
    both(data, ref, 2)
    assert F.grad_sumsq_and_flag(data[1], backend="cpu")[1] == 0
    built_sumsq = TABLES.builds
    assert built_sumsq <= builds + 1  # the sum of squares: one table for these grads
    both(data, ref, 3)
    F.grad_sumsq_and_flag(data[1], backend="cpu")
    assert TABLES.builds == built_sumsq  # nothing rebuilt at steady state

    for tensors in (data, ref):  # new storage for param 1 (same values), as a wrapper swapping .data does
        tensors[0][1].data = tensors[0][1].detach().clone()
    both(data, ref, 4)
    assert TABLES.builds == built_sumsq + 1
    for tensors in (data, ref):  # same storage, fewer elements: the sizes are part of the key too
        for role in [tensors[0], tensors[1], *tensors[2].values()]:
            role[1].data = role[1].data[:1000]
    both(data, ref, 5)
    assert TABLES.builds == built_sumsq + 2
    grads = data[1]
    expected = F.grad_sumsq_and_flag(grads, backend="torch")
    torch.testing.assert_close(F.grad_sumsq_and_flag(grads, backend="cpu"), expected, rtol=1e-5, atol=0)
    grads[0].data = grads[0].data.bfloat16()  # another dtype moves the tensor to another bucket
    torch.testing.assert_close(F.grad_sumsq_and_flag(grads, backend="cpu"),
                               F.grad_sumsq_and_flag(grads, backend="torch"), rtol=1e-5, atol=0)


def test_mismatched_sizes_are_refused_before_any_table_is_kept():
    params = [torch.zeros(4), torch.zeros(3)]
    grads = [torch.ones(4), torch.ones(2)]
    for _ in range(2):  # the second call must not find a table the first one left
        with pytest.raises(ValueError, match="must match"):
            F.sgd_step(params, grads, {}, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                       first_step=True, backend="cpu")
    assert torch.equal(params[0], torch.zeros(4))


def test_written_tensors_bump_their_version_as_in_place_ops_do():
    """Autograd's check that a saved tensor was not modified in place must keep working."""
    params, grads, states = make(torch.float32, ["exp_avg", "exp_avg_sq"], sizes=[5, 3])
    before = [t._version for t in params + states["exp_avg"] + states["exp_avg_sq"]]
    F.adam_step(params, grads, states, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                amsgrad=False, step=1, backend="cpu")
    after = [t._version for t in params + states["exp_avg"] + states["exp_avg_sq"]]
    assert all(a > b for a, b in zip(after, before))
    w = torch.randn(4, requires_grad=True)
    loss = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        F.sgd_step([w], [torch.ones(4)], {}, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   first_step=True, backend="cpu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_threads_follow_torch_and_do_not_change_results():
    """The kernels use torch.get_num_threads() threads over fixed chunks: any count, same bits."""
    data = make(torch.float32, ["exp_avg", "exp_avg_sq"], sizes=[100003, 5, 40000])
    other = clone(*data)
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False, step=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        F.adam_step(*data, backend="cpu", **kw)
        one = F.grad_sumsq_and_flag(data[1], backend="cpu")
        torch.set_num_threads(max(2, before))
        F.adam_step(*other, backend="cpu", **kw)
        many = F.grad_sumsq_and_flag(other[1], backend="cpu")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(data[0] + data[2]["exp_avg"], other[0] + other[2]["exp_avg"]):
        assert torch.equal(a, b)
    assert torch.equal(one, many)


THREAD_CASES = [
    # (environment, torch's threads, cores in the affinity, CPUs the ranks divide, threads the kernels run)
    ({}, 16, 16, 16, 16),  # one rank on the host: torch's count
    ({"LOCAL_SIZE": "4"}, 16, 16, 16, 4),  # DeepSpeed's launcher, no binding: each rank its quarter
    ({"LOCAL_WORLD_SIZE": "8"}, 64, 32, 32, 4),  # the share of the affinity, not of torch's count
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 8, 8, 64, 8),  # pinned to 8 cores each: its own 8
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 32, 32, 64, 8),  # bound to a socket of 2: 4 ranks share 32
    ({"MPI_LOCALNRANKS": "8"}, 4, 4, 2, 1),  # fewer cores than ranks: one thread, never none
    ({"LOCAL_SIZE": "4"}, 2, 16, 16, 2),  # torch's count below the share stays
    ({"LOCAL_SIZE": "4", "OMP_NUM_THREADS": "8"}, 8, 16, 16, 8),  # a launcher that chose: as torch has it
    ({"LOCAL_WORLD_SIZE": "2(x3)"}, 16, 16, 16, 16),  # unreadable: no cap
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "0"}, 16, 16, 16, 4),  # a task srun started
    ({"SLURM_STEP_TASKS_PER_NODE": "4"}, 16, 16, 16, 16),  # not a task of the step: a lone process
    ({"SLURM_NTASKS_PER_NODE": "8"}, 16, 16, 16, 16),  # the allocation's, in every shell of the job
]


@pytest.mark.parametrize("env,torch_threads,cores,host,expected", THREAD_CASES)
def test_threads_never_exceed_this_ranks_share_of_the_host(monkeypatch, env, torch_threads, cores, host, expected):
    from cpu_kernels import _threads

    for name in _threads.LOCAL_RANKS_ENV + ("OMP_NUM_THREADS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_LOCALID",
                                            "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_threads.torch, "get_num_threads", lambda: torch_threads)
    monkeypatch.setattr(_threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(_threads, "host_cpus", lambda: host)
    assert _threads.kernel_threads() == expected


def test_cpuset_lists_are_counted():
    from cpu_kernels._threads import _count_cpus, host_cpus

    assert [_count_cpus(s) for s in ("0", "0-3", "0-3,8,10-11\n")] == [1, 4, 7]
    assert host_cpus() >= 1


def test_every_kernel_call_runs_the_capped_thread_count(monkeypatch):
    """The update and the grad statistics both pass kernel_threads() to the library."""
    from cpu_kernels import _build, launch

    real = _build.library()
    seen = []

    class Recording:
        def __getattr__(self, name):
            fn = getattr(real, name)

            def call(*args):
                seen.append((name, args[-1]))
                return fn(*args)

            return call

    monkeypatch.setattr(launch, "library", lambda: Recording())
    monkeypatch.setattr(launch, "kernel_threads", lambda: 1)
    params = [torch.zeros(100, requires_grad=True)]
    params[0].grad = torch.ones(100)
    dist_optim.AdamW(params, lr=0.1, backend="cpu", max_grad_norm=1.0).step()
    assert {name for name, _ in seen} == {"dist_optim_step", "dist_optim_sumsq"}
    assert all(threads == 1 for _, threads in seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_sumsq_matches_torch(dtype):
    _, grads, _ = make(dtype, [])
    ours = F.grad_sumsq_and_flag(grads, backend="cpu")
    ref = F.grad_sumsq_and_flag(grads, backend="torch")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert ours.dtype == torch.float32 and ours[1] == 0
    assert torch.equal(ours, F.grad_sumsq_and_flag(grads, backend="cpu"))  # bitwise reproducible


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 500, 70000])
def test_sumsq_flags_nonfinite(bad, where):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, generator=gen), torch.randn(70001, generator=gen).bfloat16(), torch.zeros(0)]
    grads[1][where] = bad
    assert F.grad_sumsq_and_flag(grads, backend="cpu")[1] == 1


def test_sumsq_overflow_is_flagged_like_the_torch_path():
    grads = [torch.full((4,), 3e38)]
    ours, ref = F.grad_sumsq_and_flag(grads, backend="cpu"), F.grad_sumsq_and_flag(grads, backend="torch")
    assert ours[1] == 1 and ref[1] == 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_optimizer_auto_on_cpu_equals_torch_backend(name, dtype):
    """Each class with backend="auto" (the CPU kernels) over 10 steps against backend="torch", clipping
    on (the fused sum of squares sets the scale), awkward params (size 1, odd, empty, grad None on some
    steps, frozen). fp32: rtol 1e-5 / atol 1e-6, per-step ulps carried through 10 steps and the clip
    coefficient. bf16: 10 steps of one-ulp rounding differences can compound, so two bf16 ulps."""
    p_cpu, p_ref = make_params(dtype), make_params(dtype)
    ours = CONFIGS[name](p_cpu, backend="auto", max_grad_norm=2.0)
    ref = CONFIGS[name](p_ref, backend="torch", max_grad_norm=2.0)
    run(ours, p_cpu, 0, 10, scale=3.0)
    run(ref, p_ref, 0, 10, scale=3.0)
    assert ours.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 * 2**-7, atol=1e-3)
    for a, b in zip(p_cpu, p_ref):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(p_cpu, p_ref):
        for key, value in ours.state.get(a, {}).items():
            torch.testing.assert_close(value, ref.state[b][key], msg=key, **tol)


@pytest.mark.parametrize("maximize", [False, True])
def test_nonfinite_skip_on_cpu_backend_changes_nothing(maximize):
    params = make_params()
    opt = dist_optim_adamw(params, maximize)
    run(opt, params, 0, 2)
    before = [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]].items()}
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn(p.shape)
    params[2].grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(params, before[0]):
        assert torch.equal(a, b)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, before[1][k])


def dist_optim_adamw(params, maximize):
    return dist_optim.AdamW(params, lr=0.01, maximize=maximize, max_grad_norm=1.0, backend="cpu")


# --- the bf16 write modes and slow-weight dtypes (dist_optim.state.rounding's contract) -------------
#
# Exactness is tested on the write itself: the kernels' fp32 result x of a bf16 param is what the
# same kernels compute for an fp32 copy of that param (bf16 -> fp32 widening is exact, the math
# identical), so the bf16 param must be, bit for bit, stochastic_round_bf16(x, step_stream(base, t),
# index) or kahan_add_bf16(p_old, comp, x - p_old). SGD's fp32 math equals the torch path's bit for
# bit, so there the whole step is compared with the torch path too.


BF16_SIZES = [1, 7, 1003, 0, 70001]


def rounding_cases():
    """(family name, state keys, step(params, grads, states, t, **rounding kwargs) on the CPU kernels)."""
    def sgd(p, g, s, t, **kw):
        F.sgd_step(p, g, s, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True, first_step=t == 1,
                   grad_scale=0.5, step=t, backend="cpu", **kw)

    def adagrad(p, g, s, t, **kw):
        F.adagrad_step(p, g, s, lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, step=t, grad_scale=0.37,
                       backend="cpu", **kw)

    def rmsprop(p, g, s, t, **kw):
        F.rmsprop_step(p, g, s, lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.01, momentum=0.5, centered=False,
                       grad_scale=0.8, step=t, backend="cpu", **kw)

    def adam(p, g, s, t, **kw):
        F.adam_step(p, g, s, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True,
                    amsgrad=True, step=t, grad_scale=-0.5, backend="cpu", **kw)

    def radam(p, g, s, t, **kw):
        F.radam_step(p, g, s, lr=0.01, beta1=0.95, beta2=0.9, eps=1e-5, weight_decay=0.05, decoupled=False,
                     rho_threshold=5.0, step=t, grad_scale=1.3, backend="cpu", **kw)

    return [("sgd", ["momentum_buffer"], sgd), ("adagrad", ["sum"], adagrad),
            ("rmsprop", ["square_avg", "momentum_buffer"], rmsprop),
            ("adam", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], adam), ("radam", ["exp_avg", "exp_avg_sq"], radam)]


ROUNDING_CASES = {name: (keys, fn) for name, keys, fn in rounding_cases()}


def fp32_copy(data):
    params, grads, states = clone(*data)
    return [p.float() for p in params], grads, states


@pytest.mark.parametrize("family", sorted(ROUNDING_CASES))
@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_bf16_write_modes_are_the_reference_roundings_of_the_kernels_fp32_results(family, mode):
    keys, step = ROUNDING_CASES[family]
    data = make(torch.bfloat16, keys, sizes=BF16_SIZES)
    bases = [R.param_base(1234, i, 0) for i in range(len(BF16_SIZES))]
    seeds = [torch.tensor(b, dtype=torch.int64) for b in bases]
    comps = [torch.randn(n).bfloat16() * 2**-9 for n in BF16_SIZES]  # a residual below half a bf16 ulp of ~1
    if mode == "kahan":
        data[2]["kahan_comp"] = comps
    for t in (1, 6):  # RAdam at beta2 0.9: the momentum step at t = 1, rectified at 6
        wide = fp32_copy(data)
        step(*wide, t)  # the kernels' fp32 results, rounded nowhere
        old_params, old_comps = [p.clone() for p in data[0]], [c.clone() for c in comps]
        kw = dict(bf16_update=mode) | (dict(sr_seeds=seeds) if mode == "stochastic" else {})
        step(*data, t, **kw)
        for i, (p, x, old) in enumerate(zip(data[0], wide[0], old_params)):
            if mode == "stochastic":
                want = R.stochastic_round_bf16(x, R.step_stream(bases[i], t), R.element_indices(x))
            else:
                want, want_comp = R.kahan_add_bf16(old, old_comps[i], x - old.float())
                assert torch.equal(comps[i].view(torch.int16), want_comp.view(torch.int16)), i
            assert torch.equal(p.view(torch.int16), want.view(torch.int16)), (i, t)
        for key in keys:  # the moments do not depend on how the params are written
            for a, b in zip(data[2][key], wide[2][key]):
                assert torch.equal(a, b), key


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_sgd_bf16_write_modes_equal_the_torch_path_bit_for_bit(mode):
    """SGD's fp32 math is the torch path's bit for bit, so the whole step must be too, and an fp32 and
    an fp16 param in the same call keep their own writes (the modes are for bf16 params only)."""
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    gen = torch.Generator().manual_seed(3)
    sizes = [1003, 64, 77, 70001]
    params = [torch.randn(n, generator=gen).to(d) for n, d in zip(sizes, dtypes)]
    grads = [torch.randn(n, generator=gen).to(d) for n, d in zip(sizes, dtypes)]
    states = {"momentum_buffer": [torch.randn(n, generator=gen) for n in sizes]}
    if mode == "kahan":
        states["kahan_comp"] = [torch.zeros(n, dtype=torch.bfloat16) for n in sizes]
    ours, ref = clone(params, grads, states), clone(params, grads, states)
    seeds = [torch.tensor(R.param_base(7, i), dtype=torch.int64) for i in range(len(sizes))]
    for t in (1, 2, 3):
        for data, backend in ((ours, "cpu"), (ref, "torch")):
            F.sgd_step(*data, lr=0.001, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                       first_step=t == 1, step=t, bf16_update=mode, sr_seeds=seeds, backend=backend)
        for a, b in zip(ours[0], ref[0]):
            assert torch.equal(a, b)
        for key in ours[2]:
            for a, b in zip(ours[2][key], ref[2][key]):
                assert torch.equal(a, b), key


def test_bf16_update_modes_are_checked_by_the_launchers():
    params, grads, states = make(torch.bfloat16, ["momentum_buffer"], sizes=[5])
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True, grad_scale=1.0)
    with pytest.raises(ValueError, match="bf16_update: 'up'"):
        cpu_kernels.sgd_step(params, grads, states, **kw, bf16_update="up")
    with pytest.raises(ValueError, match="needs sr_seeds"):
        cpu_kernels.sgd_step(params, grads, states, **kw, bf16_update="stochastic", sr_step=1)
    with pytest.raises(ValueError, match="kahan_comp"):
        cpu_kernels.sgd_step(params, grads, states, **kw, bf16_update="kahan")
    assert cpu_kernels.ROUNDING_MODES == ("nearest", "stochastic", "kahan")


SLOW = [torch.float32, torch.bfloat16, torch.float16]
SLOW_IDS = ["slow-fp32", "slow-bf16", "slow-fp16"]


@pytest.mark.parametrize("slow_dtype", SLOW, ids=SLOW_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_lookahead_sync_with_slow_weights_in_any_dtype_equals_the_torch_path(dtype, slow_dtype):
    """slow = slow + alpha (fast - slow) in fp32, stored in the slow dtype (nearest), the params take the
    stored value: no sqrt, so bit for bit."""
    data = make(dtype, ["slow_buffer"])
    data[2]["slow_buffer"] = [s.to(slow_dtype) for s in data[2]["slow_buffer"]]
    ref = clone(*data)
    assert fused_kernels("cpu", data[0], None, data[2]) is cpu_kernels
    for t in (1, 2):
        F.lookahead_sync(data[0], data[2]["slow_buffer"], alpha=0.3, backend="cpu")
        F.lookahead_sync(ref[0], ref[2]["slow_buffer"], alpha=0.3, backend="torch")
        for a, b in zip(data[0] + data[2]["slow_buffer"], ref[0] + ref[2]["slow_buffer"]):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("slow_dtype", SLOW, ids=SLOW_IDS)
@pytest.mark.parametrize("mode", ["nearest", "stochastic", "kahan"])
def test_ranger_sync_writes_the_stored_slow_weights_whatever_the_mode(slow_dtype, mode):
    """Ranger's fused sync step with bf16 params: the slow weights (in their dtype) are the reference's
    pull of the kernels' fp32 RAdam result, the params take them to nearest under every mode, and the
    Kahan buffer stays as it is."""
    data = make(torch.bfloat16, ["exp_avg", "exp_avg_sq", "slow_buffer"], sizes=BF16_SIZES)
    data[2]["slow_buffer"] = [s.to(slow_dtype) for s in data[2]["slow_buffer"]]
    comps = [torch.full((n,), 2**-10, dtype=torch.bfloat16) for n in BF16_SIZES]
    if mode == "kahan":
        data[2]["kahan_comp"] = comps
    seeds = [torch.tensor(R.param_base(5, i), dtype=torch.int64) for i in range(len(BF16_SIZES))]
    hyper = dict(lr=0.01, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.0, decoupled=False, rho_threshold=5.0,
                 step=12, grad_scale=1.0)
    wide = fp32_copy(data)
    wide[2].pop("slow_buffer")
    F.radam_step(*wide, **hyper, backend="cpu")  # the fp32 result before the pull
    slows_before = [s.clone() for s in data[2]["slow_buffer"]]
    kw = dict(bf16_update=mode) | (dict(sr_seeds=seeds) if mode == "stochastic" else {})
    F.radam_step(*data, **hyper, lookahead_alpha=0.5, backend="cpu", **kw)
    for p, x, slow, before in zip(data[0], wide[0], data[2]["slow_buffer"], slows_before):
        # the torch path's pull (add with alpha; alpha 0.5 scales exactly, so fused or not, the same bits)
        want = before.float().add(x - before.float(), alpha=0.5).to(slow_dtype)
        assert slow.dtype == slow_dtype and torch.equal(slow, want)
        assert torch.equal(p, slow.float().bfloat16())  # the params take the stored slow weights, to nearest
    for c in comps:
        assert bool((c == 2**-10).all())


BF16_CLASSES = {
    "SGD": lambda ps, **kw: dist_optim.SGD(ps, lr=0.01, momentum=0.9, **kw),
    "Adagrad": lambda ps, **kw: dist_optim.Adagrad(ps, lr=0.05, **kw),
    "RMSprop": lambda ps, **kw: dist_optim.RMSprop(ps, lr=0.001, momentum=0.5, centered=True, **kw),
    "AdamW": lambda ps, **kw: dist_optim.AdamW(ps, lr=0.01, **kw),
    "RAdam": lambda ps, **kw: dist_optim.RAdam(ps, lr=0.01, betas=(0.9, 0.9), **kw),
    "Ranger": lambda ps, **kw: dist_optim.Ranger(ps, lr=0.01, betas=(0.9, 0.9), k=2, **kw),
}


@pytest.mark.parametrize("name", sorted(BF16_CLASSES))
@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_optimizers_bf16_update_on_the_cpu_kernels(name, mode, monkeypatch):
    """The classes with bf16 params and a bf16 update mode run on the CPU kernels (the torch path's
    write-back is never called) and agree with backend="torch": SGD bit for bit (its fp32 math is the
    torch path's), the others within the suite's two bf16 ulps (an ulp of the fp32 sqrt can move a
    stochastic or Kahan write by one bf16 ulp, and it feeds the next steps)."""
    import dist_optim.functional._common as common

    writes = []
    real = common.write_back
    for module in ("sgd", "adagrad", "rmsprop", "adam", "radam"):  # each imported write_back by name
        monkeypatch.setattr(f"dist_optim.functional.{module}.write_back",
                            lambda *a, **k: writes.append(1) or real(*a, **k))
    p_cpu, p_ref = make_params(torch.bfloat16), make_params(torch.bfloat16)
    ours = BF16_CLASSES[name](p_cpu, backend="cpu", bf16_update=mode, rounding_seed=11)
    ref = BF16_CLASSES[name](p_ref, backend="torch", bf16_update=mode, rounding_seed=11)
    run(ours, p_cpu, 0, 5)
    assert not writes
    run(ref, p_ref, 0, 5)
    assert writes
    for a, b in zip(p_cpu, p_ref):
        if name == "SGD":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2 * 2**-7, atol=1e-3)
        for key, value in ours.state.get(a, {}).items():
            if name == "SGD":
                assert torch.equal(value, ref.state[b][key]), key
            else:
                torch.testing.assert_close(value, ref.state[b][key], rtol=2 * 2**-7, atol=1e-3, msg=key)
