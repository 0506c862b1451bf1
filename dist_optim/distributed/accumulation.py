"""Gradient accumulation across ranks.

Non-boundary micro-steps run without gradient synchronisation (FSDP2's
``set_requires_gradient_sync(False)``, DDP/FSDP1's ``no_sync()``); the boundary micro-step syncs;
the 1/N of the average is folded into the optimizer's grad scale rather than the loss. Ranks that
hold different numbers of micro-batches agree on each window's size with one small all-reduce
(MIN), so nobody waits in a collective that another rank never enters.

    accum = GradientAccumulation(model, optimizer, micro_steps=4)
    for window in accum.windows(loader):
        for batch, sync in accum.micro_batches(window):
            with sync:
                loss_fn(model(batch)).backward()
        accum.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .. import _checks
from .collectives import all_reduce_scalars


def _sync_context(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """A context in which backward does (or does not) reduce gradients across ranks."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)

        @contextlib.contextmanager
        def fsdp2():
            model.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp2()
    if not sync and hasattr(model, "no_sync"):  # DDP, FSDP1
        return model.no_sync()
    return contextlib.nullcontext()


class GradientAccumulation:
    """Accumulate ``micro_steps`` micro-batches per optimizer step, rank-consistently."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, micro_steps: int, *, process_group: Any = None) -> None:
        self.micro_steps = _checks.positive_int("micro_steps", micro_steps)
        self.model, self.optimizer, self.process_group = model, optimizer, process_group
        self._window = 0

    def windows(self, batches: Iterable[Any]) -> Iterator[list[Any]]:
        """Lists of micro-batches of the same length on every rank: up to ``micro_steps``, fewer at
        the end when some rank runs short (its surplus is dropped, as drop_last would). Stops on
        every rank as soon as one rank has no batch left."""
        it = iter(batches)
        while True:
            window = []
            for batch in it:
                window.append(batch)
                if len(window) == self.micro_steps:
                    break
            (agreed,) = all_reduce_scalars([len(window)], op=dist.ReduceOp.MIN, group=self.process_group)
            agreed = int(agreed)
            if agreed == 0:
                return
            self._window = agreed
            yield window[:agreed]

    def micro_batches(self, window: list[Any]) -> Iterator[tuple[Any, contextlib.AbstractContextManager]]:
        """Each micro-batch with the context its forward and backward run in: gradient sync off
        except on the last one."""
        self._window = len(window)
        for i, batch in enumerate(window):
            yield batch, _sync_context(self.model, sync=i == len(window) - 1)

    def step(self, closure=None):
        """The optimizer step over the accumulated gradients (averaged via the grad scale), then
        ``zero_grad``."""
        if self._window < 1:
            raise RuntimeError("GradientAccumulation.step() before any micro-batch of a window")
        loss = self.optimizer.step(closure, grad_scale=1.0 / self._window)
        self.optimizer.zero_grad(set_to_none=True)
        self._window = 0
        return loss
