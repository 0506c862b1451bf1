"""Adagrad in one pass (see dist_optim.functional.adagrad)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import chunk_of, load_param_and_grad, typed


@triton.jit
def _adagrad_kernel(P, G, S, NUMEL, CHUNK_T, CHUNK_S, clr, weight_decay, eps, grad_scale,
                    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_WD: tl.constexpr):
    t, start, n = chunk_of(NUMEL, CHUNK_T, CHUNK_S)
    p_ptr, g_ptr, s_ptr = typed(P, t, P_DTYPE), typed(G, t, G_DTYPE), typed(S, t, tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD)
        s = tl.load(s_ptr + offs, mask=mask) + g * g
        tl.store(s_ptr + offs, s, mask=mask)
        p = p + (g * (-clr)) / (tl.sqrt(s) + eps)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def adagrad_step(params, grads, states, *, clr, weight_decay, eps, grad_scale) -> None:
    _multi_tensor.launch(
        _adagrad_kernel, params, grads, [states["sum"]], [clr, weight_decay, eps, grad_scale],
        HAS_WD=weight_decay != 0.0,
    )
