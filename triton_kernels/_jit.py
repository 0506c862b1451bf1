"""Pieces every kernel shares: where this program's chunk is, typed chunk pointers from the tables,
and lerp computed as torch computes it (so the kernels match the torch path to the last bit where
the arithmetic allows).

Every update kernel has the same shape (see _multi_tensor for the tables)::

    t, start, end, fast = chunk_of(CHUNKS)
    if fast:   # a full chunk of a tensor whose pointers are all 16-byte aligned
        p = aligned_base(P, t, start, P_DTYPE)              # int64 base, alignment hint
        for off in range(0, CHUNK, BLOCK):
            block(p, ..., off + tl.arange(0, BLOCK), None)  # no mask: 128-bit accesses
    else:      # a tail, or a tensor at an odd address
        p = chunk_base(P, t, start, P_DTYPE)
        for off in range(0, CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            block(p, ..., offs, offs < end - start)

The bases are built inside each branch: ``tl.multiple_of`` marks the operation that defines its
argument, so a base shared by both branches would carry the hint into the unaligned one.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._quant import dequantize_tile, fmix32, quantize_tile, round_nearest_bf16, stochastic_round_bf16

ALIGN: tl.constexpr = tl.constexpr(16)  # bytes; _multi_tensor.ALIGN decides which chunks are fast


@triton.jit
def chunk_of(CHUNKS, SKIP, HAS_SKIP: tl.constexpr):
    """(tensor index, first element, end element, fast) of this program's chunk, all int64. When
    the device flag SKIP is set (a step decided on the device to be skipped), the chunk is empty:
    every access is masked off and nothing changes."""
    row = CHUNKS + tl.program_id(0).to(tl.int64) * 4
    t, start, end, fast = tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3) != 0
    if HAS_SKIP:
        skip = tl.load(SKIP) != 0
        end = tl.where(skip, start, end)
        fast = fast & ~skip
    return t, start, end, fast


@triton.jit
def scalar(x):
    """A hyperparameter passed as a float, or as a pointer to a one-element fp32 device tensor
    (a value that changes per step without a host sync or a recompile: lr, bias corrections, the
    clip scale)."""
    x = tl.to_tensor(x)
    if x.dtype.is_ptr():
        return tl.load(x).to(tl.float32)
    else:
        return x


@triton.jit
def chunk_base(TABLE, t, start, DTYPE: tl.constexpr):
    """Tensor t's data pointer from a pointer table, as a DTYPE pointer, advanced to element
    ``start`` (int64 arithmetic)."""
    return tl.load(TABLE + t).to(tl.pointer_type(DTYPE)) + start


@triton.jit
def aligned_base(TABLE, t, start, DTYPE: tl.constexpr):
    """chunk_base of a fast chunk, with its 16-byte alignment made visible to the compiler."""
    return tl.multiple_of(tl.load(TABLE + t).to(tl.pointer_type(DTYPE)) + start, ALIGN)


@triton.jit
def lerp(start, end, weight, LOW: tl.constexpr):
    """torch.lerp: start + w*(end-start) for w < 0.5 (LOW), else end - (end-start)*(1-w)."""
    if LOW:
        return start + weight * (end - start)
    else:
        return end - (end - start) * (1.0 - weight)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest (even) in DTYPE. bf16 goes through the bits: the GPU's own
    conversion, and also what the interpreter computes (its own conversion truncates)."""
    if DTYPE == tl.bfloat16:
        return round_nearest_bf16(x)
    else:
        return x.to(DTYPE)


# ---------------------------------------------------------------------------------------------
# The param store of every update kernel: the fp32 result ``x`` rounded into the param's dtype.
# ROUNDING (dist_optim.state.rounding; the launcher passes 0 unless the params are bf16):
#   0 nearest: to_dtype(x)
#   1 stochastic: stochastic_round_bf16(x, stream, index), index the element's int64 index in its
#     tensor, stream = fmix32(base ^ fmix32(t)) of the tensor's base (an int64 table entry) and its
#     step count t (from the STEPS counters in the device flow, the launcher's sr_step otherwise)
#   2 kahan: (p, comp) = kahan_add_bf16(p_old, comp, x - p_old) with comp a bf16 state tile
# ``rounding`` bundles what a tile's store needs: (stream, chunk start, comp pointer).


@triton.jit
def rounding_of(SEEDS, STEPS, COMP, t, start, sr_step, ROUNDING: tl.constexpr, FROM_STEPS: tl.constexpr,
                ALIGNED: tl.constexpr):
    """``rounding`` of tensor t's chunk at element ``start``; the comp pointer carries the chunk's
    alignment hint when ALIGNED (a fast chunk)."""
    if ROUNDING == 1:
        base = tl.load(chunk_base(SEEDS, t, 0, tl.int64))
        if FROM_STEPS:
            step = step_count(STEPS, t).to(tl.int64)
        else:
            step = tl.to_tensor(sr_step).to(tl.int64)
        step32 = (step & 0xFFFFFFFF).to(tl.uint32)
        stream = fmix32((base & 0xFFFFFFFF).to(tl.uint32) ^ fmix32(step32))
    else:
        stream = tl.full([], 0, tl.uint32)
    if ROUNDING == 2:
        if ALIGNED:
            comp = aligned_base(COMP, t, start, tl.bfloat16)
        else:
            comp = chunk_base(COMP, t, start, tl.bfloat16)
    else:
        comp = COMP
    return stream, start, comp


@triton.jit
def round_param(x, p_old, offs, mask, rounding, P_DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """(new param tile in P_DTYPE, new comp tile, old comp tile) of the fp32 result ``x``; the comp
    tiles are bf16 under kahan and 0 otherwise. ``p_old``: the fp32 value of the param before the step."""
    stream, start, comp_ptr = rounding
    if ROUNDING == 1:
        return stochastic_round_bf16(x, stream, start + offs), 0, 0
    elif ROUNDING == 2:
        # _quant.kahan_add_bf16 with delta = x - p_old, written out on p_old as loaded (fp32)
        comp = tl.load(comp_ptr + offs, mask=mask)
        y = (x - p_old) + comp.to(tl.float32)
        new = round_nearest_bf16(p_old + y)
        return new, round_nearest_bf16(y - (new.to(tl.float32) - p_old)), comp
    else:
        return to_dtype(x, P_DTYPE), 0, 0


@triton.jit
def store_param(p_ptr, x, p_old, offs, mask, rounding, P_DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """Store the fp32 result ``x`` into the param (and its Kahan buffer) as ROUNDING says."""
    new, comp, _ = round_param(x, p_old, offs, mask, rounding, P_DTYPE, ROUNDING)
    tl.store(p_ptr + offs, new, mask=mask)
    if ROUNDING == 2:
        tl.store(rounding[2] + offs, comp, mask=mask)


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
            HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr,
            ma_ptr, va_ptr, q, QUANT: tl.constexpr, QBLOCK: tl.constexpr):
    """Adam's and RAdam's shared part: weight decay, m = lerp(m, g, 1 - beta1), v = beta2 v +
    (1 - beta2) g^2; stores m and v, returns (p_old, p, m, v) in fp32: the param as loaded (what a
    Kahan store needs) and after decoupled weight decay. QUANT: m and v are int8 state (codes at
    m_ptr/v_ptr, absmax at ma_ptr/va_ptr; ``q`` as for ``load_state``)."""
    p_old, g = load_param_and_grad(p_ptr, g_ptr, offs, mask, grad_scale, weight_decay, HAS_WD and not DECOUPLED)
    p = p_old
    if HAS_WD and DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    m = lerp(load_state(m_ptr, ma_ptr, offs, mask, q, True, QUANT, QBLOCK), g, 1.0 - beta1, LERP_LOW)
    v = load_state(v_ptr, va_ptr, offs, mask, q, False, QUANT, QBLOCK) * beta2 + (1.0 - beta2) * (g * g)
    store_state(m_ptr, ma_ptr, m, offs, mask, q, True, QUANT, QBLOCK)
    store_state(v_ptr, va_ptr, v, offs, mask, q, False, QUANT, QBLOCK)
    return p_old, p, m, v


# ---------------------------------------------------------------------------------------------
# int8 state (dist_optim.state.layout): a moment's codes are addressed like any fp32 state, its
# absmax per quantization block. ``q`` bundles what (de)quantizing a tile needs:
# (rows, end, SCODE, STHR, UCODE, UTHR): ``rows`` the tile's block indices relative to the chunk's
# absmax base, ``end`` the chunk-local end of the tensor (a block holds elements when its first one
# is before it), and the signed and unsigned code maps with their threshold tables.


@triton.jit
def quant_tile(off, end, SCODE, STHR, UCODE, UTHR, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, QUANT: tl.constexpr):
    """``q`` for the tile at chunk offset ``off`` (a tile starts on a block: QBLOCK divides BLOCK
    and CHUNK); 0 for fp32 state, whose tiles may be smaller than a block."""
    if QUANT:
        return off // QBLOCK + tl.arange(0, BLOCK // QBLOCK), end, SCODE, STHR, UCODE, UTHR
    else:
        return 0


@triton.jit
def absmax_base(TABLE, t, start, QBLOCK: tl.constexpr, QUANT: tl.constexpr):
    """Tensor t's absmax pointer at the chunk starting at element ``start`` (a multiple of QBLOCK),
    or the table itself for fp32 state (never read)."""
    if QUANT:
        return chunk_base(TABLE, t, start // QBLOCK, tl.float32)
    else:
        return TABLE


@triton.jit
def load_state(ptr, aptr, offs, mask, q, SIGNED: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr):
    """An fp32 state tile: loaded, or dequantized from codes and absmax under QUANT."""
    if QUANT:
        rows, end, SCODE, STHR, UCODE, UTHR = q
        if mask is None:
            codes = tl.load(ptr + offs)
            absmax = tl.load(aptr + rows)
        else:
            codes = tl.load(ptr + offs, mask=mask, other=0)
            absmax = tl.load(aptr + rows, mask=rows * QBLOCK < end, other=0.0)
        if SIGNED:
            return dequantize_tile(codes, absmax, SCODE, QBLOCK)
        else:
            return dequantize_tile(codes, absmax, UCODE, QBLOCK)
    else:
        return tl.load(ptr + offs, mask=mask)


@triton.jit
def store_state(ptr, aptr, x, offs, mask, q, SIGNED: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr):
    """Store an fp32 state tile, or its codes and absmax under QUANT (lanes past the tensor's end
    enter the quantizer as 0.0, so they cannot raise the last block's absmax)."""
    if QUANT:
        rows, end, SCODE, STHR, UCODE, UTHR = q
        if mask is not None:
            x = tl.where(mask, x, 0.0)
        if SIGNED:
            codes, absmax = quantize_tile(x, STHR, QBLOCK)
        else:
            codes, absmax = quantize_tile(x, UTHR, QBLOCK)
        if mask is None:
            tl.store(ptr + offs, codes)
            tl.store(aptr + rows, absmax)
        else:
            tl.store(ptr + offs, codes, mask=mask)
            tl.store(aptr + rows, absmax, mask=rows * QBLOCK < end)
    else:
        tl.store(ptr + offs, x, mask=mask)


# ---------------------------------------------------------------------------------------------
# Step-derived scalars computed on the device from a per-tensor step count (``steps=``), as the
# host computes them: in fp64, rounded to fp32 where the host hands its result to the launch.


@triton.jit
def f64(x):
    """A launcher's fp64 hyperparameter (a parameter annotated ``tl.float64``) as an fp64 scalar.
    The interpreter passes the Python float itself, which arithmetic would first round to fp32;
    tl.full converts it exactly (and is a no-op on a compiled fp64 argument)."""
    return tl.full([], x, tl.float64)


@triton.jit
def lr64(lr, lr_exact):
    """lr in fp64: read from its device tensor (fp32 there), or the launcher's exact float."""
    lr = tl.to_tensor(lr)
    if lr.dtype.is_ptr():
        return tl.load(lr).to(tl.float64)
    else:
        return f64(lr_exact)


@triton.jit
def step_count(STEPS, t):
    """Tensor t's step count from a counter pointer table, in fp64."""
    return tl.load(chunk_base(STEPS, t, 0, tl.float32)).to(tl.float64)


@triton.jit
def powers(beta1, beta2, step):
    """(beta1**step, beta2**step) in fp64 by binary exponentiation over the bits of int(step): a
    multiply-only loop (nothing for the compiler to contract into an FMA), the same few roundings on
    every device. Python's ``beta**step`` (C pow) can differ in the last bits of the fp64 result;
    the fp32 values derived from it round the same (see tests/kernels/test_device_step.py)."""
    a = tl.full([], 1.0, tl.float64)
    b = tl.full([], 1.0, tl.float64)
    base_a = beta1
    base_b = beta2
    n = step.to(tl.int32)
    while n > 0:
        odd = (n & 1) != 0
        a = tl.where(odd, a * base_a, a)
        b = tl.where(odd, b * base_b, b)
        base_a = base_a * base_a
        base_b = base_b * base_b
        n = n >> 1
    return a, b
