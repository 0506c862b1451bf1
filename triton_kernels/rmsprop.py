"""RMSprop with optional momentum and centering in one pass (see dist_optim.functional.rmsprop)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import aligned_base, chunk_base, chunk_of, lerp, load_param_and_grad, scalar


@triton.jit
def _rmsprop_block(p_ptr, g_ptr, sq_ptr, ga_ptr, mb_ptr, offs, mask, lr, alpha, eps, weight_decay, momentum,
                   grad_scale, P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr, CENTERED: tl.constexpr,
                   HAS_MOMENTUM: tl.constexpr, LERP_LOW: tl.constexpr):
    p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD)
    sq = tl.load(sq_ptr + offs, mask=mask) * alpha + (1.0 - alpha) * (g * g)
    tl.store(sq_ptr + offs, sq, mask=mask)
    if CENTERED:
        ga = lerp(tl.load(ga_ptr + offs, mask=mask), g, 1.0 - alpha, LERP_LOW)
        tl.store(ga_ptr + offs, ga, mask=mask)
        avg = tl.sqrt(sq - ga * ga) + eps
    else:
        avg = tl.sqrt(sq) + eps
    if HAS_MOMENTUM:
        mb = tl.load(mb_ptr + offs, mask=mask) * momentum + g / avg
        tl.store(mb_ptr + offs, mb, mask=mask)
        p = p + (-lr) * mb
    else:
        p = p + (-lr) * (g / avg)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


@triton.jit
def _rmsprop_kernel(P, G, SQ, GA, MB, CHUNKS, SKIP, lr, alpha, eps, weight_decay, momentum, grad_scale,
                    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_WD: tl.constexpr, CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, LERP_LOW: tl.constexpr,
                    HAS_SKIP: tl.constexpr):
    t, start, end, fast = chunk_of(CHUNKS, SKIP, HAS_SKIP)
    lr = scalar(lr)
    alpha = scalar(alpha)
    eps = scalar(eps)
    weight_decay = scalar(weight_decay)
    momentum = scalar(momentum)
    grad_scale = scalar(grad_scale)
    if fast:
        p, g = aligned_base(P, t, start, P_DTYPE), aligned_base(G, t, start, G_DTYPE)
        sq, ga = aligned_base(SQ, t, start, tl.float32), aligned_base(GA, t, start, tl.float32)
        mb = aligned_base(MB, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            _rmsprop_block(p, g, sq, ga, mb, off + tl.arange(0, BLOCK), None, lr, alpha, eps, weight_decay, momentum,
                           grad_scale, P_DTYPE, HAS_WD, CENTERED, HAS_MOMENTUM, LERP_LOW)
    else:
        p, g = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE)
        sq, ga = chunk_base(SQ, t, start, tl.float32), chunk_base(GA, t, start, tl.float32)
        mb = chunk_base(MB, t, start, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _rmsprop_block(p, g, sq, ga, mb, offs, offs < end - start, lr, alpha, eps, weight_decay, momentum,
                           grad_scale, P_DTYPE, HAS_WD, CENTERED, HAS_MOMENTUM, LERP_LOW)


def rmsprop_step(params, grads, states, *, lr, alpha, eps, weight_decay, momentum, centered, grad_scale,
                 compile_only: bool = False, skip=None) -> None:
    has_momentum = momentum > 0.0
    _multi_tensor.launch(
        _rmsprop_kernel, params, grads,
        [states["square_avg"], states["grad_avg"] if centered else None, states["momentum_buffer"] if has_momentum else None],
        [lr, alpha, eps, weight_decay, momentum, grad_scale], compile_only, skip,
        HAS_WD=weight_decay != 0.0, CENTERED=bool(centered), HAS_MOMENTUM=has_momentum, LERP_LOW=(1.0 - alpha) < 0.5,
    )
