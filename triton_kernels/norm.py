"""The sum of squares of many gradients and a non-finite flag, in one read (see
dist_optim.functional.grad_norm). Each program writes its own partial: no atomics, so the result
is the same bits run after run."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch, _multi_tensor
from ._jit import aligned_base, chunk_base, chunk_of


@triton.jit
def _sumsq_block(g, acc, bad):
    g = g.to(tl.float32)
    return acc + g * g, bad | ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)


@triton.jit
def _sumsq_kernel(G, OUT_SQ, OUT_BAD, CHUNKS, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end, fast = chunk_of(CHUNKS, CHUNKS, False)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    if fast:
        g = aligned_base(G, t, start, G_DTYPE)
        for off in range(0, CHUNK, BLOCK):
            acc, bad = _sumsq_block(tl.load(g + off + tl.arange(0, BLOCK)), acc, bad)
    else:
        g = chunk_base(G, t, start, G_DTYPE)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            acc, bad = _sumsq_block(tl.load(g + offs, mask=offs < end - start, other=0.0), acc, bad)
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
        (ptrs,), chunks, n = _multi_tensor.tables([grads], idx, device)
        sq = torch.empty(n, dtype=torch.float32, device=device)
        bad = torch.empty(n, dtype=torch.int32, device=device)
        _launch.run(
            _sumsq_kernel, (n,), device, ptrs, sq, bad, chunks,
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
