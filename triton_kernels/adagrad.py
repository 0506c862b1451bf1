"""Adagrad in one pass (see dist_optim.functional.adagrad)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import (absmax_base, aligned_base, chunk_base, chunk_of, f64, load_param_and_grad, load_state, lr64,
                   quant_tile, rounding_of, scalar, step_count, store_param, store_state)


@triton.jit
def _adagrad_block(p_ptr, g_ptr, s_ptr, sa_ptr, q, rounding, offs, mask, clr, weight_decay, eps, grad_scale,
                   P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr,
                   ROUNDING: tl.constexpr):
    p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD)
    s = load_state(s_ptr, sa_ptr, offs, mask, q, False, QUANT, QBLOCK) + g * g
    store_state(s_ptr, sa_ptr, s, offs, mask, q, False, QUANT, QBLOCK)
    store_param(p_ptr, p + (g * (-clr)) / (tl.sqrt(s) + eps), p, offs, mask, rounding, P_DTYPE, ROUNDING)


@triton.jit
def adagrad_clr(STEPS, t, lr, lr_exact, lr_decay):
    """lr / (1 + (t - 1) * lr_decay) of tensor t at its own step count, as
    dist_optim.functional.adagrad.adagrad_clr computes it on the host (fp64), rounded to fp32. The
    product is fma(a, b, +0.0) — a * b rounded once — so that no compiler contracts it into the add
    (a plain product was, even through a select): one FMA would round once where the host rounds
    twice."""
    step = step_count(STEPS, t)
    decay = tl.fma(step - 1.0, f64(lr_decay), tl.full([], 0.0, tl.float64))
    return (lr64(lr, lr_exact) / (1.0 + decay)).to(tl.float32)


@triton.jit(do_not_specialize=["sr_step"])
def _adagrad_kernel(P, G, S, COMP, SA, STEPS, SEEDS, CHUNKS, SKIP, SCODE, STHR, UCODE, UTHR, clr, weight_decay, eps,
                    grad_scale, lr, lr_exact: tl.float64, lr_decay: tl.float64, sr_step,
                    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_WD: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_STEPS: tl.constexpr, QUANT: tl.constexpr,
                    QBLOCK: tl.constexpr, ROUNDING: tl.constexpr, SR_STEPS: tl.constexpr):
    # QUANT: the sum is int8 codes (S) with per-block absmax (SA), unsigned map.
    # HAS_STEPS: clr comes from this tensor's step count (STEPS), lr and lr_decay; else it is the launcher's.
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    if HAS_STEPS:
        clr = adagrad_clr(STEPS, t, lr, lr_exact, lr_decay)
    else:
        clr = scalar(clr)
    weight_decay = scalar(weight_decay)
    eps = scalar(eps)
    grad_scale = scalar(grad_scale)
    S_DTYPE: tl.constexpr = tl.uint8 if QUANT else tl.float32
    sa = absmax_base(SA, t, start, QBLOCK, QUANT)
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        s = aligned_base(S, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, True)
        for off in range(0, CHUNK, BLOCK):
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _adagrad_block(p, g, s, sa, q, rounding, off + tl.arange(0, BLOCK), None, clr, weight_decay, eps,
                           grad_scale, P_DTYPE, HAS_WD, QUANT, QBLOCK, ROUNDING)
    else:
        p, g, s = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE), chunk_base(S, t, start, S_DTYPE)
        rounding = rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING, SR_STEPS, False)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _adagrad_block(p, g, s, sa, q, rounding, offs, offs < end - start, clr, weight_decay, eps, grad_scale,
                           P_DTYPE, HAS_WD, QUANT, QBLOCK, ROUNDING)


def adagrad_step(params, grads, states, *, clr=None, weight_decay, eps, grad_scale, compile_only: bool = False,
                 skip=None, steps=None, lr=None, lr_decay=None, bf16_update: str = "nearest", sr_seeds=None,
                 sr_step=None) -> None:
    """``clr``: the host's lr / (1 + (t - 1) * lr_decay); or ``steps`` (one one-element fp32 device
    tensor per param, its step count t >= 1 already advanced) with ``lr`` (float or one-element fp32
    device tensor) and ``lr_decay`` (float), and each tensor's clr is derived from its own t.
    ``bf16_update``, ``sr_seeds``, ``sr_step``: the bf16 param store, as for sgd_step."""
    if steps is not None and (lr is None or lr_decay is None):
        raise ValueError("adagrad_step with steps= needs lr and lr_decay")
    rounding = _multi_tensor.rounding(bf16_update, states, sr_seeds, sr_step, steps)
    _multi_tensor.launch(
        _adagrad_kernel, params, grads, [states["sum"]],
        [*_multi_tensor.step_scalars(steps, [clr]), weight_decay, eps, grad_scale, 0.0 if lr is None else lr,
         _multi_tensor.exact(0.0 if lr is None else lr), 0.0 if lr_decay is None else float(lr_decay)],
        compile_only, skip, {"steps": steps}, absmax=_multi_tensor.absmax_roles(states, ["sum"]), rounding=rounding,
        HAS_WD=weight_decay != 0.0, HAS_STEPS=steps is not None,
    )
