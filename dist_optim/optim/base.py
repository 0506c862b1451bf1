"""The base of every element-wise optimizer: argument checks, fp32 state built lazily, gradient
clipping and non-finite handling folded into the update's grad scale, and validated state loading.

Flow of one ``step()``: collect the (local) grads of every group; when ``max_grad_norm`` is set or
``nonfinite`` is not "apply", one fused read of the grads gives [sum of squares, non-finite flag];
a non-finite step is skipped (or raises) before anything changes; otherwise each group's update runs
with ``grad_scale = clip coefficient x (-1 if maximize)``, so no pass ever writes the gradients.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from .. import _checks
from ..distributed.collectives import active
from ..distributed.grad_stats import GradLayout, fsdp1_group, global_grad_stats
from ..distributed.shard import is_dtensor, local_tensor
from . import _state_dict

# torch.nn.utils.clip_grad_norm_'s guard against division by a zero norm.
CLIP_EPS = 1e-6


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` with ``nonfinite="raise"`` when a gradient holds inf or NaN."""


class FusedOptimizer(Optimizer):
    """Shared machinery; subclasses define ``_check_group``, ``_state_key_blocks``, ``_init_state``
    and ``_update_group``."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        max_grad_norm: float | None,
        nonfinite: str,
        backend: str,
        process_group: Any,
    ) -> None:
        if isinstance(params, torch.Tensor):
            raise ValueError(f"params must be an iterable of tensors or dicts, got a {torch.typename(params)}")
        params = list(params)
        if not params:
            raise ValueError("params: optimizer got an empty parameter list")
        self.max_grad_norm = _checks.max_grad_norm(max_grad_norm)
        self.nonfinite = _checks.one_of("nonfinite", nonfinite, _checks.NONFINITE_MODES)
        self.backend = _checks.one_of("backend", backend, _checks.BACKENDS)
        self._check_group(defaults)
        # The params we were given, held weakly and matched by identity: a plain param that is not
        # among them was swapped in by a wrapper (ZeRO's flat partitions, fp32 master copies).
        self._given_params: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._binding_pending = False
        super().__init__(params, defaults)
        self.process_group = process_group if process_group is not None else fsdp1_group(self.param_groups)
        self._grad_layout = GradLayout()
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None

    # --- what subclasses define -------------------------------------------------------------
    def _check_group(self, group: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _state_key_blocks(self, group: Mapping[str, Any]) -> Sequence[frozenset[str]]:
        raise NotImplementedError

    def _init_state(self, param: torch.Tensor, group: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update_group(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: float
    ) -> None:
        raise NotImplementedError

    # --- torch.optim.Optimizer protocol -------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        self._given_params.update((id(p), p) for p in self.param_groups[-1]["params"])

    def bind_params(self, process_group: Any) -> None:
        """For an integration that has replaced the params with its own (DeepSpeed's flat fp32
        partitions or master copies): the grad statistics of the params now in ``param_groups``
        reduce over ``process_group`` (their partitions are disjoint across it), or stay local with
        None (the new params are replicas, identical on every rank)."""
        self.process_group = process_group
        self._given_params.update((id(p), p) for g in self.param_groups for p in g["params"])
        self._binding_pending = False

    def expect_binding(self) -> None:
        """An integration is about to wrap us and will call ``bind_params``; until then statistics
        stay local (DeepSpeed's fp16/bf16 wrappers swap the params and step once on zero grads
        while they are built)."""
        self._binding_pending = True

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float = 1.0):
        """One optimizer step. ``grad_scale`` multiplies the gradients inside the update (gradient
        accumulation passes 1/N here instead of scaling the loss); clipping sees the scaled norm."""
        grad_scale = _checks.positive("grad_scale", grad_scale)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect_grads()
        scale = self._clip_scale(work, grad_scale)
        if scale is None:
            self.skipped_steps += 1
            return loss
        for group, params, grads in work:
            self._update_group(group, params, grads, -scale if group.get("maximize") else scale)
        return loss

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _state_dict.load_into(
            self, state_dict, lambda sd: _state_dict.restore(self, sd, self._state_key_blocks, self._check_group)
        )

    # --- helpers --------------------------------------------------------------------------------
    def _collect_grads(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        work = []
        for gi, group in enumerate(self.param_groups):
            params, grads = [], []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(param {pi} of param group {gi} has a {p.grad.layout} grad)"
                    )
                params.append(p)
                grads.append(p.grad)
            work.append((group, params, grads))
        return work

    def _clip_scale(self, work, grad_scale: float) -> float | None:
        """The scale the update applies to the raw gradients (``grad_scale`` times the clip
        coefficient), or None when the step is to be skipped."""
        if self.max_grad_norm is None and self.nonfinite == "apply":
            return grad_scale
        grads = [g for _, _, gs in work for g in gs]
        if self.process_group is None and active():
            self._refuse_unknown_shards(work, grads)
        stats = global_grad_stats(grads, self.process_group, backend=self.backend, layout=self._grad_layout)
        sumsq, flag = stats.to(device="cpu", dtype=torch.float32)  # the one host sync of a step
        bad = bool(flag > 0) or not bool(torch.isfinite(sumsq))
        norm = sumsq.sqrt() * grad_scale
        self.last_grad_norm = float(norm)
        if bad and self.nonfinite == "raise":
            raise NonFiniteGradientError(f"{type(self).__name__}: a gradient holds inf or NaN (norm {float(norm)})")
        if bad and self.nonfinite == "skip":
            return None
        if self.max_grad_norm is None:
            return grad_scale
        # fp32, as torch.nn.utils.clip_grad_norm_ computes it.
        coef = torch.clamp(self.max_grad_norm / (norm + CLIP_EPS), max=1.0)
        return float(coef) * grad_scale

    def _refuse_unknown_shards(self, work, grads: Sequence[torch.Tensor]) -> None:
        """Plain params we were not given, with several ranks and no group, are some wrapper's
        partitions: local statistics would clip and skip per rank, so refuse instead."""
        if self._binding_pending or any(is_dtensor(g) for g in grads):
            return
        swapped = sum(self._given_params.get(id(p)) is not p for _, params, _ in work for p in params)
        if swapped:
            raise ValueError(
                f"process_group=None: {type(self).__name__} steps {swapped} tensor(s) it was not given "
                "(a wrapper such as DeepSpeed ZeRO replaced the params with its partitions) and cannot "
                "tell which ranks share them, so clipping and non-finite skipping would be decided per "
                "rank. Import dist_optim before deepspeed.initialize (it binds the data-parallel group), "
                "or pass process_group= (the group the partitions are split over)"
            )

    def _state(self, param: torch.Tensor, group: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The param's state, its own key block (the last one) built on first use."""
        state = self.state[param]
        blocks = self._state_key_blocks(group)
        if blocks and not blocks[-1] <= state.keys():
            state.update(self._init_state(param, group))
        return state

    @staticmethod
    def _locals(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return [local_tensor(t) for t in tensors]

    def _states_of(self, states: Sequence[dict[str, torch.Tensor]], keys: Iterable[str]) -> dict[str, list[torch.Tensor]]:
        return {k: self._locals(s[k] for s in states) for k in keys}

    def _step_buckets(self, group: Mapping[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], keys: Sequence[str]):
        """Advance the params' step counts and yield (params, grads, states, t) per distinct count t,
        as local tensors, for the families whose update depends on t."""
        states = [self._state(p, group) for p in params]
        for t, idx in advance(states).items():
            yield (
                self._locals(params[i] for i in idx),
                self._locals(grads[i] for i in idx),
                self._states_of([states[i] for i in idx], keys),
                t,
            )


def step_counter() -> torch.Tensor:
    """A per-param step count, as torch.optim keeps it (0-dim fp32 on the CPU)."""
    return torch.tensor(0.0, dtype=torch.float32)


def advance(states: Sequence[dict[str, torch.Tensor]], key: str = "step") -> dict[int, list[int]]:
    """Increment each state's counter and group the indices by the new count, so that one launch
    serves every tensor sharing bias corrections (params whose grad was None on some steps lag)."""
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, state in enumerate(states):
        state[key] += 1
        buckets[int(state[key])].append(i)
    return buckets

