"""One launch per (param dtype, grad dtype, device) bucket over many tensors, through pointer tables.

For a bucket the launcher builds, on the device, one int64 table of data pointers per role (param,
grad, each state), the tensors' sizes, and a chunk table: program i handles elements
[chunk_start[i], chunk_start[i] + CHUNK) of tensor chunk_tensor[i], in BLOCK-sized steps. Empty
tensors get no program.

Block sizes are fixed rather than autotuned: the kernels update in place through pointer tables,
and triton.autotune's benchmarking would replay the update on the real tensors (its restore_value
sees the tables, not the data they point to). An element-wise, memory-bound kernel is insensitive
to the choice past 1024 elements x 4 warps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ._support import interpreting

# Interpreter sizes are small so that tests at a few thousand elements cross chunk and block edges.
CHUNK, BLOCK = (256, 64) if interpreting() else (16384, 1024)
NUM_WARPS = 4


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    try:
        return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}: params and grads must be fp32, bf16 or fp16") from None


def check(name: str, reference: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], *, fp32: bool) -> None:
    if len(tensors) != len(reference):
        raise ValueError(f"{name}: {len(tensors)} tensors for {len(reference)} params")
    for i, (r, t) in enumerate(zip(reference, tensors)):
        if t.numel() != r.numel():
            raise ValueError(f"{name}[{i}] has {t.numel()} elements, its param {r.numel()}")
        if t.device != r.device:
            raise ValueError(f"{name}[{i}] is on {t.device}, its param on {r.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous")
        if fp32 and t.dtype != torch.float32:
            raise ValueError(f"{name}[{i}] is {t.dtype}; optimizer state must be fp32")


def buckets(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None = None) -> dict:
    """Indices of the non-empty tensors per (param dtype, grad dtype, device), in order."""
    out: dict = defaultdict(list)
    for i, p in enumerate(params):
        if p.numel():
            out[(p.dtype, None if grads is None else grads[i].dtype, p.device)].append(i)
    return out


def _pointers(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def tables(roles: Sequence[Sequence[torch.Tensor] | None], idx: Sequence[int], device: torch.device):
    """(pointer table per role — the first role's stands in for absent ones, which the kernel's
    constexpr switches never read — sizes, chunk tensor index, chunk start, number of chunks)."""
    first = [roles[0][i] for i in idx]
    numels = [t.numel() for t in first]
    chunk_tensor, chunk_start = [], []
    for j, n in enumerate(numels):
        for start in range(0, n, CHUNK):
            chunk_tensor.append(j)
            chunk_start.append(start)
    ptrs = [_pointers([role[i] for i in idx] if role is not None else first, device) for role in roles]
    return (
        ptrs,
        torch.tensor(numels, dtype=torch.int64, device=device),
        torch.tensor(chunk_tensor, dtype=torch.int32, device=device),
        torch.tensor(chunk_start, dtype=torch.int64, device=device),
        len(chunk_tensor),
    )


def launch(kernel, params, grads, states: Sequence[Sequence[torch.Tensor] | None], scalars: Sequence[float], **constexprs) -> None:
    """Run an update kernel ``kernel[(chunks,)](P, G, *states, NUMEL, CHUNK_T, CHUNK_S, *scalars, ...)``
    once per bucket. ``states`` entries may be None (the kernel's switches say they are absent)."""
    check("grads", params, grads, fp32=False)
    for s in states:
        if s is not None:
            check("state", params, s, fp32=True)
    for (p_dtype, g_dtype, device), idx in buckets(params, grads).items():
        ptrs, numels, chunk_t, chunk_s, n = tables([params, grads, *states], idx, device)
        kernel[(n,)](
            *ptrs, numels, chunk_t, chunk_s, *scalars,
            P_DTYPE=tl_dtype(p_dtype), G_DTYPE=tl_dtype(g_dtype), CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
            **constexprs,
        )
