"""Adagrad in one pass (see dist_optim.functional.adagrad)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import aligned_base, chunk_base, chunk_of, load_param_and_grad, scalar


@triton.jit
def _adagrad_block(p_ptr, g_ptr, s_ptr, offs, mask, clr, weight_decay, eps, grad_scale,
                   P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr):
    p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD)
    s = tl.load(s_ptr + offs, mask=mask) + g * g
    tl.store(s_ptr + offs, s, mask=mask)
    p = p + (g * (-clr)) / (tl.sqrt(s) + eps)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


@triton.jit
def _adagrad_kernel(P, G, S, CHUNKS, SKIP, clr, weight_decay, eps, grad_scale,
                    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_WD: tl.constexpr, HAS_SKIP: tl.constexpr):
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    clr = scalar(clr)
    weight_decay = scalar(weight_decay)
    eps = scalar(eps)
    grad_scale = scalar(grad_scale)
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        s = aligned_base(S, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            _adagrad_block(p, g, s, off + tl.arange(0, BLOCK), None, clr, weight_decay, eps, grad_scale, P_DTYPE, HAS_WD)
    else:
        p, g, s = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE), chunk_base(S, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _adagrad_block(p, g, s, offs, offs < end - start, clr, weight_decay, eps, grad_scale, P_DTYPE, HAS_WD)


def adagrad_step(params, grads, states, *, clr, weight_decay, eps, grad_scale, compile_only: bool = False,
                 skip=None) -> None:
    _multi_tensor.launch(
        _adagrad_kernel, params, grads, [states["sum"]], [clr, weight_decay, eps, grad_scale], compile_only, skip,
        HAS_WD=weight_decay != 0.0,
    )
