"""SGD with momentum, dampening, weight decay and Nesterov, in one pass (see dist_optim.functional.sgd)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _multi_tensor
from ._jit import absmax_base, aligned_base, chunk_base, chunk_of, load_param_and_grad, load_state, quant_tile, scalar, store_state


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, ba_ptr, q, offs, mask, lr, momentum, dampening, weight_decay, grad_scale,
               P_DTYPE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
               NESTEROV: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr):
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
    tl.store(p_ptr + offs, (p + (-lr) * g).to(P_DTYPE), mask=mask)


@triton.jit
def _sgd_kernel(P, G, B, BA, CHUNKS, SKIP, SCODE, STHR, UCODE, UTHR, lr, momentum, dampening, weight_decay, grad_scale,
                P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_SKIP: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr):
    # QUANT: the momentum buffer is int8 codes (B) with per-block absmax (BA), signed map.
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
        for off in range(0, CHUNK, BLOCK):
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _sgd_block(p, g, b, ba, q, off + tl.arange(0, BLOCK), None, lr, momentum, dampening, weight_decay,
                       grad_scale, P_DTYPE, HAS_WD, HAS_MOMENTUM, FIRST, NESTEROV, QUANT, QBLOCK)
    else:
        p, g, b = chunk_base(P, t, start, P_DTYPE), chunk_base(G, t, start, G_DTYPE), chunk_base(B, t, start, S_DTYPE)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            q = quant_tile(off, end - start, SCODE, STHR, UCODE, UTHR, BLOCK, QBLOCK, QUANT)
            _sgd_block(p, g, b, ba, q, offs, offs < end - start, lr, momentum, dampening, weight_decay, grad_scale,
                       P_DTYPE, HAS_WD, HAS_MOMENTUM, FIRST, NESTEROV, QUANT, QBLOCK)


def sgd_step(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, first_step, grad_scale,
             compile_only: bool = False, skip=None) -> None:
    has_momentum = momentum != 0.0
    keys = ["momentum_buffer" if has_momentum else None]
    _multi_tensor.launch(
        _sgd_kernel, params, grads, [states[k] if k else None for k in keys],
        [lr, momentum, dampening, weight_decay, grad_scale], compile_only, skip,
        absmax=_multi_tensor.absmax_roles(states, keys),
        HAS_WD=weight_decay != 0.0, HAS_MOMENTUM=has_momentum, FIRST=bool(first_step), NESTEROV=bool(nesterov),
    )
