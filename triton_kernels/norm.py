"""The sum of squares of many gradients and a non-finite flag, in one read (see
dist_optim.functional.grad_norm), in two kinds of launch: one partials launch per (grad dtype,
device) bucket, each program writing its own (sum of squares, non-finite) pair into one buffer at
its bucket's offset, then one single-program launch summing the partials in a fixed order. No
atomics: the result is the same bits run after run."""

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


@triton.jit(do_not_specialize=["offset"])
def _sumsq_kernel(G, PARTIALS, offset, CHUNKS, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # offset: this bucket's first program in PARTIALS (not specialized: every bucket one compile).
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
    pair = PARTIALS + 2 * (offset + tl.program_id(0).to(tl.int64))
    tl.store(pair, tl.sum(acc, axis=0))
    tl.store(pair + 1, tl.max(bad, axis=0).to(tl.float32))


@triton.jit(do_not_specialize=["n"])
def _sumsq_finish_kernel(PARTIALS, OUT, n, BLOCK: tl.constexpr):
    # One program, BLOCK lanes striding over the n pairs, then one tree: a fixed order.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, n, BLOCK):
        i = off + tl.arange(0, BLOCK).to(tl.int64)
        mask = i < n
        acc += tl.load(PARTIALS + 2 * i, mask=mask, other=0.0)
        bad = tl.maximum(bad, tl.load(PARTIALS + 2 * i + 1, mask=mask, other=0.0))
    sumsq = tl.sum(acc, axis=0)
    flag = (tl.max(bad, axis=0) > 0.0) | (sumsq != sumsq) | (sumsq == float("inf"))
    tl.store(OUT, sumsq)
    tl.store(OUT + 1, flag.to(tl.float32))


def _plan(grads) -> list:
    """Per device: (device, [(grad dtype, pointer table, chunk table, chunks)] per bucket), built
    with the grads' full checks (a cached plan is reused while the grads match it, see
    _multi_tensor.TableCache.plan)."""
    by_device: dict = {}
    for (g_dtype, _, device), idx in _multi_tensor.buckets(grads).items():
        picked = [grads[i] for i in idx]
        _multi_tensor.check("grads", picked, picked, fp32=False)
        (ptrs,), chunks, n = _multi_tensor.tables([grads], idx, device)
        by_device.setdefault(device, []).append((g_dtype, ptrs, chunks, n))
    return list(by_device.items())


def _partials(plans, device: torch.device) -> torch.Tensor:
    """One partials launch per bucket (all on ``device``) into one buffer of (sumsq, flag) pairs."""
    partials = torch.empty(2 * sum(n for *_, n in plans), dtype=torch.float32, device=device)
    offset = 0
    for g_dtype, ptrs, chunks, n in plans:
        _launch.run(
            _sumsq_kernel, (n,), device, ptrs, partials, offset, chunks,
            G_DTYPE=_multi_tensor.tl_dtype(g_dtype), CHUNK=_multi_tensor.CHUNK, BLOCK=_multi_tensor.BLOCK,
            num_warps=_multi_tensor.NUM_WARPS,
        )
        offset += n
    return partials


def sumsq_nonfinite(grads) -> torch.Tensor:
    """[sum of squares, 1.0 if any element is inf/NaN or the sum overflowed else 0.0], fp32, on the
    first grad's device: a partials launch per (grad dtype, device) bucket and one finishing launch.
    Grads on several devices (rare) have their partials copied to the first grad's device first."""
    out_device = grads[0].device
    by_device = _multi_tensor.TABLES.plan([grads], 0, lambda: _plan(grads))
    if not by_device:
        return torch.zeros(2, dtype=torch.float32, device=out_device)
    parts = [_partials(plans, device) for device, plans in by_device]
    partials = parts[0] if len(parts) == 1 else torch.cat([p.to(out_device) for p in parts])
    out = torch.empty(2, dtype=torch.float32, device=out_device)
    _launch.run(_sumsq_finish_kernel, (1,), out_device, partials, out, partials.numel() // 2,
                BLOCK=_multi_tensor.BLOCK, num_warps=_multi_tensor.NUM_WARPS)
    return out
