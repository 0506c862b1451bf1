"""RAdam in one pass, with Ranger's Lookahead sync folded in on sync steps, and the sync alone
(see dist_optim.functional.radam and .lookahead). A step's rectification and step size can come from
each tensor's own step count on the device (``steps=``), and whether a tensor syncs from its own
Lookahead count (``la_steps=``, ``k=``): no host sync decides either."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import (aligned_base, chunk_base, chunk_of, f64, lr64, moments, powers, quant_tile, round_param,
                   rounding_of, scalar, step_count, store_param, to_dtype)


@triton.jit
def _radam_block(p_ptr, g_ptr, m_ptr, v_ptr, slow_ptr, ma_ptr, va_ptr, q, rounding, offs, mask, lr, beta1, beta2, eps,
                 weight_decay, step_size, lookahead_alpha, grad_scale, rect, sync_limit, P_DTYPE: tl.constexpr,
                 HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, RECTIFIED: tl.constexpr, SYNC: tl.constexpr,
                 LERP_LOW: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr, ROUNDING: tl.constexpr,
                 SLOW_DTYPE: tl.constexpr):
    # RECTIFIED and SYNC: False, True, or 2 = decided per tensor at run time from its counters (rect;
    # sync_limit: the chunk-local end of the elements to sync, 0 when the tensor does not sync).
    p_old, p, m, v = moments(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, lr, beta1, beta2, weight_decay, grad_scale,
                             HAS_WD, DECOUPLED, LERP_LOW, ma_ptr, va_ptr, q, QUANT, QBLOCK)
    if RECTIFIED == 2:
        p = p + (-step_size) * tl.where(rect, m / (tl.sqrt(v) + eps), m)
    elif RECTIFIED:
        p = p + (-step_size) * (m / (tl.sqrt(v) + eps))
    else:
        p = p + (-step_size) * m
    if SYNC == 2:  # slow weights read and written only on a sync step: sync_limit is 0 otherwise
        sync_mask = offs < sync_limit
        synced = pull_slow(slow_ptr, p, offs, sync_mask, lookahead_alpha, P_DTYPE, SLOW_DTYPE)
        new, comp, comp_old = round_param(p, p_old, offs, mask, rounding, P_DTYPE, ROUNDING)
        tl.store(p_ptr + offs, tl.where(sync_mask, synced, new), mask=mask)
        if ROUNDING == 2:  # a sync leaves the Kahan buffer as it was (rewritten unchanged: one unmasked store)
            tl.store(rounding[2] + offs, tl.where(sync_mask, comp_old, comp), mask=mask)
    elif SYNC:  # the fp32 result feeds the slow weights before any rounding to the param dtype
        tl.store(p_ptr + offs, pull_slow(slow_ptr, p, offs, mask, lookahead_alpha, P_DTYPE, SLOW_DTYPE), mask=mask)
    else:
        store_param(p_ptr, p, p_old, offs, mask, rounding, P_DTYPE, ROUNDING)


@triton.jit
def pull_slow(slow_ptr, p, offs, mask, alpha, P_DTYPE: tl.constexpr, SLOW_DTYPE: tl.constexpr):
    """Lookahead's sync of an fp32 fast tile ``p``: slow += alpha * (p - slow) in fp32, stored in
    SLOW_DTYPE (nearest); returns the stored slow value rounded to nearest in P_DTYPE, the param's
    new value (the stored value itself when the dtypes agree)."""
    slow = tl.load(slow_ptr + offs, mask=mask).to(tl.float32)
    slow = to_dtype(slow + alpha * (p - slow), SLOW_DTYPE)
    tl.store(slow_ptr + offs, slow, mask=mask)
    if SLOW_DTYPE == P_DTYPE:
        return slow
    else:
        return to_dtype(slow.to(tl.float32), P_DTYPE)


@triton.jit
def radam_scalars(STEPS, t, lr, lr_exact, beta1_exact, beta2_exact, rho_threshold):
    """(rectified, step_size) of tensor t at its own step count, as
    dist_optim.functional.radam.radam_step_size computes them on the host, operation for operation
    in fp64; the step size rounded to fp32 (as a float argument is)."""
    step = step_count(STEPS, t)
    beta2 = f64(beta2_exact)
    beta1_t, beta2_t = powers(f64(beta1_exact), beta2, step)
    lr = lr64(lr, lr_exact)
    bias_correction1 = 1.0 - beta1_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    rectified = rho_t > f64(rho_threshold)
    ratio = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
    rect = tl.sqrt(tl.where(rectified, ratio, 1.0))  # the ratio can be negative where it goes unused
    adaptive = lr * rect * tl.sqrt(1.0 - beta2_t) / bias_correction1
    step_size = tl.where(rectified, adaptive, lr / bias_correction1)
    return rectified, step_size.to(tl.float32)


@triton.jit
def syncs(LA_STEPS, t, k):
    """Whether tensor t takes Lookahead's sync this step: its (advanced) count is a multiple of k (a
    float argument, as every hyperparameter: an int would specialize the kernel on k == 1)."""
    return step_count(LA_STEPS, t).to(tl.int32) % scalar(k).to(tl.int32) == 0


@triton.jit(do_not_specialize=["sr_step"])
def _radam_kernel(P, G, M, V, SLOW, COMP, MA, VA, SLOWA, STEPS, LA_STEPS, SEEDS, CHUNKS, SKIP, SCODE, STHR, UCODE, UTHR,
                  lr, beta1, beta2, eps, weight_decay, step_size, lookahead_alpha, grad_scale, k, lr_exact: tl.float64,
                  beta1_exact: tl.float64, beta2_exact: tl.float64, rho_threshold: tl.float64, sr_step,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, RECTIFIED: tl.constexpr, SYNC: tl.constexpr,
                  LERP_LOW: tl.constexpr, HAS_SKIP: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr,
                  ROUNDING: tl.constexpr, SR_STEPS: tl.constexpr, SLOW_DTYPE: tl.constexpr):
    # QUANT: m and v are int8 codes (M, V) with per-block absmax (MA, VA); the slow weights are never
    # quantized (SLOWA is the launcher's placeholder for their absent absmax): SLOW_DTYPE, fp32 math.
    # ROUNDING, COMP, SEEDS, sr_step, SR_STEPS: the param store on a step that does not sync.
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    if RECTIFIED == 2:
        rect, step_size = radam_scalars(STEPS, t, lr, lr_exact, beta1_exact, beta2_exact, rho_threshold)
    else:
        rect = RECTIFIED
        step_size = scalar(step_size)
    if SYNC == 2:
        do_sync = syncs(LA_STEPS, t, k)
    else:
        do_sync = SYNC
    lr = scalar(lr)
    beta1 = scalar(beta1)
    beta2 = scalar(beta2)
    eps = scalar(eps)
    weight_decay = scalar(weight_decay)
    lookahead_alpha = scalar(lookahead_alpha)
    grad_scale = scalar(grad_scale)
    S_DTYPE: tl.constexpr = tl.uint8 if QUANT else tl.float32
    if QUANT:
        ma = chunk_base(MA, t, start // QBLOCK, tl.float32)
        va = chunk_base(VA, t, start // QBLOCK, tl.float32)
    else:
        ma, va = MA, VA
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        m, v = aligned_base(M, t, start, S_DTYPE), aligned_base(V, t, start, S_DTYPE)
        slow = aligned_base(SLOW, t, start, SLOW_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, True)
        sync_limit = tl.where(do_sync, CHUNK, 0)
        for off in range(0, CHUNK, BLOCK):
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _radam_block(p, g, m, v, slow, ma, va, q, rounding, off + tl.arange(0, BLOCK), None, lr, beta1, beta2, eps,
                         weight_decay, step_size, lookahead_alpha, grad_scale, rect, sync_limit, P_DTYPE, HAS_WD,
                         DECOUPLED, RECTIFIED, SYNC, LERP_LOW, QUANT, QBLOCK, ROUNDING, SLOW_DTYPE)
    else:
        p, g = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE)
        m, v = chunk_base(M, t, start, S_DTYPE), chunk_base(V, t, start, S_DTYPE)
        slow = chunk_base(SLOW, t, start, SLOW_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, False)
        sync_limit = tl.where(do_sync, (end - start).to(tl.int32), 0)  # at most CHUNK
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _radam_block(p, g, m, v, slow, ma, va, q, rounding, offs, offs < end - start, lr, beta1, beta2, eps,
                         weight_decay, step_size, lookahead_alpha, grad_scale, rect, sync_limit, P_DTYPE, HAS_WD,
                         DECOUPLED, RECTIFIED, SYNC, LERP_LOW, QUANT, QBLOCK, ROUNDING, SLOW_DTYPE)


@triton.jit
def _sync_block(p_ptr, slow_ptr, offs, mask, alpha, P_DTYPE: tl.constexpr, SLOW_DTYPE: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    tl.store(p_ptr + offs, pull_slow(slow_ptr, p, offs, mask, alpha, P_DTYPE, SLOW_DTYPE), mask=mask)


@triton.jit
def _sync_kernel(P, G, SLOW, LA_STEPS, CHUNKS, SKIP, alpha, k,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_SKIP: tl.constexpr, HAS_LA_STEPS: tl.constexpr, SLOW_DTYPE: tl.constexpr):
    # G is the launcher's grad role, unused: the sync reads no gradient. With HAS_LA_STEPS, a tensor
    # whose Lookahead count is no multiple of k gets an empty chunk: nothing read, nothing written.
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    if HAS_LA_STEPS:
        do_sync = syncs(LA_STEPS, t, k)
        end = tl.where(do_sync, end, start)
        fast = fast & do_sync
    alpha = scalar(alpha)
    if fast:
        p, slow = aligned_base(P, t, start, P_DTYPE), aligned_base(SLOW, t, start, SLOW_DTYPE)
        for off in range(0, CHUNK, BLOCK):
            _sync_block(p, slow, off + tl.arange(0, BLOCK), None, alpha, P_DTYPE, SLOW_DTYPE)
    else:
        p, slow = chunk_base(P, t, start, P_DTYPE), chunk_base(SLOW, t, start, SLOW_DTYPE)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _sync_block(p, slow, offs, offs < end - start, alpha, P_DTYPE, SLOW_DTYPE)


def radam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, rectified=None,
               step_size=None, lookahead_alpha, grad_scale, compile_only: bool = False, skip=None, steps=None,
               rho_threshold=None, la_steps=None, k=None, bf16_update: str = "nearest", sr_seeds=None,
               sr_step=None) -> None:
    """``rectified`` (bool) and ``step_size``: the host's decision and size; or ``steps`` (one
    one-element fp32 device tensor per param, its step count t >= 1 already advanced) with
    ``rho_threshold`` (float), and each tensor's are derived from its own t (pass None for
    rectified and step_size). With ``lookahead_alpha`` set, Ranger's sync is folded in: for every
    tensor, or, given ``la_steps`` (per-param one-element fp32 Lookahead counters, already advanced)
    and ``k``, for the tensors whose count is a multiple of k — the slow weights are read and written
    only for those. Slow weights (``states["slow_buffer"]``) may be fp32, bf16 or fp16: fp32 math,
    stored rounded to nearest; a syncing tensor's param gets the stored slow value (nearest).
    ``bf16_update``, ``sr_seeds``, ``sr_step``: the bf16 param store of a step that does not sync,
    as for sgd_step (a sync leaves the Kahan buffer as it is)."""
    has_slow = lookahead_alpha is not None
    if steps is not None and rho_threshold is None:
        raise ValueError("radam_step with steps= needs rho_threshold")
    if rectified is None and steps is None:
        raise ValueError("radam_step needs rectified and step_size, or steps=")
    if isinstance(rectified, torch.Tensor):
        raise ValueError("rectified is the host's bool; for a decision on the device pass steps=")
    la = sync_counters(has_slow, la_steps, k)
    quant = _multi_tensor.absmax_roles(states, ["exp_avg", "exp_avg_sq"])
    rounding = _multi_tensor.rounding(bf16_update, states, sr_seeds, sr_step, steps)
    _multi_tensor.launch(
        _radam_kernel, params, grads,
        [states["exp_avg"], states["exp_avg_sq"], states["slow_buffer"] if has_slow else None],
        [lr, beta1, beta2, eps, weight_decay, *_multi_tensor.step_scalars(steps, [step_size]),
         lookahead_alpha if has_slow else 0.0, grad_scale, float(k) if la is not None else 1.0,
         _multi_tensor.exact(lr), float(beta1), float(beta2), 0.0 if rho_threshold is None else float(rho_threshold)],
        compile_only, skip, {"steps": steps, "la_steps": la}, absmax=quant + [None], rounding=rounding, slow_role=2,
        HAS_WD=weight_decay != 0.0, DECOUPLED=bool(decoupled), RECTIFIED=2 if steps is not None else bool(rectified),
        SYNC=(2 if la is not None else True) if has_slow else False, LERP_LOW=(1.0 - beta1) < 0.5,
    )


def lookahead_sync(params, slow_buffers, *, alpha, la_steps=None, k=None, compile_only: bool = False,
                   skip=None) -> None:
    """slow += alpha * (p - slow); p = slow: for every tensor, or, given ``la_steps`` (per-param
    one-element fp32 Lookahead counters, already advanced) and ``k``, for those whose count is a
    multiple of k. Slow buffers may be fp32, bf16 or fp16 (one dtype per param dtype): fp32 math,
    the slow value stored rounded to nearest, and the param set to it (rounded to nearest)."""
    la = sync_counters(True, la_steps, k)
    _multi_tensor.launch(_sync_kernel, params, params, [slow_buffers], [alpha, float(k) if la is not None else 1.0],
                         compile_only, skip, {"la_steps": la}, slow_role=0, HAS_LA_STEPS=la is not None)


def sync_counters(has_slow: bool, la_steps, k):
    """la_steps when the sync is decided per tensor on the device, else None."""
    if la_steps is None:
        return None
    if not has_slow:
        raise ValueError("la_steps= needs lookahead_alpha")
    if k is None or int(k) < 1:
        raise ValueError(f"la_steps= needs k >= 1, got {k!r}")
    return la_steps
