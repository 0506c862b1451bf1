"""SGD with momentum, dampening, weight decay and Nesterov, in one pass (see dist_optim.functional.sgd)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import aligned_base, chunk_base, chunk_of, load_param_and_grad, scalar


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, offs, mask, lr, momentum, dampening, weight_decay, grad_scale,
               P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
               NESTEROV: tl.constexpr):
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


@triton.jit
def _sgd_kernel(P, G, B, CHUNKS, SKIP, lr, momentum, dampening, weight_decay, grad_scale,
                P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_SKIP: tl.constexpr):
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    lr = scalar(lr)
    momentum = scalar(momentum)
    dampening = scalar(dampening)
    weight_decay = scalar(weight_decay)
    grad_scale = scalar(grad_scale)
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        b = aligned_base(B, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            _sgd_block(p, g, b, off + tl.arange(0, BLOCK), None, lr, momentum, dampening, weight_decay, grad_scale,
                       P_DTYPE, HAS_WD, HAS_MOMENTUM, FIRST, NESTEROV)
    else:
        p, g, b = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE), chunk_base(B, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _sgd_block(p, g, b, offs, offs < end - start, lr, momentum, dampening, weight_decay, grad_scale,
                       P_DTYPE, HAS_WD, HAS_MOMENTUM, FIRST, NESTEROV)


def sgd_step(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, first_step, grad_scale,
             compile_only: bool = False, skip=None) -> None:
    has_momentum = momentum != 0.0
    _multi_tensor.launch(
        _sgd_kernel, params, grads, [states["momentum_buffer"] if has_momentum else None],
        [lr, momentum, dampening, weight_decay, grad_scale], compile_only, skip,
        HAS_WD=weight_decay != 0.0, HAS_MOMENTUM=has_momentum, FIRST=bool(first_step), NESTEROV=bool(nesterov),
    )
