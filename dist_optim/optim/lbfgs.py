"""L-BFGS on plain, DDP-replicated and sharded (FSDP2 DTensor, FSDP1) params, with its history sharded
like the params and one collective per closure evaluation."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from .. import _checks
from ..distributed.lbfgs_comm import Reducer, counted_first, lbfgs_group
from ..distributed.shard import local_tensor
from ..functional.lbfgs import combine, history_dots, strong_wolfe, two_loop

LINE_SEARCHES = (None, "strong_wolfe")
CURVATURE_EPS = 1e-10  # a pair (s, y) enters the history only when y.s exceeds this, as in torch


def _no_rows() -> np.ndarray:
    return np.zeros(0)


@dataclass
class _Eval:
    """One closure evaluation and the global scalars it brought back (host values: the one read of
    the evaluation's reduction)."""

    loss: Any  # what the closure returned (rank-local)
    f: float  # the loss averaged over ranks
    g: torch.Tensor  # this rank's flat gradient (fp32; fp64 for fp64 params)
    gg: float
    g_abs_sum: float
    g_max: float
    d_max: float = 0.0
    gd: float = 0.0  # g.d
    ys: float = 0.0  # y.s, y.y, s.g, y.g for s = t d and y = g - g_prev
    yy: float = 0.0
    sg: float = 0.0
    yg: float = 0.0
    # S g, Y g, S y, Y y, Y s: float64, indexed by history row (history_size long, filled rows set)
    Sg: np.ndarray = field(default_factory=_no_rows)
    Yg: np.ndarray = field(default_factory=_no_rows)
    Sy: np.ndarray = field(default_factory=_no_rows)
    Yy: np.ndarray = field(default_factory=_no_rows)
    Ys: np.ndarray = field(default_factory=_no_rows)


class LBFGS(Optimizer):
    r"""L-BFGS (Nocedal 1980) with torch.optim.LBFGS's arguments, defaults and decisions.

    ``step(closure)``: the closure re-evaluates the model and returns this rank's loss; L-BFGS
    averages it over the process group, and every test (gradient max-norm, loss change, step size,
    line search) uses global values, so all ranks decide identically and stop at the same iteration.

    Distributed: each rank keeps the history s_i, y_i of its own shard only (fp32, 2 x history_size
    x shard size). The two-loop recursion is run vector-free (Chen, Wang & Zhou 2014) on the Gram
    matrix of the history, the gradient and the direction; a closure evaluation costs one all-reduce
    of O(history_size) scalars, which also carries the mean loss and the line search's directional
    derivative; the direction is one fused linear combination of the history.

    On a GPU: a closure evaluation reads device values on the host once (that reduction's result,
    the scalars torch's decisions need), and nothing else in an iteration waits on the device: the
    two-loop runs on those host values, and its weights go to the device in one non-blocking copy.
    Only the filled history rows are read (the Gram matrices, the dot products and the direction).

    The process group is ``process_group``, else the DTensor params' mesh (FSDP2), else the default
    group when torch.distributed is initialised (DDP: replicated params, the loss is averaged), else
    none. Under DeepSpeed ZeRO L-BFGS is refused: the engine's ``step()`` takes no closure and
    re-evaluating the loss at trial points is not part of its contract.
    """

    def __init__(
        self,
        params,
        lr: float = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        backend: str = "auto",
        process_group: Any = None,
    ) -> None:
        _checks.positive("lr", lr)
        _checks.positive_int("max_iter", max_iter)
        max_eval = max_iter * 5 // 4 if max_eval is None else _checks.positive_int("max_eval", max_eval)
        _checks.non_negative("tolerance_grad", tolerance_grad)
        _checks.non_negative("tolerance_change", tolerance_change)
        _checks.positive_int("history_size", history_size)
        if line_search_fn not in LINE_SEARCHES:
            raise ValueError(f"Invalid line_search_fn: {line_search_fn!r} (must be None or 'strong_wolfe')")
        self.backend = _checks.one_of("backend", backend, _checks.BACKENDS)
        params = list(params)
        if not params:
            raise ValueError("params: optimizer got an empty parameter list")
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, history_size=history_size, line_search_fn=line_search_fn)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"params: LBFGS takes one param group, got {len(self.param_groups)}")
        self._params = self.param_groups[0]["params"]
        for p in self._params:
            if getattr(p, "ds_id", None) is not None or hasattr(p, "ds_tensor"):
                raise ValueError("LBFGS cannot run under DeepSpeed ZeRO: the engine's step() takes no closure")
        # The params whose elements this rank counts in the inner products first, the rest after.
        self._reduce = Reducer(lbfgs_group(self._params, process_group))
        self._ordered, self._counted = counted_first(self._params, self._reduce.group)
        # fp32 history, or fp64 for fp64 params (fp32 would lose what they carry).
        self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32

    @property
    def collective_calls(self) -> int:
        """All-reduce calls issued so far (one per closure evaluation when there are several ranks)."""
        return self._reduce.calls

    # --- local vectors ---------------------------------------------------------------------------
    def _flat_grad(self) -> torch.Tensor:
        views = []
        for p in self._ordered:
            local = local_tensor(p)
            grad = None if p.grad is None else local_tensor(p.grad)
            views.append(torch.zeros(local.numel(), dtype=self._dtype, device=local.device) if grad is None
                         else grad.reshape(-1).to(self._dtype))
        return torch.cat(views)

    def _add_to_params(self, t: float, d: torch.Tensor) -> None:
        offset = 0
        for p in self._ordered:
            local = local_tensor(p)
            n = local.numel()
            local.add_(d[offset:offset + n].view_as(local).to(local.dtype), alpha=t)
            offset += n

    def _params_copy(self) -> list[torch.Tensor]:
        return [local_tensor(p).clone(memory_format=torch.contiguous_format) for p in self._ordered]

    def _set_params(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self._ordered, values):
            local_tensor(p).copy_(v)

    # --- one closure evaluation, one collective ------------------------------------------------------
    def _evaluate(self, closure, d, t, g_prev, hist) -> _Eval:
        """Run the closure and bring back every scalar the next decisions need in one reduction and
        one host read: nothing else in an iteration reads a device value."""
        loss = closure()
        g = self._flat_grad()
        c = self._counted
        gc = g[:c]
        zero = g.new_zeros((), dtype=torch.float64)
        if isinstance(loss, torch.Tensor):
            f = loss.detach().to(torch.float64).reshape(())
            if f.device != g.device:  # a loss computed elsewhere: one copy, into the same payload
                f = f.to(g.device)
        else:
            f = zero + float(loss)  # a Python number from the closure: nothing to wait for
        local_max = [g.abs().max() if g.numel() else zero,
                     d.abs().max() if d is not None and d.numel() else zero]
        sums: list = [f, gc @ gc, gc.abs().sum()]
        paired = d is not None and g_prev is not None
        if paired:
            dc = d[:c]
            yc = gc - g_prev[:c]
            sums += [gc @ dc, t * (yc @ dc), yc @ yc, t * (gc @ dc), yc @ gc]
        if hist is not None:
            S, Y, k = hist
            vectors = [gc, yc, t * dc] if paired else [gc]
            # Only the k filled rows, one product per history matrix: S and Y are each read once.
            Sv, Yv = history_dots(torch.stack(vectors, dim=1), Y[:k, :c], S[:k, :c], backend=self.backend)
            sums += [Sv[:, 0], Yv[:, 0]]
            if paired:
                sums += [Sv[:, 1], Yv[:, 1], Yv[:, 2]]
        totals, maxima = self._reduce(sums, local_max)
        ev = _Eval(loss=loss, f=totals[0] / self._reduce.world, g=g, gg=totals[1], g_abs_sum=totals[2],
                   g_max=maxima[0], d_max=maxima[1])
        rest = totals[3:]
        if paired:
            ev.gd, ev.ys, ev.yy, ev.sg, ev.yg = rest[:5]
            rest = rest[5:]
        if hist is not None:
            m, k = hist[0].shape[0], hist[2]
            vectors = np.zeros((5 if paired else 2, m))
            if k:
                vectors[:, :k] = np.asarray(rest, dtype=np.float64).reshape(-1, k)
            ev.Sg, ev.Yg = vectors[0], vectors[1]
            if paired:
                ev.Sy, ev.Yy, ev.Ys = vectors[2], vectors[3], vectors[4]
        return ev

    # --- the step ------------------------------------------------------------------------------------
    def _history(self, state: dict, n: int, device: torch.device, m: int) -> None:
        state["S"] = torch.zeros(m, n, dtype=self._dtype, device=device)
        state["Y"] = torch.zeros(m, n, dtype=self._dtype, device=device)
        state["SY"] = torch.zeros(m, m, dtype=torch.float64)
        state["YY"] = torch.zeros(m, m, dtype=torch.float64)
        state["rows"] = []
        state["H_diag"] = 1.0

    @staticmethod
    def _hist(state: dict):
        """(S, Y, rows in use): rows fill from 0 and, once full, are reused in place."""
        return (state["S"], state["Y"], len(state["rows"])) if "S" in state else None

    @staticmethod
    def _append(state: dict, ev: _Eval, d: torch.Tensor, t: float, g_prev: torch.Tensor) -> None:
        """Add the pair (s = t d, y = g - g_prev) to the history (evicting the oldest when full) and
        its inner products to the Gram matrices, and extend ev's S g / Y g with the new row."""
        S, Y, rows = state["S"], state["Y"], state["rows"]
        SY, YY = state["SY"].numpy(), state["YY"].numpy()  # host tensors: views, no copy
        m = S.shape[0]
        r = rows.pop(0) if len(rows) == m else len(rows)
        torch.mul(d, t, out=S[r])
        torch.sub(ev.g, g_prev, out=Y[r])
        SY[:, r] = ev.Sy  # s_i . y_new
        SY[r, :] = ev.Ys  # s_new . y_j
        YY[:, r] = ev.Yy
        YY[r, :] = ev.Yy
        SY[r, r], YY[r, r] = ev.ys, ev.yy
        ev.Sg[r], ev.Yg[r] = ev.sg, ev.yg
        rows.append(r)
        state["H_diag"] = ev.ys / ev.yy

    @torch.no_grad()
    def step(self, closure=None):  # noqa: C901 (the algorithm reads best in one piece)
        """One L-BFGS step (up to ``max_iter`` iterations); returns the first evaluation's loss."""
        if closure is None:
            raise ValueError("closure: LBFGS.step needs a closure that re-evaluates the model and returns the loss")
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        lr, max_iter, max_eval = group["lr"], group["max_iter"], group["max_eval"]
        tol_grad, tol_change, m = group["tolerance_grad"], group["tolerance_change"], group["history_size"]
        line_search = group["line_search_fn"]
        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        d, t, g_prev, prev_loss = state.get("d"), state.get("t"), state.get("prev_flat_grad"), state.get("prev_loss")
        hist = self._hist(state)

        ev = self._evaluate(closure, d, t, g_prev, hist)
        first = ev
        evals = 1
        state["func_evals"] += 1
        if ev.g_max <= tol_grad:
            return self._result(first)

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:  # an empty history: d = -g
                self._history(state, ev.g.numel(), ev.g.device, m)
                ev.Sg, ev.Yg = np.zeros(m), np.zeros(m)
            elif ev.ys > CURVATURE_EPS:
                self._append(state, ev, d, t, g_prev)
            rows = state["rows"]
            c_g, c_y, c_s, gtd = two_loop(rows, state["SY"].numpy(), state["YY"].numpy(), ev.Sg, ev.Yg, ev.gg,
                                          state["H_diag"])
            k = len(rows)  # rows 0..k-1 are the filled ones; the rest are never read
            d = combine(ev.g, state["Y"][:k], state["S"][:k], c_g, c_y, c_s, backend=self.backend)
            hist = self._hist(state)
            g_prev = ev.g.clone()
            prev_loss = ev.f
            t = min(1.0, 1.0 / ev.g_abs_sum) * lr if state["n_iter"] == 1 else lr
            if gtd > -tol_change:
                break

            opt_cond = False
            if line_search is not None:
                start = self._params_copy()
                # max|d| of this direction, from the search's own evaluations (the start point was
                # evaluated along the previous one)
                latest: list[float] = []

                def evaluate(step_size: float, _d=d, _g_prev=g_prev, _hist=hist, _start=start):
                    self._add_to_params(step_size, _d)
                    e = self._evaluate(closure, _d, step_size, _g_prev, _hist)
                    self._set_params(_start)
                    latest[:] = [e.d_max]
                    return e.f, e.gd, e

                ev.ys = 0.0  # if the search settles on t = 0 the start point pairs with nothing
                # As torch: the search's budget is what max_eval leaves, its zoom tolerance the default.
                _, t, ev, ls_evals = strong_wolfe(evaluate, t, ev.f, gtd, ev, lambda: latest[0], max_ls=max_eval - evals)
                self._add_to_params(t, d)
                opt_cond = ev.g_max <= tol_grad
            else:
                self._add_to_params(t, d)
                ls_evals = 0
                if n_iter != max_iter:
                    ev = self._evaluate(closure, d, t, g_prev, hist)
                    ls_evals = 1
                    opt_cond = ev.g_max <= tol_grad
            evals += ls_evals
            state["func_evals"] += ls_evals
            if n_iter == max_iter or evals >= max_eval or opt_cond:
                break
            if abs(t) * ev.d_max <= tol_change:
                break
            if abs(ev.f - prev_loss) < tol_change:
                break

        state.update(d=d, t=t, prev_flat_grad=g_prev, prev_loss=prev_loss)
        return self._result(first)

    def _result(self, ev: _Eval):
        """torch's return value in one process; the rank-averaged loss when there are several ranks."""
        if self._reduce.world == 1:
            return ev.loss
        dtype = ev.loss.dtype if isinstance(ev.loss, torch.Tensor) else torch.float64
        return torch.tensor(ev.f, dtype=dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading, but the history keeps its fp32/fp64 dtypes whatever the param dtype."""
        saved = copy.deepcopy(state_dict)
        super().load_state_dict(state_dict)
        for (_, values), p in zip(saved["state"].items(), [self._params[0]]):
            self.state[p] = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
