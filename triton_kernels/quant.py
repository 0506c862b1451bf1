"""Standalone launchers over one flat tensor for the helpers of ``_quant``: block-wise 8-bit
quantization and dequantization, and stochastic rounding to bf16 (tests; checkpoint conversion on
the GPU). Tables come from the caller (dist_optim.state.codes: the code map and its thresholds);
this module knows nothing of optimizers.

Each program handles a tile of BLOCK elements from element ``pid * BLOCK`` (int64 addresses);
BLOCK is a multiple of the quantization block, so tiles hold whole quantization blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._quant import dequantize_tile, quantize_tile, stochastic_round_bf16 as _sr
from ._support import interpreting

GPU_BLOCK = 1024
NUM_WARPS = 4


def _block(qblock: int) -> int:
    # the interpreter's tiles are small so that tests of a few thousand elements cross tile edges
    return max(qblock, 64 if interpreting() else GPU_BLOCK)


def _check_table(name: str, table: torch.Tensor, device: torch.device) -> None:
    if table.shape != (256,) or table.dtype != torch.float32 or table.device != device or not table.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (256,) fp32 tensor on {device}")


def _check_qblock(qblock: int) -> None:
    if not isinstance(qblock, int) or qblock < 1 or qblock > 256 or qblock & (qblock - 1):
        raise ValueError(f"the quantization block must be a power of two in [1, 256], got {qblock!r}")


@triton.jit
def _quantize_kernel(X, CODES, ABSMAX, THRESH, n, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start
    x = tl.load(X + start + offs, mask=mask, other=0.0)
    codes, absmax = quantize_tile(x, THRESH, QBLOCK)
    tl.store(CODES + start + offs, codes, mask=mask)
    rows = tl.arange(0, BLOCK // QBLOCK)
    tl.store(ABSMAX + pid * (BLOCK // QBLOCK) + rows, absmax, mask=rows * QBLOCK < n - start)


@triton.jit
def _dequantize_kernel(CODES, ABSMAX, CODE, OUT, n, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start
    rows = tl.arange(0, BLOCK // QBLOCK)
    codes = tl.load(CODES + start + offs, mask=mask, other=0)
    absmax = tl.load(ABSMAX + pid * (BLOCK // QBLOCK) + rows, mask=rows * QBLOCK < n - start, other=0.0)
    tl.store(OUT + start + offs, dequantize_tile(codes, absmax, CODE, QBLOCK), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _stochastic_round_kernel(X, OUT, n, seed, offset, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start
    x = tl.load(X + start + offs, mask=mask, other=0.0)
    index = offset.to(tl.int64) + start + offs
    tl.store(OUT + start + offs, _sr(x, seed, index), mask=mask)


def seed_arg(seed: int) -> int:
    """A 32-bit stream seed as the kernels take it: the int32 with the same bits (a launch argument
    of 2**31 or more would be specialized as a wider integer)."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be a 32-bit unsigned value, got {seed}")
    return seed - 2 ** 32 if seed >= 2 ** 31 else seed


def quantize_blockwise(x: torch.Tensor, thresholds: torch.Tensor, qblock: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], absmax fp32 [ceil(n / qblock)]) of a contiguous 1-D fp32 tensor, given the
    code map's 256-entry threshold table (dist_optim.state.codes.thresholds)."""
    _check_qblock(qblock)
    if x.dim() != 1 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 1-D fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    _check_table("thresholds", thresholds, x.device)
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // qblock), dtype=torch.float32, device=x.device)
    if n:
        block = _block(qblock)
        _launch.run(_quantize_kernel, (triton.cdiv(n, block),), x.device, x, codes, absmax, thresholds, n,
                    BLOCK=block, QBLOCK=qblock, num_warps=NUM_WARPS)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, qblock: int) -> torch.Tensor:
    """fp32 [n]: ``code[codes] * absmax`` of each element's block."""
    _check_qblock(qblock)
    n = codes.numel()
    if codes.dim() != 1 or codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError(f"codes must be a contiguous 1-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if absmax.shape != (-(-n // qblock),) or absmax.dtype != torch.float32 or absmax.device != codes.device:
        raise ValueError(f"absmax must be fp32 [{-(-n // qblock)}] on {codes.device}, got {absmax.dtype} "
                         f"{tuple(absmax.shape)} on {absmax.device}")
    _check_table("code", code, codes.device)
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n:
        block = _block(qblock)
        _launch.run(_dequantize_kernel, (triton.cdiv(n, block),), codes.device, codes, absmax.contiguous(), code, out,
                    n, BLOCK=block, QBLOCK=qblock, num_warps=NUM_WARPS)
    return out


def stochastic_round_bf16(x: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """bf16 of a contiguous fp32 tensor, element i stochastically rounded with the random bits of
    index ``offset + i`` in the stream ``seed`` (a 32-bit stream seed: dist_optim.state.rounding.
    stream_seed)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous fp32 tensor, got {x.dtype}")
    seed = seed_arg(seed)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    n = x.numel()
    if n:
        block = 64 if interpreting() else GPU_BLOCK
        _launch.run(_stochastic_round_kernel, (triton.cdiv(n, block),), x.device, x, out, n, seed, int(offset),
                    BLOCK=block, num_warps=NUM_WARPS)
    return out
