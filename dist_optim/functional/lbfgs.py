"""Vector-free L-BFGS (Chen, Wang & Zhou, NIPS 2014): the two-loop recursion run on scalars.

With the history s_i, y_i kept as rows of S and Y, and the current gradient g, the two-loop
direction is a linear combination d = c_g g + sum_i c_y[i] y_i + sum_i c_s[i] s_i whose
coefficients need only inner products: SY[i][j] = s_i.y_j, YY[i][j] = y_i.y_j, Sg[i] = s_i.g,
Yg[i] = y_i.g and g.g. Those come from a few new dot products per iteration (one collective on
sharded vectors, read to the host once with the loss and the convergence scalars); the recursion
runs on those host values and the direction is one fused combination of the filled history rows.

Also here: the strong-Wolfe line search on scalars (Nocedal & Wright, Algorithms 3.5/3.6, with
torch.optim.LBFGS's cubic interpolation and bracketing rules), so a distributed run takes exactly
the decisions one process would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ._common import resolve_backend


def _triton(backend: str, g: torch.Tensor) -> bool:
    """The kernels take fp32 vectors; fp64 runs, empty shards and empty histories stay on the torch path."""
    return g.dtype == torch.float32 and g.numel() > 0 and resolve_backend(backend, [g]) == "triton"


def two_loop(
    rows: Sequence[int],
    SY: np.ndarray,
    YY: np.ndarray,
    Sg: np.ndarray,
    Yg: np.ndarray,
    gg: float,
    h_diag: float,
) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Coefficients (c_g, c_y, c_s) of the L-BFGS direction -H g, and g.d.

    ``rows``: the filled history rows, oldest first — a permutation of 0..k-1, since the history
    fills from row 0 and then reuses rows in place. SY, YY (k' x k', k' >= k), Sg, Yg are float64
    host arrays indexed by row; only the filled rows are read. c_y and c_s come back indexed by row
    (length k), ready to weight history rows 0..k-1.

    Everything here is host arithmetic on values the evaluation's one reduction already brought
    back, so the recursion waits on no device.
    """
    idx = np.asarray(rows, dtype=np.intp)
    k = idx.size
    sy, yy = SY[np.ix_(idx, idx)], YY[np.ix_(idx, idx)]  # in history order: sy[a, b] = s_a . y_b
    sg, yg = Sg[idx], Yg[idx]
    al = np.zeros(k)
    for a in range(k - 1, -1, -1):  # first loop: q = -g - sum_{b>a} al_b y_b;  al_a = ro_a s_a.q
        al[a] = (-sg[a] - al[a + 1:] @ sy[a, a + 1:]) / sy[a, a]
    # r = H q;  second loop: be_a = ro_a y_a.r;  r += (al_a - be_a) s_a
    c_g = -h_diag
    c_y = -h_diag * al
    yq = -yg - yy @ al  # y_a.q for the final q
    c_s = np.zeros(k)
    for a in range(k):
        yr = h_diag * yq[a] + c_s[:a] @ sy[:a, a]
        c_s[a] = al[a] - yr / sy[a, a]
    gd = c_g * gg + float(c_y @ yg) + float(c_s @ sg)
    by_row_y, by_row_s = np.empty(k), np.empty(k)
    by_row_y[idx], by_row_s[idx] = c_y, c_s
    return c_g, by_row_y, by_row_s, gd


def to_device(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Host values as a tensor of ``like``'s dtype on its device, without waiting for the device:
    a blocking host-to-device copy would synchronise the stream, so CUDA gets a pinned buffer and a
    non-blocking copy (the caching host allocator keeps the buffer until the copy has run)."""
    host = torch.from_numpy(np.ascontiguousarray(values)).to(like.dtype)
    if like.device.type == "cuda":
        return host.pin_memory().to(like.device, non_blocking=True)
    return host if like.device.type == "cpu" else host.to(like.device)


def combine(
    g: torch.Tensor, Y: torch.Tensor, S: torch.Tensor, c_g: float, c_y: np.ndarray, c_s: np.ndarray,
    *, backend: str = "torch",
) -> torch.Tensor:
    """d = c_g g + sum_i c_y[i] Y[i] + sum_i c_s[i] S[i] over the k rows of Y and S (the filled part
    of the history; c_y, c_s of length k), in one pass over them."""
    k = Y.shape[0]
    if S.shape[0] != k or len(c_y) != k or len(c_s) != k:
        raise ValueError(f"combine: {k} rows of Y, {S.shape[0]} of S, {len(c_y)} and {len(c_s)} weights")
    if k == 0:
        return g * c_g
    w = to_device(np.stack([c_y, c_s]), g)  # one copy for both weight vectors
    if _triton(backend, g):
        import triton_kernels.lbfgs as kernels

        return kernels.combine(g, Y, S, c_g, w)
    d = torch.addmv(g * c_g, Y.t(), w[0])
    return torch.addmv(d, S.t(), w[1])


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
