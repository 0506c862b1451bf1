"""Adam / AdamW (with amsgrad) in one pass (see dist_optim.functional.adam)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import chunk_of, moments, typed


@triton.jit
def _adam_kernel(P, G, M, V, VMAX, NUMEL, CHUNK_T, CHUNK_S, lr, beta1, beta2, eps, weight_decay, step_size,
                 bias_correction2_sqrt, grad_scale,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, LERP_LOW: tl.constexpr):
    t, start, n = chunk_of(NUMEL, CHUNK_T, CHUNK_S)
    p_ptr, g_ptr = typed(P, t, P_DTYPE), typed(G, t, G_DTYPE)
    m_ptr, v_ptr, vmax_ptr = typed(M, t, tl.float32), typed(V, t, tl.float32), typed(VMAX, t, tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        p, m, v = moments(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, lr, beta1, beta2, weight_decay, grad_scale,
                          HAS_WD, DECOUPLED, LERP_LOW)
        if AMSGRAD:
            v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
            tl.store(vmax_ptr + offs, v, mask=mask)
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
        p = p + (-step_size) * (m / denom)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def adam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, step_size,
              bias_correction2_sqrt, grad_scale) -> None:
    _multi_tensor.launch(
        _adam_kernel, params, grads,
        [states["exp_avg"], states["exp_avg_sq"], states["max_exp_avg_sq"] if amsgrad else None],
        [lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt, grad_scale],
        HAS_WD=weight_decay != 0.0, DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad), LERP_LOW=(1.0 - beta1) < 0.5,
    )
