"""Ranger: RAdam and Lookahead in one fused step."""

from __future__ import annotations

from typing import Any

import torch

from ..distributed.shard import local_tensor
from ..functional import compiling, lookahead_sync, radam_step
from ..state.layout import absmax_key
from .base import advance
from .. import _checks
from .base import KAHAN_KEY
from .lookahead import LOOKAHEAD_KEYS, check_k_alpha, count_and_pick_due, members, slow_in_dtype, slow_weights
from .radam import RAdam


class Ranger(RAdam):
    r"""RAdam with Lookahead (Wright 2019): exactly ``Lookahead(RAdam(...), k, alpha)``, but on a
    sync step the slow-weight update is folded into RAdam's pass over memory, fed by the fp32 result
    of the step (before it is rounded to a bf16/fp16 param).

    Defaults are the Ranger reference's: betas (0.95, 0.999), eps 1e-5, k 6, alpha 0.5.

    ``slow_dtype``: the slow weights' dtype, as Lookahead's (None: each param's own). On a sync step
    the params get the slow weights rounded to nearest, whatever ``bf16_update``; on the other steps
    bf16 params are written per ``bf16_update``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        rho_threshold: float = 5.0,
        *,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        backend: str = "auto",
        process_group: Any = None,
        capturable: bool = False,
        state_dtype: str = "fp32",
        bf16_update: str = "nearest",
        rounding_seed: int = 0,
        slow_dtype=None,
    ) -> None:
        self.slow_dtype = _checks.slow_dtype(slow_dtype)
        self._k_alpha = dict(k=k, alpha=alpha)
        super().__init__(
            params, lr, betas, eps, weight_decay, decoupled_weight_decay, rho_threshold, maximize=maximize,
            max_grad_norm=max_grad_norm, nonfinite=nonfinite, backend=backend, process_group=process_group,
            capturable=capturable, state_dtype=state_dtype, bf16_update=bf16_update, rounding_seed=rounding_seed,
        )

    def _more_defaults(self):
        return self._k_alpha

    def _check_group(self, group):
        super()._check_group(group)
        check_k_alpha(group["k"], group["alpha"])

    def _state_key_blocks(self, group):
        return [LOOKAHEAD_KEYS, *super()._state_key_blocks(group)]

    def _stored_form(self, param, state):
        return super()._stored_form(param, slow_in_dtype(param, state, self.slow_dtype))

    def _device_plan(self, work, keep=False):
        # Lookahead counts optimizer steps taken, by every member, with a gradient this step or not;
        # a member without slow weights yet makes this a host-flow step.
        plan = super()._device_plan(work, keep)
        if plan is None:
            return None
        lookup = self.state.__getitem__
        for group in self.param_groups:
            for state in map(lookup, members(group["params"])):
                if "slow_buffer" not in state:
                    return None
                plan.append(state["lookahead_step"])
        return plan

    def _prepare_device_state(self, group, params):
        for p in members(group["params"]):
            if "slow_buffer" not in self.state[p]:
                self.state[p].update(slow_weights(p, self, self.slow_dtype))

    def _update_group(self, group, params, grads, grad_scale, skip):
        if skip is None:
            self._update_group_on_host(group, params, grads, grad_scale)
            return
        hyper = self._radam_hyper(group, grad_scale, skip)
        states = self._states_for(group, params)
        # one launch per (slow weights or not, int8 moments or not, bf16 update mode)
        kinds = [("slow_buffer" in s, absmax_key("exp_avg") in s, self._rounding_mode(p))
                 for p, s in zip(params, states)]
        for has_slow, quantized, mode in sorted(set(kinds)):
            idx = [i for i, kind in enumerate(kinds) if kind == (has_slow, quantized, mode)]
            keys = self._with_absmax(("exp_avg", "exp_avg_sq"), quantized) + (("slow_buffer",) if has_slow else ())
            keys += (KAHAN_KEY,) if mode == "kahan" else ()
            picked = [states[i] for i in idx]
            radam_step(
                self._locals(params[i] for i in idx),
                self._locals(grads[i] for i in idx),
                self._states_of(picked, keys),
                step=[s["step"] for s in picked],
                lookahead_alpha=group["alpha"] if has_slow else None,
                lookahead_steps=self._locals(s["lookahead_step"] for s in picked) if has_slow else None,
                k=group["k"],
                **self._rounding_kwargs([params[i] for i in idx], mode),
                **hyper,
            )
        with_grad = {id(p) for p in params}
        self._sync_on_device(group, [p for p in members(group["params"]) if id(p) not in with_grad], skip)

    def _sync_on_device(self, group, params, skip) -> None:
        """Device flow: the sync of members without a gradient this step (they still count)."""
        if params:
            lookahead_sync(
                self._locals(params),
                self._locals(self.state[p]["slow_buffer"] for p in params),
                alpha=group["alpha"],
                lookahead_steps=self._locals(self.state[p]["lookahead_step"] for p in params),
                k=group["k"],
                skip=skip,
                backend=self.backend,
            )

    def _warm_device_flow(self, work, device, counters=()):
        super()._warm_device_flow(work, device, counters)
        skip = torch.zeros(1, dtype=torch.float32, device=device)
        with compiling():  # the sync of members without a gradient, whenever that first happens
            for group in self.param_groups:
                self._sync_on_device(group, members(group["params"]), skip)

    def _update_group_on_host(self, group, params, grads, grad_scale):
        synced = members(group["params"])
        for p in synced:  # slow weights from the params before this step's update
            if "slow_buffer" not in self.state[p]:
                self.state[p].update(slow_weights(p, self, self.slow_dtype))
        due = {id(synced[i]) for i in count_and_pick_due([self.state[p] for p in synced], group["k"])}
        hyper = self._radam_hyper(group, grad_scale, None)
        states = self._states_for(group, params)
        int8 = self.state_dtype == "int8"
        kinds = [(id(p) in due, int8 and absmax_key("exp_avg") in s, self._rounding_mode(p))
                 for p, s in zip(params, states)]
        for t, idx in advance(states).items():
            for sync, quant, mode in sorted({kinds[i] for i in idx}):
                sel = [i for i in idx if kinds[i] == (sync, quant, mode)]
                keys = self._with_absmax(("exp_avg", "exp_avg_sq"), quant) + (("slow_buffer",) if sync else ())
                keys += (KAHAN_KEY,) if mode == "kahan" else ()
                radam_step(
                    self._locals(params[i] for i in sel),
                    self._locals(grads[i] for i in sel),
                    self._states_of([states[i] for i in sel], keys),
                    step=t,
                    lookahead_alpha=group["alpha"] if sync else None,
                    **self._rounding_kwargs([params[i] for i in sel], mode),
                    **hyper,
                )
        # Params without a gradient this step still take part in the sync.
        with_grad = {id(p) for p in params}
        idle = [p for p in synced if id(p) in due and id(p) not in with_grad]
        if idle:
            lookahead_sync(
                [local_tensor(p) for p in idle],
                [local_tensor(self.state[p]["slow_buffer"]) for p in idle],
                alpha=group["alpha"],
                backend=self.backend,
            )
