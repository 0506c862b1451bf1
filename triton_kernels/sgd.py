"""SGD with momentum, dampening, weight decay and Nesterov, in one pass (see dist_optim.functional.sgd)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import chunk_of, load_param_and_grad, typed


@triton.jit
def _sgd_kernel(P, G, B, NUMEL, CHUNK_T, CHUNK_S, lr, momentum, dampening, weight_decay, grad_scale,
                P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr):
    t, start, n = chunk_of(NUMEL, CHUNK_T, CHUNK_S)
    p_ptr, g_ptr, b_ptr = typed(P, t, P_DTYPE), typed(G, t, G_DTYPE), typed(B, t, tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD)
        if HAS_MOMENTUM:
            if FIRST:
                b = g
            else:
                b = tl.load(b_ptr + offs, mask=mask) * momentum + (1.0 - dampening) * g
            tl.store(b_ptr + offs, b, mask=mask)
            if NESTEROV:
                g = g + momentum * b
            else:
                g = b
        tl.store(p_ptr + offs, (p + (-lr) * g).to(P_DTYPE), mask=mask)


def sgd_step(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, first_step, grad_scale) -> None:
    has_momentum = momentum != 0.0
    _multi_tensor.launch(
        _sgd_kernel, params, grads, [states["momentum_buffer"] if has_momentum else None],
        [lr, momentum, dampening, weight_decay, grad_scale],
        HAS_WD=weight_decay != 0.0, HAS_MOMENTUM=has_momentum, FIRST=bool(first_step), NESTEROV=bool(nesterov),
    )
