"""RAdam in one pass, with Ranger's Lookahead sync folded in on sync steps, and the sync alone
(see dist_optim.functional.radam and .lookahead)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import aligned_base, chunk_base, chunk_of, moments, scalar


@triton.jit
def _radam_block(p_ptr, g_ptr, m_ptr, v_ptr, slow_ptr, offs, mask, lr, beta1, beta2, eps, weight_decay, step_size,
                 lookahead_alpha, grad_scale, rect, sync_limit, P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr,
                 DECOUPLED: tl.constexpr, RECTIFIED: tl.constexpr, SYNC: tl.constexpr, LERP_LOW: tl.constexpr):
    # RECTIFIED and SYNC: False, True, or 2 = decided at run time by a device flag (rect; sync_limit:
    # the chunk-local end of the elements to sync, 0 on a step without sync).
    p, m, v = moments(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, lr, beta1, beta2, weight_decay, grad_scale,
                      HAS_WD, DECOUPLED, LERP_LOW)
    if RECTIFIED == 2:
        p = p + (-step_size) * tl.where(rect, m / (tl.sqrt(v) + eps), m)
    elif RECTIFIED:
        p = p + (-step_size) * (m / (tl.sqrt(v) + eps))
    else:
        p = p + (-step_size) * m
    if SYNC == 2:  # slow weights read and written only on a sync step: sync_limit is 0 otherwise
        sync_mask = offs < sync_limit
        slow = tl.load(slow_ptr + offs, mask=sync_mask)
        slow = slow + lookahead_alpha * (p - slow)
        tl.store(slow_ptr + offs, slow, mask=sync_mask)
        p = tl.where(sync_mask, slow, p)
    elif SYNC:  # the fp32 result feeds the slow weights before any rounding to the param dtype
        slow = tl.load(slow_ptr + offs, mask=mask)
        slow = slow + lookahead_alpha * (p - slow)
        tl.store(slow_ptr + offs, slow, mask=mask)
        p = slow
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


@triton.jit
def _radam_kernel(P, G, M, V, SLOW, CHUNKS, SKIP, lr, beta1, beta2, eps, weight_decay, step_size,
                  lookahead_alpha, grad_scale, rect_flag, sync_flag,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, RECTIFIED: tl.constexpr, SYNC: tl.constexpr,
                  LERP_LOW: tl.constexpr, HAS_SKIP: tl.constexpr):
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    lr = scalar(lr)
    beta1 = scalar(beta1)
    beta2 = scalar(beta2)
    eps = scalar(eps)
    weight_decay = scalar(weight_decay)
    step_size = scalar(step_size)
    lookahead_alpha = scalar(lookahead_alpha)
    grad_scale = scalar(grad_scale)
    rect = scalar(rect_flag) != 0.0
    do_sync = scalar(sync_flag) != 0.0
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        m, v = aligned_base(M, t, start, tl.float32), aligned_base(V, t, start, tl.float32)
        slow = aligned_base(SLOW, t, start, tl.float32)
        sync_limit = tl.where(do_sync, CHUNK, 0)
        for off in range(0, CHUNK, BLOCK):
            _radam_block(p, g, m, v, slow, off + tl.arange(0, BLOCK), None, lr, beta1, beta2, eps, weight_decay,
                         step_size, lookahead_alpha, grad_scale, rect, sync_limit, P_DTYPE, HAS_WD, DECOUPLED, RECTIFIED,
                         SYNC, LERP_LOW)
    else:
        p, g = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE)
        m, v = chunk_base(M, t, start, tl.float32), chunk_base(V, t, start, tl.float32)
        slow = chunk_base(SLOW, t, start, tl.float32)
        sync_limit = tl.where(do_sync, (end - start).to(tl.int32), 0)  # at most CHUNK
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _radam_block(p, g, m, v, slow, offs, offs < end - start, lr, beta1, beta2, eps, weight_decay,
                         step_size, lookahead_alpha, grad_scale, rect, sync_limit, P_DTYPE, HAS_WD, DECOUPLED, RECTIFIED,
                         SYNC, LERP_LOW)


@triton.jit
def _sync_block(p_ptr, slow_ptr, offs, mask, alpha, P_DTYPE: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    slow = tl.load(slow_ptr + offs, mask=mask)
    slow = slow + alpha * (p - slow)
    tl.store(slow_ptr + offs, slow, mask=mask)
    tl.store(p_ptr + offs, slow.to(P_DTYPE), mask=mask)


@triton.jit
def _sync_kernel(P, G, SLOW, CHUNKS, SKIP, alpha,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_SKIP: tl.constexpr):
    # G is the launcher's grad role, unused: the sync reads no gradient.
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    alpha = scalar(alpha)
    if fast:
        p, slow = aligned_base(P, t, start, P_DTYPE), aligned_base(SLOW, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            _sync_block(p, slow, off + tl.arange(0, BLOCK), None, alpha, P_DTYPE)
    else:
        p, slow = chunk_base(P, t, start, P_DTYPE), chunk_base(SLOW, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _sync_block(p, slow, offs, offs < end - start, alpha, P_DTYPE)


def radam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, rectified, step_size,
               lookahead_alpha, grad_scale, compile_only: bool = False, skip=None, sync=None) -> None:
    """``rectified``: a bool, or a one-element fp32 device flag (nonzero: the adaptive step), for a
    step whose rectification is decided on the device. With ``lookahead_alpha`` set, Ranger's sync
    is folded in: on every call, or, given ``sync`` (a one-element fp32 device flag), only where it
    is nonzero — the slow weights are then read and written on sync steps only."""
    has_slow = lookahead_alpha is not None
    rect_on_device = isinstance(rectified, torch.Tensor)
    _multi_tensor.launch(
        _radam_kernel, params, grads,
        [states["exp_avg"], states["exp_avg_sq"], states["slow_buffer"] if has_slow else None],
        [lr, beta1, beta2, eps, weight_decay, step_size, lookahead_alpha if has_slow else 0.0, grad_scale,
         rectified if rect_on_device else 0.0, sync if has_slow and sync is not None else 0.0], compile_only, skip,
        HAS_WD=weight_decay != 0.0, DECOUPLED=bool(decoupled), RECTIFIED=2 if rect_on_device else bool(rectified),
        SYNC=(2 if sync is not None else True) if has_slow else False, LERP_LOW=(1.0 - beta1) < 0.5,
    )


def lookahead_sync(params, slow_buffers, *, alpha, compile_only: bool = False, skip=None) -> None:
    _multi_tensor.launch(_sync_kernel, params, params, [slow_buffers], [alpha], compile_only, skip)
