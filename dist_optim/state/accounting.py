"""Bytes of optimizer state, as ``optimizer.memory_report()`` will report them, and which tensors
keep fp32 state under ``state_dtype="int8"``.

Bytes are those this rank holds: a DTensor counts its local shard. A tensor referenced twice
(the same storage, offset, size and dtype) is counted once; non-tensor entries (step counts kept as
Python numbers) count nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .blockwise import num_blocks

# Tensors below this many elements keep fp32 state under state_dtype="int8" (the rule of
# bitsandbytes' 8-bit optimizers): biases and norm weights, whose state is a negligible share of
# the bytes and whose per-channel statistics gain nothing from a per-block scale. Decided on the
# param's full (unsharded) element count, so that every rank and every later shard layout agrees.
MIN_QUANTIZED_NUMEL = 4096


def quantizes(full_numel: int, min_numel: int = MIN_QUANTIZED_NUMEL) -> bool:
    """Whether a param of ``full_numel`` elements (all ranks together) gets int8 state."""
    return full_numel >= min_numel


def int8_state_bytes(numel: int, block: int) -> int:
    """Bytes of one int8 state tensor of ``numel`` local elements: a code per element and an fp32
    absmax per block."""
    return numel + 4 * num_blocks(numel, block)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: this rank's shard
    return to_local() if callable(to_local) else t


def tensor_bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


@dataclass
class StateBytes:
    total: int = 0
    per_param: dict = field(default_factory=dict)  # state key (a param or its index) -> bytes
    per_entry: dict = field(default_factory=dict)  # entry name ("exp_avg", "exp_avg.absmax", ...) -> bytes


def state_bytes(state: Mapping[Any, Mapping[str, Any]]) -> StateBytes:
    """Bytes of the tensors in ``optimizer.state`` (param -> {name: value}) or a state dict's
    ``"state"`` (index -> {name: value}), in total, per param and per entry name. Nested
    mappings (e.g. {"codes": ..., "absmax": ...}) are walked, their names joined with '.'."""
    report, seen = StateBytes(), set()

    def walk(key, name: str, value) -> int:
        if isinstance(value, torch.Tensor):
            t = _local(value)
            ident = (t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t),
                     t.storage_offset(), t.numel(), t.dtype, t.device)
            if t.numel() and ident in seen:
                return 0
            seen.add(ident)
            n = tensor_bytes(t)
            report.per_entry[name] = report.per_entry.get(name, 0) + n
            return n
        if isinstance(value, Mapping):
            return sum(walk(key, f"{name}.{k}" if name else str(k), v) for k, v in value.items())
        return 0

    for key, entries in state.items():
        n = walk(key, "", entries)
        report.per_param[key] = n
        report.total += n
    return report
