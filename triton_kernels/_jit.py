"""Pieces every kernel shares: where this program's chunk is, typed pointers from the tables, and
lerp computed as torch computes it (so the kernels match the torch path to the last bit where the
arithmetic allows)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_of(NUMEL, CHUNK_T, CHUNK_S):
    """(tensor index, first element, tensor size) of this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(CHUNK_T + pid)
    return t, tl.load(CHUNK_S + pid), tl.load(NUMEL + t)


@triton.jit
def typed(TABLE, t, DTYPE: tl.constexpr):
    """Tensor t's data pointer from a pointer table, as a pointer to DTYPE."""
    return tl.load(TABLE + t).to(tl.pointer_type(DTYPE))


@triton.jit
def lerp(start, end, weight, LOW: tl.constexpr):
    """torch.lerp: start + w*(end-start) for w < 0.5 (LOW), else end - (end-start)*(1-w)."""
    if LOW:
        return start + weight * (end - start)
    else:
        return end - (end - start) * (1.0 - weight)


@triton.jit
def load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, COUPLED_WD: tl.constexpr):
    """fp32 param and scaled grad, with coupled (L2) weight decay added to the grad when asked."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_scale
    if COUPLED_WD:
        g = g + weight_decay * p
    return p, g


@triton.jit
def moments(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, lr, beta1, beta2, weight_decay, grad_scale,
            HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr):
    """Adam's and RAdam's shared part: weight decay, m = lerp(m, g, 1 - beta1), v = beta2 v +
    (1 - beta2) g^2; stores m and v, returns (p, m, v) in fp32."""
    p, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD and not DECOUPLED)
    if HAS_WD and DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    m = lerp(tl.load(m_ptr + offs, mask=mask), g, 1.0 - beta1, LERP_LOW)
    v = tl.load(v_ptr + offs, mask=mask) * beta2 + (1.0 - beta2) * (g * g)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    return p, m, v
