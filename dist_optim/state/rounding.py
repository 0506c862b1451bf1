"""bf16 weight updates that keep what round-to-nearest loses: stochastic rounding and Kahan
compensation, the torch references of triton_kernels._quant.

Stochastic rounding adds 16 random bits to the fp32 bit pattern below bf16's last mantissa bit
and truncates: the magnitude rounds up with probability equal to the dropped fraction of an ulp,
so E[round(x)] = x for finite x (sign-magnitude: the same holds for negative values). The random
bits come from a counter-based hash of (stream seed, element index), so a result depends on
nothing but those (no generator state, any launch order or split gives the same bits). The
hash works on 32-bit words; in torch it is computed on int64 tensors masked to 32 bits, with
multiplications split into 16-bit halves so that no intermediate leaves int64's range.

``stream_seed(seed, step, rank)`` folds the per-step and per-rank parts into the 32-bit stream
seed on the host; elements are indexed within the rank's local shard.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
# murmur3's 32-bit finalizer constants: a full avalanche in two multiplications
FMIX_C1, FMIX_C2 = 0x85EBCA6B, 0xC2B2AE35


def fmix32(h: int) -> int:
    """The 32-bit avalanche mix on a Python int (host side)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * FMIX_C1) & MASK32
    h ^= h >> 13
    h = (h * FMIX_C2) & MASK32
    return h ^ (h >> 16)


def stream_seed(seed: int, step: int, rank: int = 0) -> int:
    """The 32-bit seed of one (seed, step, rank) random stream."""
    h = fmix32(seed & MASK32) ^ fmix32((seed >> 32) & MASK32 ^ 0x9E3779B9)
    h = fmix32(h ^ (step & MASK32)) ^ fmix32((step >> 32) & MASK32 ^ 0x7F4A7C15)
    return fmix32(h ^ fmix32(rank & MASK32 ^ 0x6A09E667))


def param_base(seed: int, param_index: int, rank: int = 0) -> int:
    """The 32-bit base of one param's random streams under ``bf16_update="stochastic"``: the
    optimizer's ``rounding_seed``, the param's position in its param groups (flattened, fixed at
    construction) and the rank (``torch.distributed.get_rank()``, 0 without a process group)."""
    return stream_seed(seed, param_index, rank)


def step_stream(base: int, step: int) -> int:
    """The 32-bit stream seed of a param at step count ``step`` (its counter after this step's
    advance): ``fmix32(base ^ fmix32(step))``. A kernel computes it from the device counter, so the
    stream needs no host value per step."""
    return fmix32((base & MASK32) ^ fmix32(step & MASK32))


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a * c) mod 2**32 for a < 2**32 without int64 overflow: a * 16-bit halves are below 2**48
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & MASK32


def _fmix32_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def hash32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """uint32 values (as int64) of ``fmix32(fmix32(seed ^ fmix32(hi)) ^ fmix32(lo))`` for each
    int64 element index (lo, hi: its low and high 32-bit words); ``seed`` a 32-bit stream seed."""
    if index.dtype != torch.int64:
        raise ValueError(f"indices must be int64, got {index.dtype}")
    lo, hi = index & MASK32, (index >> 32) & MASK32
    key = _fmix32_t((seed & MASK32) ^ _fmix32_t(hi))
    return _fmix32_t(key ^ _fmix32_t(lo))


def _bf16_from_bits(bits16: torch.Tensor) -> torch.Tensor:
    signed = torch.where(bits16 >= 0x8000, bits16 - 0x10000, bits16)
    return signed.to(torch.int16).view(torch.bfloat16)


def stochastic_round_bf16(x: torch.Tensor, seed: int, offset: torch.Tensor) -> torch.Tensor:
    """bf16 of fp32 ``x``, rounded up in magnitude with probability equal to the fraction of a bf16
    ulp that truncation drops, drawn from ``hash32(seed, offset)`` (``offset``: each element's int64
    index, same shape as x). NaN stays NaN (0x7FC0); a finite value above bf16's largest can round
    to inf, as its round-to-nearest would."""
    if x.dtype != torch.float32:
        raise ValueError(f"x must be fp32, got {x.dtype}")
    if offset.shape != x.shape:
        raise ValueError(f"offset has shape {tuple(offset.shape)}, x {tuple(x.shape)}")
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    rand = hash32(seed, offset.to(torch.int64)) & 0xFFFF
    out = ((bits + rand) & MASK32) >> 16
    out = torch.where(torch.isnan(x), torch.full_like(out, 0x7FC0), out)
    return _bf16_from_bits(out)


def round_nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even fp32 -> bf16 on the bits (what torch's .to(bfloat16) does, written
    out so that a kernel can compute it identically where its own conversion truncates, as the
    Triton interpreter's does). NaN -> 0x7FC0."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & MASK32) >> 16
    out = torch.where(torch.isnan(x), torch.full_like(out, 0x7FC0), out)
    return _bf16_from_bits(out)


def kahan_add_bf16(p: torch.Tensor, comp: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p + delta`` for a bf16 param with a bf16 compensation buffer (the part of past updates
    that rounding dropped): y = delta + comp; p' = bf16(p + y); comp' = bf16(y - (p' - p)), all in
    fp32. p' - p is exact in fp32 (two bf16 values of close magnitude), so comp' is exactly the
    rounding residual, up to its own bf16 rounding; small updates accumulate in comp until they
    move p by an ulp instead of vanishing."""
    if p.dtype != torch.bfloat16 or comp.dtype != torch.bfloat16:
        raise ValueError(f"p and comp must be bf16, got {p.dtype} and {comp.dtype}")
    p32 = p.float()
    y = delta.float() + comp.float()
    new = round_nearest_bf16(p32 + y)
    residual = y - (new.float() - p32)
    return new, round_nearest_bf16(residual)


def element_indices(t: torch.Tensor) -> torch.Tensor:
    """Each element's int64 index in row-major order over ``t`` (the local tensor an update
    writes), shaped like ``t``: the ``offset`` of ``stochastic_round_bf16`` for a whole tensor."""
    return torch.arange(t.numel(), dtype=torch.int64, device=t.device).reshape(t.shape)
