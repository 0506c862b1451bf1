"""Lookahead (Zhang et al. 2019) around any dist-optim optimizer, with its slow weights in the
optimizer state so that they are checkpointed and resharded like every other state tensor."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from .. import _checks
from ..distributed.shard import local_tensor, new_state_like
from ..functional import compiling, lookahead_sync
from ..functional.lookahead import STATE_KEYS
from . import _state_dict
from .base import FusedOptimizer, advance

LOOKAHEAD_KEYS = frozenset(STATE_KEYS)


def check_k_alpha(k: Any, alpha: Any) -> None:
    _checks.positive_int("k", k)
    _checks.in_unit_interval("alpha", alpha, closed=True)


def slow_dtype_of(param: torch.Tensor, slow_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``param``'s slow weights: ``slow_dtype``, or the param's own when None."""
    return param.dtype if slow_dtype is None else slow_dtype


def slow_weights(param: torch.Tensor, optimizer: FusedOptimizer, slow_dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """Lookahead's state for a param: slow weights (in ``slow_dtype_of(param, slow_dtype)``) starting
    at the param's current value (the paper's phi_0 = theta_0) and the count of optimizer steps taken
    since (a counter where the optimizer keeps its step counters)."""
    return {"slow_buffer": new_state_like(param, copy=True, dtype=slow_dtype_of(param, slow_dtype)),
            "lookahead_step": optimizer._new_counter(param)}


def slow_in_dtype(param: torch.Tensor, state: dict[str, torch.Tensor], slow_dtype: torch.dtype | None
                  ) -> dict[str, torch.Tensor]:
    """A loaded state with its slow weights in the dtype kept for them (a load restores state in
    fp32: exact back to bf16/fp16 slow weights; an fp32 checkpoint's rounds to nearest)."""
    slow = state.get("slow_buffer")
    dtype = slow_dtype_of(param, slow_dtype)
    if slow is None or slow.dtype == dtype:
        return state
    return {**state, "slow_buffer": slow.to(dtype)}


def members(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The params Lookahead keeps slow weights for: frozen ones never move (the sync would be a
    no-op), and DCP loads no optimizer state for them, so a counter kept for them would restart on
    resume and shift their sync after an unfreeze."""
    return [p for p in params if p.requires_grad]


def count_and_pick_due(states: Sequence[dict[str, torch.Tensor]], k: int) -> list[int]:
    """Advance each param's Lookahead count; the indices whose count reached a multiple of k."""
    return [i for count, idx in advance(states, "lookahead_step").items() if count % k == 0 for i in idx]


class Lookahead(Optimizer):
    r"""Every ``k`` steps of the wrapped optimizer: ``slow += alpha * (fast - slow); fast = slow``.

    ``slow_dtype`` is the slow weights' dtype: None (default) keeps each param's own dtype (bf16
    slow weights for bf16 params), or torch.float32/bfloat16/float16 (or "fp32"/"bf16"/"fp16") for
    all. The sync computes in fp32 from the stored slow weights, stores them rounded to nearest, and
    sets the params to the stored value, rounded to nearest (exact when the dtypes agree); it
    leaves a ``bf16_update="kahan"`` compensation buffer as it is.

    ``alpha`` is the paper's step towards the fast weights (a text writing
    ``slow = a * slow + (1 - a) * fast`` means ``a = 1 - alpha``). ``k`` counts optimizer steps taken
    (a skipped non-finite step does not count), per param, so it does not drift when ZeRO-3 calls
    ``step()`` once per sub-group. This object shares ``param_groups`` and ``state`` with the wrapped
    optimizer: LR schedulers, ``zero_grad``, ``state_dict``/``load_state_dict`` and
    ``torch.distributed.checkpoint.state_dict`` work on it directly.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5, *, slow_dtype=None) -> None:
        if not isinstance(optimizer, FusedOptimizer):
            raise ValueError(f"optimizer must be a dist_optim optimizer, got {type(optimizer).__name__}")
        if "k" in optimizer.defaults and "alpha" in optimizer.defaults:
            raise ValueError(f"optimizer {type(optimizer).__name__} already does Lookahead; wrap its base optimizer instead")
        check_k_alpha(k, alpha)
        self.slow_dtype = _checks.slow_dtype(slow_dtype)
        # Optimizer.__init__ is not called: it would build param groups and state of its own, while
        # these must be the wrapped optimizer's. What it sets besides them is set here.
        self.optimizer = optimizer
        self.k, self.alpha = k, float(alpha)
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def skipped_steps(self) -> int:
        return self.optimizer.skipped_steps

    @property
    def last_grad_norm(self) -> float | None:
        return self.optimizer.last_grad_norm

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float | torch.Tensor = 1.0):  # noqa: D102 (the wrapped optimizer's contract)
        inner = self.optimizer
        synced = [p for g in self.param_groups for p in members(g["params"])]
        # Slow weights are taken from the params before this step's update, but kept only if the
        # step is not skipped (a skipped step leaves the state as it was): the host flow decides that.
        pending = {p: slow_weights(p, inner, self.slow_dtype) for p in synced if "slow_buffer" not in self.state[p]}
        if pending:
            loss, skipped = inner._step(closure, grad_scale, host=True)
            if skipped:
                return loss
            for p, la_state in pending.items():
                self.state[p].update(la_state)
            due = [synced[i] for i in count_and_pick_due([self.state[p] for p in synced], self.k)]
            self._sync(due)
            self._warm_sync(synced)
            return loss
        counters = [self.state[p]["lookahead_step"] for p in synced]
        loss, control = inner._step(closure, grad_scale, counters)
        if isinstance(control, torch.Tensor):  # device flow: the counters advanced unless skipped
            self._sync(synced, counters, skip=control[1:2])
        elif not control:  # host flow, not skipped: the counters advanced
            self._sync([p for p, c in zip(synced, counters) if int(c) % self.k == 0])
        return loss

    @torch.no_grad()
    def compile_kernels(self) -> None:
        """The wrapped optimizer's ``compile_kernels`` and the sync's; builds the slow weights of
        every member from the params as they are."""
        synced = [p for g in self.param_groups for p in members(g["params"])]
        for p in synced:
            if "slow_buffer" not in self.state[p]:
                self.state[p].update(slow_weights(p, self.optimizer, self.slow_dtype))
        self.optimizer.compile_kernels()
        self._warm_sync(synced)

    def _warm_sync(self, synced) -> None:
        """Compile the device flow's sync (counters read on the device) and the step that advances
        the Lookahead counters with the wrapped optimizer's, without running them."""
        counters = [self.state[p]["lookahead_step"] for p in synced]
        self.optimizer.warm_step(counters)
        control = self.optimizer.warm_control(synced)
        if control is not None:
            with compiling():
                self._sync(synced, counters, skip=control[1:2])

    def _sync(self, params, counters=None, skip=None) -> None:
        """The slow-weight update on ``params`` (all of them), or, given their advanced
        ``counters``, on those whose count is a multiple of k unless ``skip`` is set (on the device)."""
        if not params:
            return
        lookahead_sync(
            [local_tensor(p) for p in params],
            [local_tensor(self.state[p]["slow_buffer"]) for p in params],
            alpha=self.alpha,
            lookahead_steps=None if counters is None else [local_tensor(c) for c in counters],
            k=self.k,
            skip=skip,
            backend=self.optimizer.backend,
        )

    def _state_key_blocks(self, group: Mapping[str, Any]) -> list[frozenset[str]]:
        return [LOOKAHEAD_KEYS, *self.optimizer._load_key_blocks(group)]

    def _stored_form(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.optimizer._stored_form(param, slow_in_dtype(param, state, self.slow_dtype))

    def memory_report(self):
        """The wrapped optimizer's report (the state is shared: slow weights count by their dtype)."""
        return self.optimizer.memory_report()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state with Lookahead's, int8 moments in their checkpoint form."""
        return _state_dict.checkpoint_form([p for g in self.param_groups for p in g["params"]], super().state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _state_dict.load_into(
            self,
            state_dict,
            lambda sd: _state_dict.restore(
                self, sd, self._state_key_blocks, self.optimizer._check_group, self.optimizer.counter_device,
                self._stored_form,
            ),
            owner=self.optimizer,
        )


def fused_core(optimizer: Any) -> FusedOptimizer | None:
    """The FusedOptimizer doing the update: ``optimizer`` itself, the one a Lookahead wraps, or None
    for anything else (integrations bind groups and settle clipping on it)."""
    inner = optimizer.optimizer if isinstance(optimizer, Lookahead) else optimizer
    return inner if isinstance(inner, FusedOptimizer) else None
