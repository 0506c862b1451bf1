"""RAdam with a settable rectification threshold: torch.optim.RAdam's algorithm and defaults."""

from __future__ import annotations

from typing import Any

from .. import _checks
from ..functional import radam_step
from ..functional.radam import STATE_KEYS
from .base import FusedOptimizer

_KEYS = frozenset(STATE_KEYS)


def check_rho_threshold(value: Any) -> float:
    v = _checks.non_negative("rho_threshold", value)
    if v < 4.0:
        raise ValueError(f"Invalid rho_threshold: {value!r} (must be >= 4: the rectification term is undefined below 4)")
    return v


class RAdam(FusedOptimizer):
    r"""Rectified Adam (Liu et al. 2020).

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
        \rho_\infty = \frac{2}{1 - \beta_2} - 1, \quad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t}, \\
        \rho_t > \rho_{thr}: \ r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
            {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}, \quad
        \theta_t = \theta_{t-1} - \gamma r_t \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \frac{m_t}{\sqrt{v_t} + \epsilon} \\
        \text{otherwise: } \theta_t = \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} m_t

    ``rho_threshold=5`` matches torch.optim.RAdam and the authors' code; 4 is the paper's Algorithm 2.
    Weight decay is L2 (added to the gradient) or, with ``decoupled_weight_decay``, AdamW-style.

    ``bf16_update`` ("nearest", "stochastic", "kahan") says how bf16 params store the fp32 result
    of a step (no fp32 master copy): rounded to nearest, stochastically (seeded by ``rounding_seed``,
    the param's position, the rank and the step), or through a bf16 compensation buffer (state
    ``kahan_comp``). It applies to bf16 params only: fp32 params are unaffected, fp16 params keep
    round-to-nearest (see dist_optim.optim.base).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        rho_threshold: float = 5.0,
        *,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        backend: str = "auto",
        process_group: Any = None,
        capturable: bool = False,
        state_dtype: str = "fp32",
        bf16_update: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            rho_threshold=rho_threshold, maximize=maximize, **self._more_defaults(),
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite, backend=backend, process_group=process_group,
            capturable=capturable, state_dtype=state_dtype, bf16_update=bf16_update, rounding_seed=rounding_seed,
        )

    def _more_defaults(self) -> dict[str, Any]:
        """A subclass's own group defaults (Ranger's k and alpha)."""
        return {}

    def _check_group(self, group):
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        check_rho_threshold(group["rho_threshold"])

    def _state_key_blocks(self, group):
        return [_KEYS]

    def _init_state(self, param, group):
        return {"step": self._new_counter(param), **self._new_moment(param, "exp_avg"),
                **self._new_moment(param, "exp_avg_sq")}

    def _radam_hyper(self, group, grad_scale, skip):
        beta1, beta2 = group["betas"]
        return dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"], rho_threshold=group["rho_threshold"],
            grad_scale=grad_scale, skip=skip, backend=self.backend,
        )

    def _update_group(self, group, params, grads, grad_scale, skip):
        hyper = self._radam_hyper(group, grad_scale, skip)
        for qps, qgs, quantized, mode in self._by_state_dtype(group, params, grads, "exp_avg"):
            keys = self._with_absmax(("exp_avg", "exp_avg_sq"), quantized)
            for ps, gs, states, t, rounding in self._step_buckets(group, qps, qgs, keys, skip, mode):
                radam_step(ps, gs, states, step=t, **hyper, **rounding)
