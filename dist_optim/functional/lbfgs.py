"""Vector-free L-BFGS (Chen, Wang & Zhou, NIPS 2014): the two-loop recursion run on scalars.

With the history s_i, y_i kept as rows of S and Y, and the current gradient g, the two-loop
direction is a linear combination d = c_g g + sum_i c_y[i] y_i + sum_i c_s[i] s_i whose
coefficients need only inner products: SY[i][j] = s_i.y_j, YY[i][j] = y_i.y_j, Sg[i] = s_i.g,
Yg[i] = y_i.g and g.g. Those come from a few new dot products per iteration (one collective on
sharded vectors); the recursion runs on host floats; the direction is one fused combination.

Also here: the strong-Wolfe line search on scalars (Nocedal & Wright, Algorithms 3.5/3.6, with
torch.optim.LBFGS's cubic interpolation and bracketing rules), so a distributed run takes exactly
the decisions one process would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ._common import resolve_backend


def _triton(backend: str, g: torch.Tensor) -> bool:
    """The kernels take fp32 vectors; fp64 runs, empty shards and empty histories stay on the torch path."""
    return g.dtype == torch.float32 and g.numel() > 0 and resolve_backend(backend, [g]) == "triton"


def two_loop(
    rows: Sequence[int],
    SY: torch.Tensor,
    YY: torch.Tensor,
    Sg: torch.Tensor,
    Yg: torch.Tensor,
    gg: float,
    h_diag: float,
) -> tuple[float, dict[int, float], dict[int, float], float]:
    """Coefficients (c_g, c_y, c_s) of the L-BFGS direction -H g for history ``rows`` (oldest
    first; SY/YY/Sg/Yg are float64 and indexed by row), and g.d."""
    al: dict[int, float] = {}
    for i in reversed(rows):  # first loop: q = -g - sum_{j>i} al_j y_j;  al_i = ro_i s_i.q
        sq = -float(Sg[i]) - sum(al[j] * float(SY[i, j]) for j in al)
        al[i] = sq / float(SY[i, i])
    # r = H q;  second loop: be_i = ro_i y_i.r;  r += (al_i - be_i) s_i
    c_g = -h_diag
    c_y = {j: -h_diag * al[j] for j in rows}
    c_s: dict[int, float] = {}
    for i in rows:
        yq = -float(Yg[i]) - sum(al[j] * float(YY[i, j]) for j in rows)
        yr = h_diag * yq + sum(c_s[j] * float(SY[j, i]) for j in c_s)
        c_s[i] = al[i] - yr / float(SY[i, i])
    gd = c_g * gg + sum(c_y[j] * float(Yg[j]) for j in rows) + sum(c_s[j] * float(Sg[j]) for j in rows)
    return c_g, c_y, c_s, gd


def combine(
    g: torch.Tensor, Y: torch.Tensor, S: torch.Tensor, c_g: float, c_y: dict[int, float], c_s: dict[int, float],
    *, backend: str = "torch",
) -> torch.Tensor:
    """d = c_g g + sum c_y[i] Y[i] + sum c_s[i] S[i], in one pass over the history."""
    m = Y.shape[0]
    wy = torch.zeros(m, dtype=g.dtype, device=g.device)
    ws = torch.zeros(m, dtype=g.dtype, device=g.device)
    for i, c in c_y.items():
        wy[i] = c
    for i, c in c_s.items():
        ws[i] = c
    if _triton(backend, g):
        import triton_kernels.lbfgs as kernels

        return kernels.combine(g, Y, S, c_g, wy, ws)
    d = torch.addmv(g * c_g, Y.t(), wy)
    return torch.addmv(d, S.t(), ws)


def history_dots(g: torch.Tensor, Y: torch.Tensor, S: torch.Tensor, *, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(S g, Y g): every history row against g — a vector, or the columns of an (n, k) matrix —
    each history matrix read once."""
    if _triton(backend, g) and S.shape[0] > 0:
        import triton_kernels.lbfgs as kernels

        return kernels.history_dots(g, Y, S)
    return S @ g, Y @ g


def cubic_minimum(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float, bounds=None) -> float:
    """Minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2), clamped to ``bounds`` (default:
    the interval between them); the interval's midpoint when the cubic has no minimum."""
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = d1 * d1 - g1 * g2
    if disc < 0:
        return (lo + hi) / 2.0
    d2 = math.sqrt(disc)
    if x1 <= x2:
        pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(pos, lo), hi)


def strong_wolfe(
    evaluate: Callable[[float], tuple[float, float, object]],
    t: float,
    f: float,
    gtd: float,
    start: object,
    d_max: Callable[[], float],
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[float, float, object, int]:
    """Strong-Wolfe line search along a direction d on scalars.

    ``evaluate(t)`` returns (loss, g.d, token) at x + t d (token: whatever the caller needs to
    resume from that point, e.g. the gradient); ``start`` is the token at t = 0; ``d_max()`` is
    max|d|, read only once a first evaluation has happened. Returns (loss, t, token, evaluations).
    """
    f_new, gtd_new, tok_new = evaluate(t)
    evals, it = 1, 0
    t_prev, f_prev, gtd_prev, tok_prev = 0.0, f, gtd, start
    done = False
    while it < max_ls:  # bracketing phase
        if f_new > f + c1 * t * gtd or (it > 1 and f_new >= f_prev):
            bracket = [[t_prev, f_prev, gtd_prev, tok_prev], [t, f_new, gtd_new, tok_new]]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, done = [[t, f_new, gtd_new, tok_new]], True
            break
        if gtd_new >= 0:
            bracket = [[t_prev, f_prev, gtd_prev, tok_prev], [t, f_new, gtd_new, tok_new]]
            break
        t_next = cubic_minimum(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, gtd_prev, tok_prev = t, f_new, gtd_new, tok_new
        t = t_next
        f_new, gtd_new, tok_new = evaluate(t)
        evals += 1
        it += 1
    if it == max_ls:
        bracket = [[0.0, f, gtd, start], [t, f_new, gtd_new, tok_new]]
    if done:
        return bracket[0][1], bracket[0][0], bracket[0][3], evals

    low, high = (0, 1) if bracket[0][1] <= bracket[-1][1] else (1, 0)
    stalled = False
    while not done and it < max_ls:  # zoom phase
        if abs(bracket[1][0] - bracket[0][0]) * d_max() < tolerance_change:
            break
        t = cubic_minimum(bracket[0][0], bracket[0][1], bracket[0][2], bracket[1][0], bracket[1][1], bracket[1][2])
        t_lo, t_hi = min(bracket[0][0], bracket[1][0]), max(bracket[0][0], bracket[1][0])
        margin = 0.1 * (t_hi - t_lo)
        if min(t_hi - t, t - t_lo) < margin:  # too close to an end: move inwards, or note it
            if stalled or t >= t_hi or t <= t_lo:
                t = t_hi - margin if abs(t - t_hi) < abs(t - t_lo) else t_lo + margin
                stalled = False
            else:
                stalled = True
        else:
            stalled = False
        f_new, gtd_new, tok_new = evaluate(t)
        evals += 1
        it += 1
        if f_new > f + c1 * t * gtd or f_new >= bracket[low][1]:
            bracket[high] = [t, f_new, gtd_new, tok_new]
            low, high = (0, 1) if bracket[0][1] <= bracket[1][1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high][0] - bracket[low][0]) >= 0:
                bracket[high] = list(bracket[low])
            bracket[low] = [t, f_new, gtd_new, tok_new]
    return bracket[low][1], bracket[low][0], bracket[low][3], evals
