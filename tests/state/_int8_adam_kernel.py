"""A small update kernel built from triton_kernels._quant, as an int8-state optimizer kernel will
use it: bf16 params, fp32 grads, Adam moments as uint8 codes with per-block absmax (signed map for
m, unsigned for v), the new weight stochastically rounded. The tests run it under the interpreter
against the torch references composed the same way, and compile it for sm_80/sm_90.

A tile is full (no masks, alignment visible to the compiler) or the tensor's tail (masked; the
masked-off lanes enter quantize_tile as 0.0 so they cannot raise the last block's absmax).
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton_kernels._quant import dequantize_tile, quantize_tile, stochastic_round_bf16


@triton.jit
def _load(ptr, mask, other):
    # the unmasked tile takes no `other` (tl.load refuses one without a mask)
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=other)


@triton.jit
def _tile(P, G, MC, MA, VC, VA, SCODE, STHR, UCODE, UTHR, start, offs, rows, mask, row_mask, lr, beta1, beta2, eps,
          seed, QBLOCK: tl.constexpr):
    p = _load(P + offs, mask, 0.0).to(tl.float32)
    g = _load(G + offs, mask, 0.0)
    m = dequantize_tile(_load(MC + offs, mask, 0), _load(MA + rows, row_mask, 0.0),
                        SCODE, QBLOCK)
    v = dequantize_tile(_load(VC + offs, mask, 0), _load(VA + rows, row_mask, 0.0),
                        UCODE, QBLOCK)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    p = p - lr * (m / (tl.sqrt(v) + eps))
    if mask is not None:
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    mc, ma = quantize_tile(m, STHR, QBLOCK)
    vc, va = quantize_tile(v, UTHR, QBLOCK)
    tl.store(MC + offs, mc, mask=mask)
    tl.store(VC + offs, vc, mask=mask)
    tl.store(MA + rows, ma, mask=row_mask)
    tl.store(VA + rows, va, mask=row_mask)
    tl.store(P + offs, stochastic_round_bf16(p, seed, start + offs), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def int8_adam_kernel(P, G, MC, MA, VC, VA, SCODE, STHR, UCODE, UTHR, n, lr, beta1, beta2, eps, seed,
                     BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
    # fp32 as on a GPU: the interpreter would otherwise compute with the float64 launch values
    lr, beta1 = tl.to_tensor(lr).to(tl.float32), tl.to_tensor(beta1).to(tl.float32)
    beta2, eps = tl.to_tensor(beta2).to(tl.float32), tl.to_tensor(eps).to(tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    rows = tl.arange(0, BLOCK // QBLOCK)
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        p, g = tl.multiple_of(P + start, 16), tl.multiple_of(G + start, 16)
        mc, vc = tl.multiple_of(MC + start, 16), tl.multiple_of(VC + start, 16)
        ma, va = MA + pid * (BLOCK // QBLOCK), VA + pid * (BLOCK // QBLOCK)
        _tile(p, g, mc, ma, vc, va, SCODE, STHR, UCODE, UTHR, start, offs, rows, None, None, lr, beta1, beta2, eps,
              seed, QBLOCK)
    else:
        ma, va = MA + pid * (BLOCK // QBLOCK), VA + pid * (BLOCK // QBLOCK)
        _tile(P + start, G + start, MC + start, ma, VC + start, va, SCODE, STHR, UCODE, UTHR, start, offs, rows,
              offs < n - start, rows * QBLOCK < n - start, lr, beta1, beta2, eps, seed, QBLOCK)
