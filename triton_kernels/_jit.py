"""Pieces every kernel shares: where this program's chunk is, typed pointers from the tables, and
lerp computed as torch computes it (so the kernels match the torch path to the last bit where the
arithmetic allows)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_of(NUMEL, CHUNK_T, CHUNK_S):
    """(tensor index, first element, tensor size) of this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(CHUNK_T + pid)
    return t, tl.load(CHUNK_S + pid), tl.load(NUMEL + t)


@triton.jit
def typed(TABLE, t, DTYPE: tl.constexpr):
    """Tensor t's data pointer from a pointer table, as a pointer to DTYPE."""
    return tl.load(TABLE + t).to(tl.pointer_type(DTYPE))


@triton.jit
def lerp(start, end, weight, LOW: tl.constexpr):
    """torch.lerp: start + w*(end-start) for w < 0.5 (LOW), else end - (end-start)*(1-w)."""
    if LOW:
        return start + weight * (end - start)
    else:
        return end - (end - start) * (1.0 - weight)
