"""SGD with momentum, dampening, weight decay and Nesterov, in one pass (see dist_optim.functional.sgd)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import (absmax_base, aligned_base, chunk_base, chunk_of, load_param_and_grad, load_state, quant_tile,
                   rounding_of, scalar, store_param, store_state)


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, ba_ptr, q, rounding, offs, mask, lr, momentum, dampening, weight_decay,
               grad_scale, P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               FIRST: tl.constexpr, NESTEROV: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr,
               ROUNDING: tl.constexpr):
    p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD)
    if HAS_MOMENTUM:
        if FIRST:
            b = g
        else:
            b = load_state(b_ptr, ba_ptr, offs, mask, q, True, QUANT, QBLOCK) * momentum + (1.0 - dampening) * g
        store_state(b_ptr, ba_ptr, b, offs, mask, q, True, QUANT, QBLOCK)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    store_param(p_ptr, p + (-lr) * g, p, offs, mask, rounding, P_DTYPE, ROUNDING)


@triton.jit(do_not_specialize=["sr_step"])
def _sgd_kernel(P, G, B, COMP, BA, STEPS, SEEDS, CHUNKS, SKIP, SCODE, STHR, UCODE, UTHR, lr, momentum, dampening,
                weight_decay, grad_scale, sr_step,
                P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_SKIP: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr, ROUNDING: tl.constexpr,
                SR_STEPS: tl.constexpr):
    # QUANT: the momentum buffer is int8 codes (B) with per-block absmax (BA), signed map.
    # ROUNDING, COMP, SEEDS, STEPS, sr_step, SR_STEPS: the param store (_jit.store_param); SGD's
    # step counters serve only stochastic rounding's stream.
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    S_DTYPE: tl.constexpr = tl.uint8 if QUANT else tl.float32
    ba = absmax_base(BA, t, start, QBLOCK, QUANT)
    lr = scalar(lr)
    momentum = scalar(momentum)
    dampening = scalar(dampening)
    weight_decay = scalar(weight_decay)
    grad_scale = scalar(grad_scale)
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        b = aligned_base(B, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, True)
        for off in range(0, CHUNK, BLOCK):
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _sgd_block(p, g, b, ba, q, rounding, off + tl.arange(0, BLOCK), None, lr, momentum, dampening,
                       weight_decay, grad_scale, P_DTYPE, HAS_WD, HAS_MOMENTUM, FIRST, NESTEROV, QUANT, QBLOCK,
                       ROUNDING)
    else:
        p, g, b = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE), chunk_base(B, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, False)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _sgd_block(p, g, b, ba, q, rounding, offs, offs < end - start, lr, momentum, dampening, weight_decay,
                       grad_scale, P_DTYPE, HAS_WD, HAS_MOMENTUM, FIRST, NESTEROV, QUANT, QBLOCK, ROUNDING)


def sgd_step(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, first_step, grad_scale,
             compile_only: bool = False, skip=None, steps=None, bf16_update: str = "nearest", sr_seeds=None,
             sr_step=None) -> None:
    """``bf16_update`` ("nearest", "stochastic", "kahan"): how bf16 params store the fp32 result
    (dist_optim.state.rounding); "stochastic" takes ``sr_seeds`` (one 0-dim int64 stream base per
    param) and the step count t of the stream: ``sr_step`` (host flow) or ``steps`` (per-param
    one-element fp32 counters, already advanced: device flow); "kahan" updates ``states["kahan_comp"]``."""
    has_momentum = momentum != 0.0
    keys = ["momentum_buffer" if has_momentum else None]
    rounding = _multi_tensor.rounding(bf16_update, states, sr_seeds, sr_step, steps)
    _multi_tensor.launch(
        _sgd_kernel, params, grads, [states[k] if k else None for k in keys],
        [lr, momentum, dampening, weight_decay, grad_scale], compile_only, skip,
        {"steps": steps if rounding.from_steps else None}, absmax=_multi_tensor.absmax_roles(states, keys),
        rounding=rounding,
        HAS_WD=weight_decay != 0.0, HAS_MOMENTUM=has_momentum, FIRST=bool(first_step), NESTEROV=bool(nesterov),
    )
