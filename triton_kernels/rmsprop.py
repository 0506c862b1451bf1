"""RMSprop with optional momentum and centering in one pass (see dist_optim.functional.rmsprop)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import (absmax_base, aligned_base, chunk_base, chunk_of, lerp, load_param_and_grad, load_state, quant_tile,
                   rounding_of, scalar, store_param, store_state)


@triton.jit
def _rmsprop_block(p_ptr, g_ptr, sq_ptr, ga_ptr, mb_ptr, sqa_ptr, gaa_ptr, mba_ptr, q, rounding, offs, mask, lr,
                   alpha, one_minus_alpha, eps, weight_decay, momentum, grad_scale, P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr,
                   CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, LERP_LOW: tl.constexpr, QUANT: tl.constexpr,
                   QBLOCK: tl.constexpr, ROUNDING: tl.constexpr):
    p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD)
    # torch's order: v * alpha, then addcmul's (value * g) * g, with 1 - alpha rounded from the host's
    # double (an fp32 1 - alpha differs: 1 - fp32(0.99) is not fp32(0.01))
    sq = load_state(sq_ptr, sqa_ptr, offs, mask, q, False, QUANT, QBLOCK) * alpha + (one_minus_alpha * g) * g
    store_state(sq_ptr, sqa_ptr, sq, offs, mask, q, False, QUANT, QBLOCK)
    if CENTERED:
        ga = lerp(load_state(ga_ptr, gaa_ptr, offs, mask, q, True, QUANT, QBLOCK), g, one_minus_alpha, LERP_LOW)
        store_state(ga_ptr, gaa_ptr, ga, offs, mask, q, True, QUANT, QBLOCK)
        var = sq - ga * ga
        if QUANT:  # rounded moments can leave sq a little below ga^2 (see dist_optim.functional.rmsprop)
            var = tl.where(var < 0.0, 0.0, var)  # NaN stays NaN, as torch's clamp_min keeps it
        avg = tl.sqrt(var) + eps
    else:
        avg = tl.sqrt(sq) + eps
    if HAS_MOMENTUM:
        mb = load_state(mb_ptr, mba_ptr, offs, mask, q, True, QUANT, QBLOCK) * momentum + g / avg
        store_state(mb_ptr, mba_ptr, mb, offs, mask, q, True, QUANT, QBLOCK)
        new = p + (-lr) * mb
    else:
        new = p + (-lr) * (g / avg)
    store_param(p_ptr, new, p, offs, mask, rounding, P_DTYPE, ROUNDING)


@triton.jit(do_not_specialize=["sr_step"])
def _rmsprop_kernel(P, G, SQ, GA, MB, COMP, SQA, GAA, MBA, STEPS, SEEDS, CHUNKS, SKIP, SCODE, STHR, UCODE, UTHR, lr,
                    alpha, one_minus_alpha, eps, weight_decay, momentum, grad_scale, sr_step,
                    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_WD: tl.constexpr, CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, LERP_LOW: tl.constexpr,
                    HAS_SKIP: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr, ROUNDING: tl.constexpr,
                    SR_STEPS: tl.constexpr):
    # QUANT: square_avg (unsigned map), grad_avg and momentum_buffer (signed) are int8 codes with
    # per-block absmax (SQA, GAA, MBA). The step counters (STEPS) serve only stochastic rounding.
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    S_DTYPE: tl.constexpr = tl.uint8 if QUANT else tl.float32
    sqa = absmax_base(SQA, t, start, QBLOCK, QUANT)
    gaa = absmax_base(GAA, t, start, QBLOCK, QUANT)
    mba = absmax_base(MBA, t, start, QBLOCK, QUANT)
    lr = scalar(lr)
    alpha = scalar(alpha)
    one_minus_alpha = scalar(one_minus_alpha)
    eps = scalar(eps)
    weight_decay = scalar(weight_decay)
    momentum = scalar(momentum)
    grad_scale = scalar(grad_scale)
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        sq, ga = aligned_base(SQ, t, start, S_DTYPE), aligned_base(GA, t, start, S_DTYPE)
        mb = aligned_base(MB, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, True)
        for off in range(0, CHUNK, BLOCK):
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _rmsprop_block(p, g, sq, ga, mb, sqa, gaa, mba, q, rounding, off + tl.arange(0, BLOCK), None, lr, alpha,
                           one_minus_alpha, eps, weight_decay, momentum, grad_scale, P_DTYPE, HAS_WD, CENTERED,
                           HAS_MOMENTUM, LERP_LOW, QUANT, QBLOCK, ROUNDING)
    else:
        p, g = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE)
        sq, ga = chunk_base(SQ, t, start, S_DTYPE), chunk_base(GA, t, start, S_DTYPE)
        mb = chunk_base(MB, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, False)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _rmsprop_block(p, g, sq, ga, mb, sqa, gaa, mba, q, rounding, offs, offs < end - start, lr, alpha,
                           one_minus_alpha, eps, weight_decay, momentum, grad_scale, P_DTYPE, HAS_WD, CENTERED,
                           HAS_MOMENTUM, LERP_LOW, QUANT, QBLOCK, ROUNDING)


def rmsprop_step(params, grads, states, *, lr, alpha, eps, weight_decay, momentum, centered, grad_scale,
                 compile_only: bool = False, skip=None, steps=None, bf16_update: str = "nearest", sr_seeds=None,
                 sr_step=None) -> None:
    """``bf16_update``, ``sr_seeds``, ``sr_step``, ``steps``: the bf16 param store, as for sgd_step."""
    has_momentum = momentum > 0.0
    keys = ["square_avg", "grad_avg" if centered else None, "momentum_buffer" if has_momentum else None]
    rounding = _multi_tensor.rounding(bf16_update, states, sr_seeds, sr_step, steps)
    _multi_tensor.launch(
        _rmsprop_kernel, params, grads, [states[k] if k else None for k in keys],
        [lr, alpha, 1.0 - alpha, eps, weight_decay, momentum, grad_scale], compile_only, skip,
        {"steps": steps if rounding.from_steps else None}, absmax=_multi_tensor.absmax_roles(states, keys),
        rounding=rounding,
        HAS_WD=weight_decay != 0.0, CENTERED=bool(centered), HAS_MOMENTUM=has_momentum, LERP_LOW=(1.0 - alpha) < 0.5,
    )
