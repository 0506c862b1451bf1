"""RMSprop with momentum and centering: torch.optim.RMSprop's algorithm and defaults."""

from __future__ import annotations

from typing import Any

from .. import _checks
from ..functional import rmsprop_step
from ..functional.rmsprop import rmsprop_state_keys
from .base import FusedOptimizer


class RMSprop(FusedOptimizer):
    r"""RMSprop (Hinton's lecture 6e; centered as in Graves 2013).

    .. math::
        g_t = \nabla f(\theta_{t-1}) + \lambda \theta_{t-1}, \quad
        v_t = \alpha v_{t-1} + (1 - \alpha) g_t^2, \quad
        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t \ \text{(centered)}, \\
        a_t = \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered) or } \sqrt{v_t} + \epsilon, \quad
        b_t = \mu b_{t-1} + g_t / a_t, \quad \theta_t = \theta_{t-1} - \gamma b_t \ (\mu > 0)
        \text{ or } \theta_{t-1} - \gamma g_t / a_t

    ``bf16_update`` ("nearest", "stochastic", "kahan") says how bf16 params store the fp32 result
    of a step (no fp32 master copy): rounded to nearest, stochastically (seeded by ``rounding_seed``,
    the param's position, the rank and the step), or through a bf16 compensation buffer (state
    ``kahan_comp``). It applies to bf16 params only: fp32 params are unaffected, fp16 params keep
    round-to-nearest (see dist_optim.optim.base).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
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
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite, backend=backend, process_group=process_group,
            capturable=capturable, state_dtype=state_dtype, bf16_update=bf16_update, rounding_seed=rounding_seed,
        )

    def _check_group(self, group):
        _checks.non_negative("lr", group["lr"])
        _checks.in_unit_interval("alpha", group["alpha"], closed=True)
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.non_negative("momentum", group["momentum"])

    def _state_key_blocks(self, group):
        return [frozenset(rmsprop_state_keys(group["momentum"], group["centered"]))]

    def _init_state(self, param, group):
        keys = rmsprop_state_keys(group["momentum"], group["centered"])
        state = {"step": self._new_counter(param)}
        for k in keys[1:]:
            state.update(self._new_moment(param, k))
        return state

    def _update_group(self, group, params, grads, grad_scale, skip):
        keys = rmsprop_state_keys(group["momentum"], group["centered"])[1:]
        # RMSprop's update does not depend on t (kept for torch.optim compatibility); stochastic
        # rounding's streams do.
        for qps, qgs, quantized, mode in self._by_state_dtype(group, params, grads, "square_avg"):
            for ps, gs, states, t, rounding in self._step_buckets(group, qps, qgs, self._with_absmax(keys, quantized),
                                                                  skip, mode):
                rmsprop_step(
                    ps, gs, states, lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                    weight_decay=group["weight_decay"], momentum=group["momentum"], centered=group["centered"],
                    grad_scale=grad_scale, skip=skip, step=t if mode == "stochastic" else None, backend=self.backend,
                    **rounding,
                )
