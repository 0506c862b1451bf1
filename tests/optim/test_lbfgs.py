"""L-BFGS in one process equals torch.optim.LBFGS (both line-search modes) on convex problems, finds
Rosenbrock's minimum, resumes from its state_dict, and refuses bad input; an iteration reads device
values once per closure evaluation and only the filled history rows.

The same algorithm computes in another order (float64 inner products and one combination for the
direction, where torch runs fp32 vector ops), so: in float64, params and losses agree to rtol 1e-9;
in fp32 to atol 2e-5 — torch's own fp32 recursion moves the iterates by ulps times the problem's
condition number (~40 for the quadratic). Trajectories stop before the noise floor: once converged,
tests such as "the fp32 loss did not change" flip on ulp differences, so there the test is that
both reach the same minimum.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import dist_optim
from dist_optim.host_work import counting_host_reads


def logistic_problem(seed=0, n=200, dim=10, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    y = (x @ torch.randn(dim, generator=gen, dtype=dtype) + 0.3 * torch.randn(n, generator=gen, dtype=dtype) > 0).to(dtype)

    def loss(params):
        w, b = params
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.01 * (w * w).sum()

    return loss, [torch.zeros(dim, dtype=dtype), torch.zeros(1, dtype=dtype)]


def quadratic_problem(seed=1, dim=12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=dtype)
    h = a @ a.t() / dim + 0.1 * torch.eye(dim, dtype=dtype)
    c = torch.randn(dim, generator=gen, dtype=dtype)

    def loss(params):
        (x,) = params
        return 0.5 * x @ h @ x - c @ x

    return loss, [torch.zeros(dim, dtype=dtype)]


def run(cls, problem, steps, **kw):
    loss_fn, init = problem
    params = [p.clone().requires_grad_() for p in init]
    opt = cls(params, **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(steps)]
    return params, losses, opt


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-9, atol=1e-12)), (torch.float32, dict(rtol=1e-5, atol=2e-5))])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize(
    "problem,kw",
    [
        (logistic_problem, dict(lr=1, max_iter=3, history_size=5)),
        (logistic_problem, dict(lr=0.5, max_iter=2, history_size=2)),  # the history wraps around
        (quadratic_problem, dict(lr=1, max_iter=3, history_size=100)),
        (quadratic_problem, dict(lr=0.8, max_iter=2, history_size=2)),
    ],
)
def test_equals_torch_lbfgs(problem, kw, line_search_fn, dtype, tol):
    ours, our_losses, opt = run(dist_optim.LBFGS, problem(dtype=dtype), 4, line_search_fn=line_search_fn, **kw)
    theirs, their_losses, ref = run(torch.optim.LBFGS, problem(dtype=dtype), 4, line_search_fn=line_search_fn, **kw)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)
    assert our_losses == pytest.approx(their_losses, rel=tol["rtol"], abs=tol["atol"])
    first = opt._params[0]
    assert opt.state[first]["func_evals"] == ref.state[ref._params[0]]["func_evals"]
    assert opt.state[first]["n_iter"] == ref.state[ref._params[0]]["n_iter"]


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize(
    "start,loss_fn,kw",
    [
        # the first trial overshoots: the zoom stops on the current direction's max|d| (it read the
        # previous direction's, 0 on the first iteration, and returned t = 0)
        ([0.1, -0.2], lambda x: 0.5 * (x * x).sum(), dict(lr=100.0, max_iter=20)),
        # the search may use only the evaluations max_eval leaves (it always allowed 25)
        ([-1.5, 2.0], rosenbrock, dict(max_iter=3, max_eval=4)),
        ([-1.5, 2.0], rosenbrock, dict(max_iter=20, max_eval=8)),
        # the zoom's tolerance is the default, not the group's tolerance_change
        ([1.0] * 100, lambda x: 0.5 * (x * x).sum(), dict(lr=300.0, max_iter=5, tolerance_change=10.0)),
    ],
    ids=["zoom-first-iteration", "max-eval-4", "max-eval-8", "tolerance-change-10"],
)
def test_strong_wolfe_search_equals_torchs(start, loss_fn, kw):
    ends, calls = [], []
    for cls in (dist_optim.LBFGS, torch.optim.LBFGS):
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = cls([x], line_search_fn="strong_wolfe", **kw)
        count = [0]

        def closure():
            opt.zero_grad()
            loss = loss_fn(x)
            loss.backward()
            count[0] += 1
            return loss

        per_step = []
        for _ in range(4):
            count[0] = 0
            opt.step(closure)
            per_step.append(count[0])
        ends.append(x.detach().clone())
        calls.append(per_step)
    assert calls[0] == calls[1]
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("problem", [logistic_problem, quadratic_problem])
def test_long_runs_reach_torchs_minimum(problem, line_search_fn):
    kw = dict(lr=1, max_iter=20, history_size=10, line_search_fn=line_search_fn)
    ours, _, _ = run(dist_optim.LBFGS, problem(), 5, **kw)
    theirs, _, _ = run(torch.optim.LBFGS, problem(), 5, **kw)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # both at the fp32 minimum, to its conditioning


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_rosenbrock_converges_to_one_one(line_search_fn):
    xy = torch.tensor([-1.5, 2.0], requires_grad=True)
    opt = dist_optim.LBFGS([xy], lr=1 if line_search_fn else 0.1, max_iter=200, history_size=10,
                           line_search_fn=line_search_fn, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2
        loss.backward()
        return loss

    for _ in range(20 if line_search_fn else 60):
        opt.step(closure)
    torch.testing.assert_close(xy.detach(), torch.ones(2), rtol=0, atol=1e-3)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_state_dict_resume_continues_the_same_trajectory(line_search_fn):
    kw = dict(lr=1, max_iter=3, history_size=4, line_search_fn=line_search_fn)
    full, full_losses, _ = run(dist_optim.LBFGS, logistic_problem(), 6, **kw)
    half, _, opt = run(dist_optim.LBFGS, logistic_problem(), 3, **kw)
    saved_params, saved = [p.detach().clone() for p in half], copy.deepcopy(opt.state_dict())

    loss_fn, _ = logistic_problem()
    params = [p.clone().requires_grad_() for p in saved_params]
    resumed = dist_optim.LBFGS(params, **kw)
    resumed.load_state_dict(saved)

    def closure():
        resumed.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    losses = [float(resumed.step(closure)) for _ in range(3)]
    for a, b in zip(params, full):
        assert torch.equal(a, b)
    assert losses == full_losses[3:]


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(lr=0), "lr: 0"),
        (dict(lr=-1.0), "lr: -1.0"),
        (dict(history_size=0), "history_size: 0"),
        (dict(max_iter=0), "max_iter: 0"),
        (dict(max_eval=0), "max_eval: 0"),
        (dict(tolerance_grad=-1.0), "tolerance_grad: -1.0"),
        (dict(line_search_fn="armijo"), "line_search_fn: 'armijo'"),
        (dict(backend="cuda"), "backend: 'cuda'"),
    ],
)
def test_bad_input(kw, message):
    with pytest.raises(ValueError, match=message):
        dist_optim.LBFGS([torch.zeros(2, requires_grad=True)], **kw)


def test_step_without_closure_and_several_groups_are_refused():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="closure"):
        dist_optim.LBFGS([p]).step()
    with pytest.raises(ValueError, match="one param group"):
        dist_optim.LBFGS([{"params": [p]}, {"params": [torch.zeros(1, requires_grad=True)]}])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("history_size", [3, 100])
def test_one_host_read_per_closure_evaluation(history_size, line_search_fn):
    """Every scalar an evaluation brings back (loss, max-norms, the history's inner products) comes
    in one read; the two-loop, the direction and the line search's arithmetic read nothing more, so
    an iteration reads once per closure evaluation (once without a line search), whatever the history
    size. The history wraps around at size 3."""
    loss_fn, init = logistic_problem()
    params = [p.clone().requires_grad_() for p in init]
    # tolerance_change=0 keeps the fixed-step run going for all 8 iterations; the line search keeps
    # its default, which stops its zoom before the bracket closes to a point (torch divides by zero there).
    opt = dist_optim.LBFGS(params, lr=1, max_iter=8, history_size=history_size, line_search_fn=line_search_fn,
                           tolerance_grad=0, tolerance_change=1e-9 if line_search_fn else 0, backend="torch")

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    state = opt.state.setdefault(params[0], {})
    for _ in range(3):
        evals, iters = state.get("func_evals", 0), state.get("n_iter", 0)
        counts = collections.Counter()
        with counting_host_reads(counts):
            opt.step(closure)
        evals, iters = state["func_evals"] - evals, state["n_iter"] - iters
        assert (evals >= iters >= 1) if line_search_fn else (evals == iters == 8)
        assert counts == {"tolist": evals}, counts


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_only_filled_history_rows_are_read(line_search_fn, backend):
    """history_size=100 filled a few rows at a time: NaN in every row not yet filled (history vectors
    and Gram matrices) changes nothing, bit for bit, so neither the two-loop, the dot products nor
    the direction (torch, or the Triton kernels under the interpreter) read past the filled rows."""
    import triton_kernels

    if backend == "triton" and not triton_kernels.supports(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    kw = dict(lr=1, max_iter=3, history_size=100, line_search_fn=line_search_fn, backend=backend)
    clean, clean_losses, _ = run(dist_optim.LBFGS, logistic_problem(), 4, **kw)

    loss_fn, init = logistic_problem()
    params = [p.clone().requires_grad_() for p in init]
    opt = dist_optim.LBFGS(params, **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    losses, filled = [], []
    for _ in range(4):
        losses.append(float(opt.step(closure)))
        state = opt.state[params[0]]
        k = len(state["rows"])
        filled.append(k)
        for name in ("S", "Y", "SY", "YY"):
            state[name][k:] = float("nan")
        for name in ("SY", "YY"):
            state[name][:, k:] = float("nan")
    assert 0 < filled[-1] < 100 and filled == sorted(filled)
    for a, b in zip(params, clean):
        assert torch.equal(a, b)
    assert losses == clean_losses
