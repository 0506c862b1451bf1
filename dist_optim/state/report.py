"""``optimizer.memory_report()``: the bytes of optimizer state this rank holds, by mode.

Built on ``accounting.state_bytes`` (a DTensor counts its local shard; a tensor referenced twice
counts once). Each state entry falls in one class: ``int8`` (codes and absmax of int8 moments),
``counters`` (per-param step counts), or by its dtype: ``fp32`` (fp32 moments, including those of
params below the min-size rule, fp32 slow weights), ``bf16`` (``bf16_update="kahan"``'s
compensation buffers, bf16 slow weights) or ``fp16`` (fp16 slow weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .accounting import _local, state_bytes
from .layout import ABSMAX_SUFFIX, absmax_key

COUNTER_KEYS = frozenset({"step", "lookahead_step"})
# The 16-bit state classes by dtype; every other tensor (fp32 state) reports as "fp32".
_DTYPE_CLASSES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class MemoryReport:
    total: int = 0  # bytes of state, this rank
    int8: int = 0  # codes and absmax of int8 moments
    fp32: int = 0  # fp32 state tensors
    bf16: int = 0  # bf16 state tensors (Kahan compensation, slow weights)
    fp16: int = 0  # fp16 state tensors (slow weights)
    counters: int = 0  # step counters
    params_int8: int = 0  # params with int8 moments
    params_fp32: int = 0  # params with state but no int8 moment
    numel: int = 0  # local elements of the params with state
    per_entry: dict = field(default_factory=dict)  # entry name -> bytes

    @property
    def bytes_per_element(self) -> float:
        """State bytes per local param element (fp32 AdamW: 8 plus counters; int8: about 2, and
        2 more with a bf16 Kahan buffer)."""
        return self.total / self.numel if self.numel else 0.0


def memory_report(state: Mapping[torch.Tensor, Mapping[str, Any]]) -> MemoryReport:
    """The report of ``optimizer.state`` (param -> {name: value})."""
    report = MemoryReport(per_entry=dict(state_bytes(state).per_entry))
    classed: dict = {}  # (param number, name) -> {class: value}: state_bytes then sums per class
    for i, (param, entries) in enumerate(state.items()):
        if not entries:
            continue
        keys = {k for k in entries if isinstance(k, str)}
        quantized = {k for k in keys if absmax_key(k) in keys}
        if quantized:
            report.params_int8 += 1
        else:
            report.params_fp32 += 1
        if isinstance(param, torch.Tensor):
            report.numel += _local(param).numel()
        for k, v in entries.items():
            if k in COUNTER_KEYS:
                cls = "counters"
            elif k in quantized or (isinstance(k, str) and k.endswith(ABSMAX_SUFFIX)):
                cls = "int8"
            else:
                cls = _DTYPE_CLASSES.get(_local(v).dtype, "fp32") if isinstance(v, torch.Tensor) else "fp32"
            classed[(i, k)] = {cls: v}
    sized = state_bytes(classed)
    report.total = sized.total
    report.int8 = sized.per_entry.get("int8", 0)
    report.fp32 = sized.per_entry.get("fp32", 0)
    report.counters = sized.per_entry.get("counters", 0)
    report.bf16 = sized.per_entry.get("bf16", 0)
    report.fp16 = sized.per_entry.get("fp16", 0)
    return report
