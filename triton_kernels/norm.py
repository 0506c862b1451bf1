"""The sum of squares of many gradients and a non-finite flag, in one read (see
dist_optim.functional.grad_norm). Each program writes its own partial: no atomics, so the result
is the same bits run after run."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import chunk_of, typed


@triton.jit
def _sumsq_kernel(G, OUT_SQ, OUT_BAD, NUMEL, CHUNK_T, CHUNK_S,
                  G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n = chunk_of(NUMEL, CHUNK_T, CHUNK_S)
    g_ptr = typed(G, t, G_DTYPE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += g * g
        bad = bad | ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
    pid = tl.program_id(0)
    tl.store(OUT_SQ + pid, tl.sum(acc, axis=0))
    tl.store(OUT_BAD + pid, tl.max(bad, axis=0))


def sumsq_nonfinite(grads) -> torch.Tensor:
    """[sum of squares, 1.0 if any element is inf/NaN or the sum overflowed else 0.0], fp32, on the
    first grad's device."""
    out_device = grads[0].device
    partial_sq, partial_bad = [], []
    for (g_dtype, _, device), idx in _multi_tensor.buckets(grads).items():
        for i in idx:
            _multi_tensor.check("grads", [grads[i]], [grads[i]], fp32=False)
        (ptrs,), numels, chunk_t, chunk_s, n = _multi_tensor.tables([grads], idx, device)
        sq = torch.empty(n, dtype=torch.float32, device=device)
        bad = torch.empty(n, dtype=torch.int32, device=device)
        _sumsq_kernel[(n,)](
            ptrs, sq, bad, numels, chunk_t, chunk_s,
            G_DTYPE=_multi_tensor.tl_dtype(g_dtype), CHUNK=_multi_tensor.CHUNK, BLOCK=_multi_tensor.BLOCK,
            num_warps=_multi_tensor.NUM_WARPS,
        )
        partial_sq.append(sq.to(out_device))
        partial_bad.append(bad.to(out_device))
    if not partial_sq:
        return torch.zeros(2, dtype=torch.float32, device=out_device)
    sumsq = torch.cat(partial_sq).sum()
    flag = (torch.cat(partial_bad).max() > 0) | ~torch.isfinite(sumsq)
    return torch.stack([sumsq, flag.to(torch.float32)])
