"""SGD with momentum, dampening, weight decay and Nesterov: torch.optim.SGD's algorithm and defaults."""

from __future__ import annotations

from typing import Any

from .. import _checks
from ..functional import sgd_step
from ..state.layout import absmax_key
from .base import KAHAN_KEY, FusedOptimizer, advance

_MOMENTUM_KEYS = frozenset({"momentum_buffer"})


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent, optionally with (Nesterov) momentum.

    .. math::
        g_t = \nabla f(\theta_{t-1}) + \lambda \theta_{t-1}, \quad
        b_t = \mu b_{t-1} + (1 - \tau) g_t \ (b_1 = g_1), \quad
        \theta_t = \theta_{t-1} - \gamma (g_t + \mu b_t \text{ if nesterov else } b_t)

    Arguments and defaults are torch.optim.SGD's; ``max_grad_norm``, ``nonfinite``, ``backend`` and
    ``process_group`` are dist-optim's (see the package docs).

    ``bf16_update`` ("nearest", "stochastic", "kahan") says how bf16 params store the fp32 result
    of a step (no fp32 master copy): rounded to nearest, stochastically (seeded by ``rounding_seed``,
    the param's position, the rank and the step), or through a bf16 compensation buffer (state
    ``kahan_comp``). It applies to bf16 params only: fp32 params are unaffected, fp16 params keep
    round-to-nearest (see dist_optim.optim.base).
    Under "stochastic", bf16 params keep a "step" counter (the streams are per step).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite, backend=backend, process_group=process_group,
            capturable=capturable, state_dtype=state_dtype, bf16_update=bf16_update, rounding_seed=rounding_seed,
        )

    _KEEPS_STEP = False  # a "step" counter only for bf16 params under bf16_update="stochastic"

    def _check_group(self, group):
        _checks.non_negative("lr", group["lr"])
        momentum = _checks.non_negative("momentum", group["momentum"])
        dampening = _checks.in_unit_interval("dampening", group["dampening"], closed=True)
        _checks.non_negative("weight_decay", group["weight_decay"])
        if group["nesterov"] and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                f"Invalid nesterov: True requires momentum > 0 and dampening == 0 "
                f"(got momentum={group['momentum']!r}, dampening={group['dampening']!r})"
            )

    def _state_key_blocks(self, group):
        return [_MOMENTUM_KEYS] if group["momentum"] != 0 else []

    def _init_state(self, param, group):
        return self._new_moment(param, "momentum_buffer") if group["momentum"] != 0 else {}

    def _update_group(self, group, params, grads, grad_scale, skip):
        hyper = dict(
            lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"], grad_scale=grad_scale, skip=skip,
            backend=self.backend,
        )
        has_momentum = group["momentum"] != 0
        if not has_momentum and self.bf16_update == "nearest":
            if params:
                sgd_step(self._locals(params), self._locals(grads), {}, first_step=False, **hyper)
            return
        # A fresh momentum buffer takes the first gradient as it is (torch.optim.SGD), so fresh and
        # running buffers go in separate calls; so do int8 and fp32 buffers, and bf16 update modes.
        fresh = [has_momentum and ("momentum_buffer" not in self.state[p] or id(p) in self._prebuilt) for p in params]
        states = self._states_for(group, params)
        int8 = self.state_dtype == "int8"
        quantized = [int8 and absmax_key("momentum_buffer") in s for s in states]
        modes = [self._rounding_mode(p) for p in params]
        kinds = list(zip(fresh, quantized, modes))
        for first, quant, mode in sorted(set(kinds), key=lambda k: (not k[0], k[1], k[2])):
            idx = [i for i, kind in enumerate(kinds) if kind == (first, quant, mode)]
            keys = self._with_absmax(("momentum_buffer",), quant) if has_momentum else ()
            keys += (KAHAN_KEY,) if mode == "kahan" else ()
            for sel, step in self._sgd_steps(idx, states, mode, skip):
                sgd_step(
                    self._locals(params[i] for i in sel),
                    self._locals(grads[i] for i in sel),
                    self._states_of([states[i] for i in sel], keys),
                    first_step=first,
                    step=step,
                    **self._rounding_kwargs([params[i] for i in sel], mode),
                    **hyper,
                )

    def _sgd_steps(self, idx, states, mode, skip):
        """(indices, step) per call: the stochastic-rounding params' counters advance here in the
        host flow (one call per count) or were advanced on the device (their counters); other
        params need no count."""
        if mode != "stochastic":
            yield idx, None
        elif skip is not None:
            yield idx, [states[i]["step"] for i in idx]
        else:
            for t, sub in advance([states[i] for i in idx]).items():
                yield [idx[j] for j in sub], t
