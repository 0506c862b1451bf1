"""Block-wise dynamic quantization, the torch reference the Triton helpers (triton_kernels._quant)
and the CPU path must equal bit for bit.

A flat fp32 tensor of n elements is cut into blocks of ``block`` elements from element 0 (the last
block may be partial). Per block, ``absmax`` (fp32) is the largest magnitude and each element is
stored as one uint8 code: the number of the code map's decision thresholds, scaled by absmax,
that are strictly below it (``codes.thresholds``; a value on a threshold takes the lower code).
Only fp32 multiplications and comparisons are involved, no division or subtraction, so no
rounding mode, reciprocal approximation or fused multiply-add can make two implementations
disagree. Dequantization is ``code[codes] * absmax``, one fp32 multiplication.

Edge cases: a block of zeros (absmax 0) is searched at scale 1 and so codes to the map's zero
entry (dequantizing to 0, never NaN); a block with a non-finite absmax (a NaN or inf in it) is
all code 0 with its absmax kept, so it dequantizes to non-finite values and the non-finite step
stays visible.

Error bound: an element x of a block with absmax a dequantizes within ``half_gap(x / a) * a`` of x
(half the gap between the two table entries around x / a), up to fp32 rounding of the scaled
thresholds (a few ulps of a).
"""

from __future__ import annotations

import torch

from . import codes as code_maps

MAX_BLOCK = 256


def check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1 or block > MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block must be a power of two in [1, {MAX_BLOCK}], got {block!r}")


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], absmax fp32 [ceil(n / block)]) of a 1-D fp32 tensor."""
    check_block(block)
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"x must be a 1-D fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    n = x.numel()
    nb = num_blocks(n, block)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device)
    padded = torch.zeros(nb * block, dtype=torch.float32, device=x.device)
    padded[:n] = x
    blocks = padded.view(nb, block)
    absmax = blocks.abs().amax(dim=1)  # NaN propagates, as the kernel's explicit NaN check does
    finite = torch.isfinite(absmax)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    thr = code_maps.thresholds(code).to(x.device)[:-1]
    scaled = thr[None, :] * torch.where(finite, scale, torch.ones_like(scale))[:, None]
    # searchsorted (left) on ascending thresholds: the number of thresholds strictly below each value
    idx = torch.searchsorted(scaled.contiguous(), blocks.contiguous(), right=False)
    idx = torch.where(finite[:, None], idx, torch.zeros_like(idx))
    return idx.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 [n]: ``code[codes] * absmax`` of each element's block."""
    check_block(block)
    n = codes.numel()
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"codes must be a 1-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if absmax.shape != (num_blocks(n, block),) or absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be fp32 [{num_blocks(n, block)}] for {n} codes at block {block}, "
                         f"got {absmax.dtype} {tuple(absmax.shape)}")
    values = code.to(codes.device)[codes.long()]
    return values * absmax.repeat_interleave(block)[:n]


def error_bound(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """Per element, the largest |dequantize(quantize(x)) - x| the format allows (fp64):
    half the table gap around x / absmax, times absmax, plus 4 ulps of absmax for the fp32 rounding
    of the scaled thresholds and of the dequantizing product."""
    a = absmax.double().repeat_interleave(block)[: x.numel()]
    safe = torch.where(a == 0, torch.ones_like(a), a)
    ulp = torch.where(a == 0, torch.zeros_like(a), a * 2.0 ** -23)
    return code_maps.half_gap_at(code, x.double() / safe) * a + 4 * ulp
