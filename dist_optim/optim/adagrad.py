"""Adagrad: torch.optim.Adagrad's algorithm and defaults."""

from __future__ import annotations

from typing import Any

from .. import _checks
from ..functional import adagrad_step
from .base import FusedOptimizer

_KEYS = frozenset({"step", "sum"})


class Adagrad(FusedOptimizer):
    r"""Adagrad (Duchi et al. 2011).

    .. math::
        g_t = \nabla f(\theta_{t-1}) + \lambda \theta_{t-1}, \quad
        \tilde\gamma = \gamma / (1 + (t - 1) \eta), \quad
        s_t = s_{t-1} + g_t^2, \quad
        \theta_t = \theta_{t-1} - \tilde\gamma g_t / (\sqrt{s_t} + \epsilon)

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
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
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
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite, backend=backend, process_group=process_group,
            capturable=capturable, state_dtype=state_dtype, bf16_update=bf16_update, rounding_seed=rounding_seed,
        )

    def _check_group(self, group):
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("lr_decay", group["lr_decay"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.non_negative("initial_accumulator_value", group["initial_accumulator_value"])
        _checks.non_negative("eps", group["eps"])

    def _state_key_blocks(self, group):
        return [_KEYS]

    def _init_state(self, param, group):
        return {"step": self._new_counter(param), **self._new_moment(param, "sum", fill=group["initial_accumulator_value"])}

    def _update_group(self, group, params, grads, grad_scale, skip):
        for qps, qgs, quantized, mode in self._by_state_dtype(group, params, grads, "sum"):
            keys = self._with_absmax(("sum",), quantized)
            for ps, gs, states, t, rounding in self._step_buckets(group, qps, qgs, keys, skip, mode):
                adagrad_step(
                    ps, gs, states, lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                    eps=group["eps"], step=t, grad_scale=grad_scale, skip=skip, backend=self.backend, **rounding,
                )

