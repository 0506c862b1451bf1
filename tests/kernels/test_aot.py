"""The GPU machine code of every kernel specialization the optimizers launch, proven without a GPU.

The specializations are recorded, not written down: each optimizer in ``RUNS`` takes real
``step()`` calls with ``backend="triton"`` (the Triton interpreter on CPU, or CUDA), and
``triton_kernels._launch.recording()`` sees every launch; ``triton_kernels._aot`` turns them into
the specs Triton's JIT would compile for a CUDA launch, compiles each for sm_80 and sm_90
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``) and reads the result with
Triton's bundled ``ptxas -v`` and ``cuobjdump -sass``.

Fails on: any spill or local-memory access; a per-element address computed with 32-bit arithmetic
on a value that can be large (program index, parameter, loaded value); an update kernel without
128-bit global loads and stores (the sum-of-squares kernel reads only: 128-bit loads).

``RUNS`` sets every switch of every kernel at fp32 params, and runs each optimizer's default at
bf16 and fp16 params, and at bf16 params under ``bf16_update="stochastic"`` and ``"kahan"`` (every
update kernel's ROUNDING variants, host and device flow) and with fp32 slow weights
(``slow_dtype``); ``run_sync_free_launches`` adds the launchers' sync-free form (device
scalars, skip flags, per-tensor step and Lookahead counts, step_control), called directly. Specs are
deduplicated; nothing is cached between runs (a temporary Triton cache), two compile workers.
"""

from __future__ import annotations

import functools

import pytest
import torch

import triton_kernels

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(not triton_kernels.supports(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="records launches under the Triton interpreter or on CUDA")

LOW = (torch.bfloat16, torch.float16)
# (optimizer, keyword arguments, steps, param dtypes). Steps reach the switches that depend on the
# step: SGD's first step, RAdam's rectification (rho_t > 5 from step 6 at beta2=0.999), Lookahead's
# sync every k steps.
RUNS = [
    ("SGD", dict(lr=1), 1, (torch.float32, *LOW)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01), 2, (torch.float32, *LOW)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), 2, (torch.float32,)),
    ("Adagrad", dict(lr=0.1), 1, (torch.float32, *LOW)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1), 1, (torch.float32,)),
    ("RMSprop", dict(lr=0.01), 1, (torch.float32, *LOW)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01), 1, (torch.float32,)),
    ("RMSprop", dict(lr=0.01, alpha=0.3, centered=True), 1, (torch.float32,)),
    ("Adam", dict(lr=0.01), 1, (torch.float32, *LOW)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1), 1, (torch.float32,)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.9)), 1, (torch.float32,)),
    ("AdamW", dict(lr=0.01), 1, (torch.float32, *LOW)),
    ("AdamW", dict(lr=0.01, amsgrad=True), 1, (torch.float32,)),
    ("RAdam", dict(lr=0.01), 7, (torch.float32, *LOW)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), 7, (torch.float32,)),
    ("Ranger", dict(lr=0.01, k=2), 7, (torch.float32, *LOW)),
    ("Lookahead", dict(lr=0.01, k=2), 2, (torch.float32, *LOW)),
    ("LBFGS", dict(lr=1, max_iter=4, history_size=3, line_search_fn="strong_wolfe"), 2, (torch.float32,)),
    # bf16 params without fp32 masters: each family's param store under each bf16 update mode
    # (nearest too, with the same switches: the audit's baseline for the other two)
    *[(name, dict(kw, bf16_update=mode), steps, (torch.bfloat16,)) for mode in ("nearest", "stochastic", "kahan")
      for name, kw, steps in [("SGD", dict(lr=0.1, momentum=0.9), 2), ("Adagrad", dict(lr=0.1), 1),
                              ("RMSprop", dict(lr=0.01), 1), ("AdamW", dict(lr=0.01), 1), ("RAdam", dict(lr=0.01), 7),
                              ("Ranger", dict(lr=0.01, k=2), 7)]],
    ("Ranger", dict(lr=0.01, k=2, slow_dtype=torch.float32), 7, (torch.bfloat16,)),
    ("Lookahead", dict(lr=0.01, k=2, slow_dtype=torch.float32), 2, (torch.bfloat16,)),
]
SIZES = [(1,), (300,), (17, 31), (0,)]


def _optimizer(name, params, kw, max_grad_norm):
    import dist_optim

    if name == "Lookahead":
        kw = dict(kw)
        k, slow_dtype = kw.pop("k"), kw.pop("slow_dtype", None)
        return dist_optim.Lookahead(dist_optim.AdamW(params, backend="triton", max_grad_norm=max_grad_norm, **kw), k=k,
                                    slow_dtype=slow_dtype)
    if name == "LBFGS":
        return dist_optim.LBFGS(params, backend="triton", **kw)
    return getattr(dist_optim, name)(params, backend="triton", max_grad_norm=max_grad_norm, **kw)


def run_optimizers(device: torch.device) -> None:
    """Every run of RUNS, a few steps each on small tensors (clipping on: the sum-of-squares kernel)."""
    for name, kw, steps, dtypes in RUNS:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in SIZES]
            opt = _optimizer(name, params, kw, max_grad_norm=1.0)
            for _ in range(steps):
                if name == "LBFGS":
                    target = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in params]

                    def closure():
                        opt.zero_grad()
                        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, target))
                        loss.backward()
                        return loss

                    opt.step(closure)
                else:
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
                    opt.step()


def run_sync_free_launches(device: torch.device) -> None:
    """The launchers' sync-free form, called directly so that it is audited whatever the optimizers
    launch: per-step values as device tensors and views of a step_control tensor, a device skip
    flag, step-derived scalars from per-tensor step counts (steps=), Lookahead's sync per tensor
    (la_steps=), and step_control itself with every switch; at fp32 and bf16 params."""
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(300, generator=gen).to(device=device, dtype=dtype)]
        grads = [torch.randn(300, generator=gen).to(device=device, dtype=dtype)]
        states = {k: [torch.zeros(300, device=device)] for k in ("exp_avg", "exp_avg_sq", "sum", "slow_buffer")}
        one = torch.ones(1, device=device)
        skip = torch.zeros(1, dtype=torch.int32, device=device)
        steps = [torch.full((), 6.0, device=device)]
        control = torch.zeros(4, device=device)
        scale, skip_view = control[0:1], control[1:2]  # what a sync-free step passes: views, 4-byte offsets
        adam = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, amsgrad=False)
        triton_kernels.adam_step(params, grads, states, lr=one * 1e-3, **adam, step_size=one * 1e-3,
                                 bias_correction2_sqrt=one, grad_scale=one, skip=skip)
        triton_kernels.adam_step(params, grads, states, lr=1e-3, **adam, grad_scale=scale, skip=skip_view, steps=steps)
        triton_kernels.adagrad_step(params, grads, states, weight_decay=0.0, eps=1e-10, grad_scale=scale,
                                    skip=skip_view, steps=steps, lr=one * 0.1, lr_decay=0.01)
        radam = dict(beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.0, decoupled=False, grad_scale=scale,
                     skip=skip_view, steps=steps, rho_threshold=5.0)
        triton_kernels.radam_step(params, grads, states, lr=one * 1e-3, **radam, lookahead_alpha=None)
        triton_kernels.radam_step(params, grads, states, lr=1e-3, **radam, lookahead_alpha=0.5, la_steps=steps, k=2)
        triton_kernels.lookahead_sync(params, states["slow_buffer"], alpha=0.5, la_steps=steps, k=2, skip=skip_view)
    run_step_control(device)


def run_step_control(device: torch.device) -> None:
    control = torch.zeros(4, device=device)
    stats = torch.tensor([4.0, 0.0], device=device)
    counters = [torch.zeros((), device=device) for _ in range(3)]
    for max_grad_norm in (None, 1.0):
        for skip_nonfinite in (False, True):
            triton_kernels.step_control(control, stats=stats, grad_scale=1.0, max_grad_norm=max_grad_norm,
                                        skip_nonfinite=skip_nonfinite, counters=counters)
    triton_kernels.step_control(control, stats=stats, grad_scale=torch.ones(1, device=device), max_grad_norm=1.0,
                                skip_nonfinite=True, counters=counters)
    triton_kernels.step_control(control, grad_scale=1.0, counters=counters)


@functools.lru_cache(maxsize=1)
def recorded_specs() -> tuple:
    """The deduplicated compile specs of every launch RUNS makes, and of the sync-free launches."""
    from triton_kernels import _aot, _launch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _launch.recording() as calls:
        run_optimizers(device)
        run_sync_free_launches(device)
    return tuple(_aot.specs(calls))


@triton.jit
def _control_kernel(X, n, BLOCK: tl.constexpr):
    # What the checks must catch: int32 per-element offsets from the program index, and a masked
    # access with a runtime size (no 128-bit accesses).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) * 2.0, mask=offs < n)


CONTROL = {
    "kernel": f"{__name__}:_control_kernel",
    "signature": {"X": "*fp32", "n": "i32", "BLOCK": "constexpr"},
    "constexprs": [[[2], 1024]],
    "attrs": [[[0], [["tt.divisibility", 16]]]],
    "num_warps": 4,
    "num_stages": 3,
}


@functools.lru_cache(maxsize=1)
def audit_rows() -> tuple:
    """Rows for every recorded spec and arch, then the control's rows (one compile run)."""
    from triton_kernels import _aot

    return tuple(_aot.audit(list(recorded_specs()) + [CONTROL]))


def kernel_rows():
    return [r for r in audit_rows() if r["kernel"] != CONTROL["kernel"]]


def test_the_checks_catch_int32_offsets_and_narrow_accesses():
    controls = [r for r in audit_rows() if r["kernel"] == CONTROL["kernel"]]
    assert len(controls) == 2
    for r in controls:
        assert r["int32_addressing"], r
        assert r["ld128"] == 0 and r["st128"] == 0 and r["ld"] > 0 and r["st"] > 0, r


UPDATE_KERNELS = ("_sgd_kernel", "_adagrad_kernel", "_rmsprop_kernel", "_adam_kernel", "_radam_kernel", "_sync_kernel")


def test_every_kernel_family_is_recorded():
    kernels = {s["kernel"].split(":")[1] for s in recorded_specs()}
    assert kernels >= {*UPDATE_KERNELS, "_sumsq_kernel", "_sumsq_finish_kernel", "_step_control_kernel",
                       "_dots_kernel", "_combine_kernel"}
    names = {_describe(s) for s in recorded_specs()}
    for dtype in ("fp32", "bf16", "fp16"):  # each update kernel at each param dtype
        for kernel in UPDATE_KERNELS:
            assert any(n.startswith(f"{kernel}[{dtype}") for n in names), (kernel, dtype)


def test_the_device_step_variants_are_recorded():
    names = {_describe(s) for s in recorded_specs()}
    for dtype in ("fp32", "bf16"):
        for kernel, switch in [("_adam_kernel", "HAS_STEPS"), ("_adagrad_kernel", "HAS_STEPS"),
                               ("_radam_kernel", "RECTIFIED=2"), ("_radam_kernel", "SYNC=2"),
                               ("_sync_kernel", "HAS_LA_STEPS")]:
            assert any(n.startswith(f"{kernel}[{dtype}") and switch in n.split(",") for n in names), (kernel, switch)
    control = [s for s in recorded_specs() if s["kernel"].endswith(":_step_control_kernel")]
    assert len(control) >= 5 and not any(s["enable_fp_fusion"] for s in control)


def test_the_bf16_update_variants_are_recorded():
    """Each update kernel's stochastic (ROUNDING=1) and Kahan (ROUNDING=2) stores at bf16 params, the
    stochastic ones in both flows (SR_STEPS: the stream's step from the device counters); slow
    weights in bf16 (the default for bf16 params) and fp32."""
    names = {_describe(s) for s in recorded_specs()}
    for kernel in UPDATE_KERNELS[:-1]:  # _sync_kernel stores the slow value, to nearest
        for rounding in ("ROUNDING=1", "ROUNDING=2"):
            assert any(n.startswith(f"{kernel}[bf16") and rounding in n.split(",") for n in names), (kernel, rounding)
        assert any(n.startswith(f"{kernel}[bf16") and "SR_STEPS" in n.split(",") for n in names), kernel
    for kernel in ("_radam_kernel", "_sync_kernel"):
        for slow in ("SLOW_DTYPE=bf16", "SLOW_DTYPE=fp32"):
            # fp32 is the unnamed default: a bf16-param sync variant without SLOW_DTYPE=bf16
            found = [n for n in names if n.startswith(f"{kernel}[bf16") and ("SYNC" in n or kernel == "_sync_kernel")]
            if slow.endswith("bf16"):
                assert any(slow in n.split(",") for n in found), (kernel, slow)
            else:
                assert any("SLOW_DTYPE=bf16" not in n.split(",") for n in found), (kernel, slow)


def _describe(spec):
    from triton_kernels import _aot

    return _aot.describe(spec)


def test_no_spills_and_no_local_memory():
    bad = [(r["name"], r["arch"], r["spill_stores"], r["spill_loads"], r["stack"], r["local"]) for r in kernel_rows()
           if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["local"]]
    assert not bad


def test_addresses_are_int64():
    bad = [(r["name"], r["arch"], r["int32_addressing"][:3]) for r in kernel_rows() if r["int32_addressing"]]
    assert not bad


def test_update_kernels_use_128_bit_loads_and_stores():
    for r in kernel_rows():
        kernel = r["kernel"].split(":")[1]
        if kernel in UPDATE_KERNELS:
            assert r["ld128"] > 0 and r["st128"] > 0, r
        elif kernel == "_sumsq_kernel":
            assert r["ld128"] > 0, r


def test_every_spec_compiles_for_both_archs():
    rows = kernel_rows()
    assert len(rows) == 2 * len(recorded_specs())
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}


def test_python_int_hyperparameters_compile_no_other_specialization():
    """SGD(lr=1) and SGD(lr=0.5) launch the same specialization (hyperparameters go in as fp32)."""
    import dist_optim
    from triton_kernels import _aot, _launch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seen = []
    for lr in (1, 0.5):
        p = torch.randn(5, device=device, requires_grad=True)
        p.grad = torch.randn(5, device=device)
        with _launch.recording() as calls:
            dist_optim.SGD([p], lr=lr, backend="triton", nonfinite="apply").step()
        seen.append(_aot.specs(calls))
    # The device flow launches step_control and then the update: the same specializations either way.
    assert any(s["kernel"].endswith(":_sgd_kernel") for s in seen[0]) and seen[0] == seen[1]
