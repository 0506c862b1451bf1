"""Adam / AdamW (with amsgrad) in one pass (see dist_optim.functional.adam)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import (aligned_base, chunk_base, chunk_of, f64, load_state, lr64, moments, powers, quant_tile,
                   rounding_of, scalar, step_count, store_param, store_state)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ma_ptr, va_ptr, vmaxa_ptr, q, rounding, offs, mask, lr, beta1,
                beta2, eps, weight_decay, step_size, bias_correction2_sqrt, grad_scale, P_DTYPE: tl.constexpr,
                HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, LERP_LOW: tl.constexpr,
                QUANT: tl.constexpr, QBLOCK: tl.constexpr, ROUNDING: tl.constexpr):
    p_old, p, m, v = moments(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, lr, beta1, beta2, weight_decay, grad_scale,
                      HAS_WD, DECOUPLED, LERP_LOW, ma_ptr, va_ptr, q, QUANT, QBLOCK)
    if AMSGRAD:
        v = tl.maximum(load_state(vmax_ptr, vmaxa_ptr, offs, mask, q, False, QUANT, QBLOCK), v)
        store_state(vmax_ptr, vmaxa_ptr, v, offs, mask, q, False, QUANT, QBLOCK)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    store_param(p_ptr, p + (-step_size) * (m / denom), p_old, offs, mask, rounding, P_DTYPE, ROUNDING)


@triton.jit
def adam_scalars(STEPS, t, lr, lr_exact, beta1_exact, beta2_exact):
    """(step_size, bias_correction2_sqrt) of tensor t at its own step count, as
    dist_optim.functional.adam computes them on the host: lr / (1 - beta1**t) and
    sqrt(1 - beta2**t) in fp64, each rounded to fp32 (as a float argument is)."""
    beta1_t, beta2_t = powers(f64(beta1_exact), f64(beta2_exact), step_count(STEPS, t))
    step_size = lr64(lr, lr_exact) / (1.0 - beta1_t)
    return step_size.to(tl.float32), tl.sqrt(1.0 - beta2_t).to(tl.float32)


@triton.jit(do_not_specialize=["sr_step"])
def _adam_kernel(P, G, M, V, VMAX, COMP, MA, VA, VMAXA, STEPS, SEEDS, CHUNKS, SKIP, SCODE, STHR, UCODE, UTHR, lr, beta1,
                 beta2, eps, weight_decay, step_size, bias_correction2_sqrt, grad_scale, lr_exact: tl.float64,
                 beta1_exact: tl.float64, beta2_exact: tl.float64, sr_step,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, LERP_LOW: tl.constexpr,
                 HAS_SKIP: tl.constexpr, HAS_STEPS: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr,
                 ROUNDING: tl.constexpr, SR_STEPS: tl.constexpr):
    # HAS_STEPS: step_size and bias_correction2_sqrt come from this tensor's step count (STEPS), from
    # the exact (fp64) lr, beta1 and beta2; otherwise they are the launcher's. QUANT: the moments are
    # int8 codes (M, V, VMAX) with per-block absmax (MA, VA, VMAXA), dequantized and requantized here.
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    if HAS_STEPS:
        step_size, bias_correction2_sqrt = adam_scalars(STEPS, t, lr, lr_exact, beta1_exact, beta2_exact)
    else:
        step_size = scalar(step_size)
        bias_correction2_sqrt = scalar(bias_correction2_sqrt)
    lr = scalar(lr)
    beta1 = scalar(beta1)
    beta2 = scalar(beta2)
    eps = scalar(eps)
    weight_decay = scalar(weight_decay)
    grad_scale = scalar(grad_scale)
    S_DTYPE: tl.constexpr = tl.uint8 if QUANT else tl.float32
    if QUANT:
        ma = chunk_base(MA, t, start // QBLOCK, tl.float32)
        va = chunk_base(VA, t, start // QBLOCK, tl.float32)
        vmaxa = chunk_base(VMAXA, t, start // QBLOCK, tl.float32)
    else:
        ma, va, vmaxa = MA, VA, VMAXA
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        m, v = aligned_base(M, t, start, S_DTYPE), aligned_base(V, t, start, S_DTYPE)
        vmax = aligned_base(VMAX, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, True)
        for off in range(0, CHUNK, BLOCK):
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _adam_block(p, g, m, v, vmax, ma, va, vmaxa, q, rounding, off + tl.arange(0, BLOCK), None, lr, beta1,
                        beta2, eps, weight_decay, step_size, bias_correction2_sqrt, grad_scale, P_DTYPE, HAS_WD,
                        DECOUPLED, AMSGRAD, LERP_LOW, QUANT, QBLOCK, ROUNDING)
    else:
        p, g = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE)
        m, v = chunk_base(M, t, start, S_DTYPE), chunk_base(V, t, start, S_DTYPE)
        vmax = chunk_base(VMAX, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, False)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _adam_block(p, g, m, v, vmax, ma, va, vmaxa, q, rounding, offs, offs < end - start, lr, beta1, beta2, eps,
                        weight_decay, step_size, bias_correction2_sqrt, grad_scale, P_DTYPE, HAS_WD, DECOUPLED, AMSGRAD,
                        LERP_LOW, QUANT, QBLOCK, ROUNDING)


def adam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, step_size=None,
              bias_correction2_sqrt=None, grad_scale, compile_only: bool = False, skip=None, steps=None,
              bf16_update: str = "nearest", sr_seeds=None, sr_step=None) -> None:
    """States may be fp32 or int8 (dist_optim.state.layout: ``<key>_absmax`` beside the codes); one
    launch takes one kind. ``steps``: one one-element fp32 device tensor per param holding its step count t >= 1, already
    advanced for this step; the kernel then derives step_size and bias_correction2_sqrt per tensor
    (pass None for them). Without ``steps`` the caller passes both. ``bf16_update``, ``sr_seeds``,
    ``sr_step``: the bf16 param store, as for sgd_step."""
    keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else None]
    rounding = _multi_tensor.rounding(bf16_update, states, sr_seeds, sr_step, steps)
    _multi_tensor.launch(
        _adam_kernel, params, grads, [states[k] if k else None for k in keys],
        [lr, beta1, beta2, eps, weight_decay, *_multi_tensor.step_scalars(steps, [step_size, bias_correction2_sqrt]), grad_scale,
         _multi_tensor.exact(lr), float(beta1), float(beta2)],
        compile_only, skip, {"steps": steps}, absmax=_multi_tensor.absmax_roles(states, keys), rounding=rounding,
        HAS_WD=weight_decay != 0.0, DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad), LERP_LOW=(1.0 - beta1) < 0.5,
        HAS_STEPS=steps is not None,
    )

