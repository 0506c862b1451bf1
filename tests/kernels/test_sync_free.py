"""The Triton backend's steady-state step never waits for the device, and its device flow (counters,
clip scale, skip flag and Lookahead's sync decided on the device) gives what the host flow gives.

Host work is counted with the launches stubbed (``dist_optim.host_work``): a steady-state step
reads no tensor value on the host, builds no launch table and no tensor from a Python list.
Numerics run the kernels under the Triton interpreter against the torch backend.
"""

from __future__ import annotations


import pytest
import torch

import dist_optim
import triton_kernels
from tests.optim._factories import CONFIGS, assert_identical, snapshot
from tests.optim._setup import SHAPES, make_params, run, set_grads, steady_state_host_work

pytestmark = pytest.mark.skipif(not triton_kernels.supports(torch.device("cpu")), reason="needs the Triton interpreter")


def _launch_key(kernel, args, kwargs) -> tuple:
    """What Triton compiles a specialization for: the kernel, each argument's kind (a tensor's dtype,
    a pointer-or-float scalar) and the constexprs."""
    kinds = tuple(str(a.dtype) if hasattr(a, "dtype") else type(a).__name__ for a in args)
    return (getattr(kernel, "__name__", str(kernel)), kinds, tuple(sorted((k, str(v)) for k, v in kwargs.items())))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_steady_state_step_reads_nothing_on_the_host_and_builds_no_table(name):
    params = make_params(torch.bfloat16)
    opt = CONFIGS[name](params, backend="triton", max_grad_norm=1.0)
    counts, launches, builds = steady_state_host_work(opt, params)
    assert builds == 0
    assert not counts, f"host reads or tables built from lists in a steady-state step: {dict(counts)}"
    # Per step: the grads' statistics (partials and their sum), the control launch, one update per
    # param group (2 here, one dtype), and Lookahead's sync pass; Ranger adds a sync-only pass on
    # the steps where a member has no grad.
    per_step = sum(launches.values()) / 3
    assert per_step <= 7, dict(launches)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_device_flow_skip_changes_nothing_and_matches_the_torch_backend(name):
    """A non-finite gradient at step 4 is skipped on the device: params, state and the step counters
    keep their bits, the skip is counted, and the run goes on as the torch backend's run does."""
    p_tri, p_ref = make_params(), make_params()
    tri = CONFIGS[name](p_tri, backend="triton", max_grad_norm=2.0)
    ref = CONFIGS[name](p_ref, backend="torch", max_grad_norm=2.0)
    for opt, params in ((tri, p_tri), (ref, p_ref)):
        run(opt, params, 0, 4, scale=3.0)
    before = snapshot(tri, p_tri)
    for opt, params in ((tri, p_tri), (ref, p_ref)):
        set_grads(params, 4)
        params[2].grad[0, 1] = float("nan")
        opt.step()
    assert_identical(before, snapshot(tri, p_tri))
    assert tri.skipped_steps == ref.skipped_steps == 1
    for opt, params in ((tri, p_tri), (ref, p_ref)):
        run(opt, params, 5, 9, scale=3.0)
    assert tri.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=1e-6)
    # rtol 1e-5 / atol 1e-6: an ulp or two per step (see test_kernels) over 8 applied steps.
    for a, b in zip(p_tri, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key, value in tri.state.get(a, {}).items():
            torch.testing.assert_close(value, ref.state[b][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["AdamW", "Ranger", "SGD"])
def test_nothing_compiles_after_the_first_step(name):
    """The first step (host flow: it builds the state) also compiles the device flow's kernels, so
    every later step launches only specializations compiled already."""
    from triton_kernels import _launch

    params = make_params(torch.bfloat16)
    opt = CONFIGS[name](params, backend="triton", max_grad_norm=1.0)
    with _launch.recording() as first:
        run(opt, params, 0, 1)
    with _launch.recording() as later:
        run(opt, params, 1, 8)
    seen = {_launch_key(*call) for call in first}
    assert later and {_launch_key(*call) for call in later} <= seen


def test_compile_kernels_compiles_what_steps_launch():
    from triton_kernels import _launch

    params = make_params(torch.bfloat16)
    opt = dist_optim.RAdam(params, backend="triton", max_grad_norm=1.0)
    set_grads(params, 0)
    with _launch.recording() as compiled:
        opt.compile_kernels()
    assert compiled
    with _launch.recording() as later:
        run(opt, params, 0, 8)  # across RAdam's switch to the rectified step (step 6)
    assert {_launch_key(*call) for call in later} <= {_launch_key(*call) for call in compiled}


def test_tensor_lr_and_tensor_grad_scale_equal_their_float_forms():
    # Powers of two: an fp32 tensor lr holds them exactly, as the float form does.
    p_tensor, p_float = make_params(), make_params()
    a = dist_optim.AdamW(p_tensor, lr=torch.tensor(2.0**-7), backend="triton", max_grad_norm=1.0)
    b = dist_optim.AdamW(p_float, lr=2.0**-7, backend="triton", max_grad_norm=1.0)
    for step in range(5):
        set_grads(p_tensor, step)
        set_grads(p_float, step)
        a.step(grad_scale=torch.tensor(0.5))
        b.step(grad_scale=0.5)
        if step == 2:  # a scheduler changes a tensor lr in place
            a.param_groups[0]["lr"].fill_(2.0**-8)
            b.param_groups[0]["lr"] = 2.0**-8
    for x, y in zip(p_tensor, p_float):
        assert torch.equal(x, y)


def test_capturable_refuses_what_it_cannot_capture():
    params = make_params()
    with pytest.raises(ValueError, match="nonfinite='raise'"):
        dist_optim.AdamW(params, capturable=True, nonfinite="raise", backend="triton")
    with pytest.raises(ValueError, match="Triton backend"):
        dist_optim.AdamW(params, capturable=True, backend="torch")
    with pytest.raises(ValueError, match="capturable must be"):
        dist_optim.AdamW(params, capturable="yes")
    opt = dist_optim.AdamW(params, capturable=True, backend="auto")  # CPU params: the CPU kernels
    set_grads(params, 0)
    with pytest.raises(ValueError, match="capturable=True needs the Triton backend"):
        opt.step()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_after_one_step_a_step_allocates_no_control_and_builds_no_table(name):
    """What capturing the second step in a CUDA graph needs: the first (host-flow) step leaves the
    control vector made and every table of the device flow built, Lookahead's counters included."""
    from dist_optim.optim import fused_core

    params = make_params(torch.bfloat16)
    for p in params:  # every trainable param has a grad on both steps, as in a captured loop
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt = CONFIGS[name](params, backend="triton", max_grad_norm=1.0)
    opt.step()
    builds, controls = triton_kernels._multi_tensor.TABLES.builds, dict(fused_core(opt)._controls)
    opt.step()
    assert triton_kernels._multi_tensor.TABLES.builds == builds
    assert fused_core(opt)._controls.keys() == controls.keys() and controls


@pytest.mark.parametrize("wrap", [False, True])
def test_compile_kernels_keeps_sgds_first_momentum_step(wrap):
    """compile_kernels() builds the momentum buffers at zero; the first step must still take the
    gradient as the buffer (torch.optim.SGD), which dampening makes visible."""
    p_ours, p_ref = make_params(), make_params()
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    ours = dist_optim.SGD(p_ours, **kw, backend="triton")
    ours = dist_optim.Lookahead(ours, k=2) if wrap else ours
    ref = dist_optim.SGD(p_ref, **kw, backend="torch")
    ref = dist_optim.Lookahead(ref, k=2) if wrap else ref
    set_grads(p_ours, 0)
    ours.compile_kernels()
    run(ours, p_ours, 0, 4)
    run(ref, p_ref, 0, 4)
    for a, b in zip(p_ours, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_skipped_first_step_builds_no_state_on_the_triton_backend():
    params = make_params()
    opt = dist_optim.Ranger(params, backend="triton")
    set_grads(params, 0)
    params[0].grad[0] = float("inf")
    opt.step()
    assert not any(opt.state.values()) and opt.skipped_steps == 1


def test_step_counters_live_where_the_kernels_read_them():
    assert len(SHAPES) > 1
    params = make_params()
    opt = dist_optim.Ranger(params, backend="triton")
    run(opt, params, 0, 2)
    for p in params[:-1]:
        if p.numel():
            assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].dim() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["AdamW", "Ranger", "SGD", "Lookahead(AdamW)"])
def test_cuda_graph_replay_equals_eager_steps(name):
    """capturable=True: a captured step, replayed on new grads (one of them holding a NaN, skipped
    on the device), leaves the same bits as eager steps."""
    device = torch.device("cuda")

    def build():
        params = [p.to(device).detach().requires_grad_(p.requires_grad) for p in make_params(torch.bfloat16)]
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        return params, CONFIGS[name](params, backend="triton", max_grad_norm=1.0, capturable=True)

    def load_grads(params, step):
        for i, p in enumerate(params):
            if p.grad is not None:
                gen = torch.Generator().manual_seed(1000 * step + i)
                p.grad.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
                if step == 5 and i == 2:
                    p.grad.view(-1)[0] = float("nan")

    eager_params, eager = build()
    graph_params, graphed = build()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # one warm-up step off the capture stream, as torch.cuda.graphs asks
        load_grads(graph_params, 0)
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load_grads(graph_params, 1)
    with torch.cuda.graph(graph):
        graphed.step()
    graph.replay()
    for step in range(2, 8):
        load_grads(graph_params, step)
        graph.replay()
    for step in range(8):
        load_grads(eager_params, step)
        eager.step()
    torch.cuda.synchronize()
    assert graphed.skipped_steps == eager.skipped_steps == 1
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a, b)


def test_raise_in_the_device_flow_raises_before_anything_changes():
    """nonfinite="raise" reads the statistics once on a device-flow step and raises before the
    counters or params move."""
    params = make_params()
    opt = dist_optim.AdamW(params, backend="triton", nonfinite="raise")
    run(opt, params, 0, 2)  # the second step is a device-flow one
    before = snapshot(opt, params)
    set_grads(params, 2)
    params[0].grad[0] = float("nan")
    with pytest.raises(dist_optim.optim.base.NonFiniteGradientError, match="inf or NaN"):
        opt.step()
    assert_identical(before, snapshot(opt, params))


@pytest.mark.parametrize("first", [True, False], ids=["host-flow", "device-flow"])
def test_an_unusable_tensor_lr_is_refused_before_anything_changes(first):
    """A tensor lr the kernels cannot read (here fp64) is refused with a ValueError before the
    counters move, on the step that builds state (host flow) as on a steady-state one."""
    params = make_params()
    opt = dist_optim.AdamW(params, backend="triton")
    if not first:
        run(opt, params, 0, 2)
    before = snapshot(opt, params)
    opt.param_groups[0]["lr"] = torch.tensor(1e-3, dtype=torch.float64)
    set_grads(params, 2)
    with pytest.raises(ValueError, match="lr must be a float or a one-element fp32 tensor"):
        opt.step()
    assert_identical(before, snapshot(opt, params))


@pytest.mark.parametrize("nonfinite", ["skip", "apply", "runner's norm"])
@pytest.mark.parametrize("first", [True, False], ids=["host-flow", "device-flow"])
def test_a_non_contiguous_grad_is_refused_before_anything_changes(first, nonfinite):
    """Also where a runner hands over the norm (DeepSpeed ZeRO-1/2), so that no statistics launch
    reads the grads; the refused step leaves none of its plan behind."""
    params = make_params()
    opt = dist_optim.AdamW(params, backend="triton", nonfinite="skip" if nonfinite == "runner's norm" else nonfinite)
    if nonfinite == "runner's norm":
        opt.use_norm_from(lambda: 1.0)
    if not first:
        run(opt, params, 0, 2)
    before = snapshot(opt, params)
    set_grads(params, 2)
    square = next(p for p in params if p.dim() == 2 and p.shape[0] == p.shape[1])
    square.grad = square.grad.t().contiguous().t()  # same values, transposed strides
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    assert_identical(before, snapshot(opt, params))
    assert not opt._planned
