"""L-BFGS's batched dot products and direction combination against the torch path, with history
rows longer than the gradient (the column slice a replicated tail leaves) and odd sizes.

Tolerance rtol 1e-5 / atol 1e-5: dot products of ~1000 terms summed per block then across blocks,
in another order than torch's matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dist_optim.functional.lbfgs as F
import triton_kernels
from tests._triton import device  # noqa: F401 (a fixture)



@pytest.mark.parametrize("n,m,cols", [(1, 1, 1), (1003, 5, 1003), (777, 3, 801)])
def test_history_dots_and_combine_match_torch(device, n, m, cols):
    gen = torch.Generator().manual_seed(n)
    S = torch.randn(m, cols, generator=gen).to(device)
    Y = torch.randn(m, cols, generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    sg, yg = F.history_dots(g, Y[:, :n], S[:, :n], backend="triton")
    rsg, ryg = F.history_dots(g, Y[:, :n], S[:, :n], backend="torch")
    torch.testing.assert_close(sg, rsg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yg, ryg, rtol=1e-5, atol=1e-5)
    several = torch.randn(n, 3, generator=gen).to(device)
    for ours, ref in zip(F.history_dots(several, Y[:, :n], S[:, :n], backend="triton"),
                         F.history_dots(several, Y[:, :n], S[:, :n], backend="torch")):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if cols == n:
        c_y = 0.5 - np.arange(m, dtype=np.float64)
        c_s = np.where(np.arange(m) % 2 == 0, 0.25 * np.arange(m), 0.0)  # zero weights are still read
        d = F.combine(g, Y, S, -0.7, c_y, c_s, backend="triton")
        ref = F.combine(g, Y, S, -0.7, c_y, c_s, backend="torch")
        torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("history_size", [4, 100])
def test_lbfgs_on_triton_backend_equals_torch_backend(history_size):
    from tests.optim.test_lbfgs import logistic_problem, run

    import dist_optim

    if not triton_kernels.supports(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    kw = dict(lr=1, max_iter=3, history_size=history_size, line_search_fn="strong_wolfe")
    ours, losses, _ = run(dist_optim.LBFGS, logistic_problem(), 3, backend="triton", **kw)
    ref, ref_losses, _ = run(dist_optim.LBFGS, logistic_problem(), 3, backend="torch", **kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert losses == pytest.approx(ref_losses, rel=1e-6)


def test_combine_reads_only_the_rows_passed(device):
    """The optimizer passes the filled rows as a leading slice of the preallocated history: the rows
    after it hold NaN here, and none of it may reach the direction."""
    gen = torch.Generator().manual_seed(1)
    n, m, filled = 1003, 6, 2
    S = torch.randn(m, n, generator=gen).to(device)
    Y = torch.randn(m, n, generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    ref_S, ref_Y = S[:filled].clone(), Y[:filled].clone()
    S[filled:] = float("nan")
    Y[filled:] = float("nan")
    c_y, c_s = np.array([0.5, -1.5]), np.array([0.25, 2.0])
    d = F.combine(g, Y[:filled], S[:filled], -0.7, c_y, c_s, backend="triton")
    ref = F.combine(g, ref_Y, ref_S, -0.7, c_y, c_s, backend="torch")
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weights"):
        F.combine(g, Y[:filled], S[:filled], -0.7, np.ones(m), np.ones(m), backend="triton")


def test_history_dots_on_an_unaligned_column_slice(device):
    """A history whose rows start at an odd element (column slice from 1) and an odd length."""
    gen = torch.Generator().manual_seed(2)
    S = torch.randn(3, 700, generator=gen).to(device)
    Y = torch.randn(3, 700, generator=gen).to(device)
    g = torch.randn(651, generator=gen).to(device)
    ours = F.history_dots(g, Y[:, 1:652], S[:, 1:652], backend="triton")
    ref = F.history_dots(g, Y[:, 1:652], S[:, 1:652], backend="torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
