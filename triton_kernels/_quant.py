"""Register-level pieces of low-memory optimizer state, to be called from inside update kernels:
block-wise 8-bit (de)quantization against a code map, the counter-based hash, stochastic and
round-to-nearest fp32 -> bf16 on the bits. dist_optim.state holds the torch references these
equal bit for bit (and the format's documentation).

Tile vs quantization block: a kernel handles a tile of BLOCK elements; the quantization block
QBLOCK (a power of two <= 256, a property of the stored state) must divide BLOCK, and every
tile must start on a multiple of QBLOCK of its tensor, so that each quantization block lies in
one tile and its absmax is a reduction over one row of the tile reshaped to
[BLOCK // QBLOCK, QBLOCK]. The multi-tensor kernels' tiles start at chunk start + k * BLOCK with
chunk starts multiples of CHUNK, so the condition is QBLOCK | BLOCK and QBLOCK | CHUNK. On a GPU
(CHUNK 16384, BLOCK 1024) any QBLOCK <= 256 fits; the interpreter's BLOCK of 64 does not fit
QBLOCK 256, so a quantized-state kernel's launcher must use BLOCK = max(BLOCK, QBLOCK) (both powers
of two) — never a smaller QBLOCK, which would change the stored format. Elements past the end of a
tensor must enter ``quantize_tile`` as 0.0 so they do not raise the last block's absmax.

Nearest-code search: a branch-free binary search over the 256-entry threshold table
(dist_optim.state.codes.thresholds), eight gathers per element from a 1 KiB table that stays in
L1. Comparisons are ``threshold * scale < x`` — a product and a comparison, with no division,
subtraction or fused multiply-add that could round differently from torch — so the codes are the
reference's exactly, for any code map. A closed form alone would not be exact (a cube root or a
decimal exponent rounds differently from the thresholds near them); should the gathers show up in
GPU profiles, a closed-form first guess (for the cubic map, round(127 * cbrt(|x| / absmax))) fixed
up by comparing against the two thresholds around it would keep the codes and need 2 gathers, not 8.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    """murmur3's 32-bit finalizer on uint32 (multiplications wrap mod 2**32)."""
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def hash32(seed, index):
    """uint32 random bits of int64 element ``index`` in the stream of 32-bit ``seed`` (an int32
    or uint32 scalar): fmix32(fmix32(seed ^ fmix32(hi)) ^ fmix32(lo))."""
    seed = tl.to_tensor(seed).to(tl.uint32, bitcast=True)
    index = index.to(tl.int64)
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = fmix32(seed ^ fmix32(hi))
    return fmix32(key ^ fmix32(lo))


@triton.jit
def _bf16_bits(x, bits):
    # NaN keeps a quiet NaN: adding to a NaN's low mantissa bits and truncating could leave inf
    bits = tl.where(x != x, tl.full([], 0x7FC0, tl.uint32), bits)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def stochastic_round_bf16(x, seed, index):
    """fp32 ``x`` to bf16, rounding the magnitude up with probability equal to the dropped
    fraction of an ulp, from hash32(seed, index): unbiased, and reproducible per (seed, index)."""
    bits = x.to(tl.uint32, bitcast=True)
    rand = hash32(seed, index) & 0xFFFF
    return _bf16_bits(x, (bits + rand) >> 16)


@triton.jit
def round_nearest_bf16(x):
    """Round-to-nearest-even fp32 -> bf16 on the bits: the GPU's conversion, also under the
    interpreter (whose own conversion truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    return _bf16_bits(x, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


@triton.jit
def kahan_add_bf16(p, comp, delta):
    """(p', comp') of dist_optim.state.rounding.kahan_add_bf16: p, comp bf16, delta fp32."""
    p32 = p.to(tl.float32)
    y = delta + comp.to(tl.float32)
    new = round_nearest_bf16(p32 + y)
    return new, round_nearest_bf16(y - (new.to(tl.float32) - p32))


@triton.jit
def quantize_tile(x, THRESH, QBLOCK: tl.constexpr):
    """(codes uint8 [BLOCK], absmax fp32 [BLOCK // QBLOCK]) of an fp32 tile ``x`` [BLOCK] whose
    quantization blocks are its consecutive QBLOCK-element rows. THRESH: the 256-entry fp32
    threshold table of the code map. Elements outside the tensor must be 0.0."""
    BLOCK: tl.constexpr = x.shape[0]
    ROWS: tl.constexpr = BLOCK // QBLOCK
    xr = tl.reshape(x, (ROWS, QBLOCK))
    absmax = tl.max(tl.abs(xr), axis=1)
    # the max reduction may drop NaN; the reference's amax keeps it (a NaN block must stay visible)
    has_nan = tl.max((xr != xr).to(tl.int32), axis=1) > 0
    absmax = tl.where(has_nan, float("nan"), absmax)
    finite = absmax < float("inf")  # false for inf and NaN
    scale = tl.where(finite & (absmax != 0.0), absmax, 1.0)[:, None]
    # int64 table offsets: the gather addresses are per element, and the audit (_aot) holds every
    # per-element address to 64-bit arithmetic
    pos = tl.zeros((ROWS, QBLOCK), dtype=tl.int64)
    for k in tl.static_range(8):  # steps 128, 64, ..., 1: pos ends as the count of thresholds below x
        t = tl.load(THRESH + (pos + ((128 >> k) - 1)))
        pos = tl.where(t * scale < xr, pos + (128 >> k), pos)
    pos = tl.where(finite[:, None], pos, 0)
    return tl.reshape(pos, (BLOCK,)).to(tl.uint8), absmax


@triton.jit
def dequantize_tile(codes, absmax, CODE, QBLOCK: tl.constexpr):
    """fp32 [BLOCK] of uint8 ``codes`` [BLOCK] and their blocks' ``absmax`` [BLOCK // QBLOCK]:
    ``CODE[codes] * absmax`` (CODE: the 256-entry fp32 code map)."""
    BLOCK: tl.constexpr = codes.shape[0]
    ROWS: tl.constexpr = BLOCK // QBLOCK
    values = tl.reshape(tl.load(CODE + codes.to(tl.int64)), (ROWS, QBLOCK))
    return tl.reshape(values * absmax[:, None], (BLOCK,))
