"""Conversions between fp32 optimizer state and its int8 form, and re-blocking int8 state from
one shard layout to another (a checkpoint saved at one world size, loaded at another).

Shards: a flat tensor of N elements split into consecutive pieces [o_0, o_1), [o_1, o_2), ... with
o_0 = 0 and the last end = N, given by their boundaries ``[o_0, o_1, ..., N]``. Each shard is
quantized on its own: its element 0 starts its block 0, and its last block may be partial.

Re-blocking dequantizes the old shards' blocks that a new shard overlaps, cuts and requantizes.
Error of the round trip, per element (x the original fp32 value, x1 = its old dequantized value,
x2 = the re-blocked dequantized value):
- lossless when every old and new boundary is a multiple of the block: each new block is an old
  block, its dequantized absmax is exactly the old absmax (the absmax element codes to +-1), every
  dequantized value is a code point times that absmax, and requantizing returns the same codes
  (asserted in tests/state/test_blockwise.py);
- otherwise |x2 - x1| <= blockwise.error_bound(x1, new absmax): one more rounding at the new
  block's scale, so |x2 - x| <= error_bound(x, old absmax) + error_bound(x1, new absmax). A new
  block's absmax is at most the largest old absmax it overlaps, never larger.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .blockwise import dequantize_blockwise, num_blocks, quantize_blockwise


def to_int8(state: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of an fp32 state tensor of any shape, flattened in row-major order."""
    return quantize_blockwise(state.detach().reshape(-1).to(torch.float32).contiguous(), code, block)


def to_fp32(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int,
            shape: Sequence[int] | None = None) -> torch.Tensor:
    out = dequantize_blockwise(codes, absmax, code, block)
    return out if shape is None else out.reshape(shape)


def _check_bounds(bounds: Sequence[int], name: str) -> list[int]:
    bounds = [int(b) for b in bounds]
    if len(bounds) < 2 or bounds[0] != 0 or any(b > c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must start at 0 and not decrease, got {bounds}")
    return bounds


def _dequantize_range(codes, absmax, code, block, lo, hi) -> torch.Tensor:
    """Elements [lo, hi) of one shard, dequantizing only the blocks they lie in."""
    first, last = lo // block, num_blocks(hi, block)
    part = dequantize_blockwise(codes[first * block: min(last * block, codes.numel())].contiguous(),
                                absmax[first:last].contiguous(), code, block)
    return part[lo - first * block: hi - first * block]


def dequantize_pieces(pieces: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]], code: torch.Tensor,
                      block: int) -> torch.Tensor:
    """fp32 values of consecutive pieces, each ``(codes, absmax, lo, hi)``: elements [lo, hi) of a
    shard quantized on its own (its element 0 starting its block 0). Only the blocks the pieces lie
    in are dequantized. A DeepSpeed partition's fragment of one param is such a piece."""
    out = []
    for codes, absmax, lo, hi in pieces:
        if not 0 <= lo <= hi <= codes.numel():
            raise ValueError(f"piece [{lo}, {hi}) lies outside its shard of {codes.numel()} codes")
        if lo < hi:
            out.append(_dequantize_range(codes, absmax, code, block, lo, hi))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float32, device=code.device)


def reblock(shards: Sequence[tuple[torch.Tensor, torch.Tensor]], old_bounds: Sequence[int],
            new_bounds: Sequence[int], code: torch.Tensor, block: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (codes, absmax) of each new shard ``[new_bounds[j], new_bounds[j + 1])`` of the flat
    tensor whose old shards ``[old_bounds[i], old_bounds[i + 1])`` are quantized as ``shards``.
    Holds one new shard's fp32 values at a time."""
    old_bounds, new_bounds = _check_bounds(old_bounds, "old_bounds"), _check_bounds(new_bounds, "new_bounds")
    if old_bounds[-1] != new_bounds[-1]:
        raise ValueError(f"old shards cover {old_bounds[-1]} elements, new shards {new_bounds[-1]}")
    if len(shards) != len(old_bounds) - 1:
        raise ValueError(f"{len(shards)} shards for {len(old_bounds) - 1} old ranges")
    for i, (codes, _) in enumerate(shards):
        if codes.numel() != old_bounds[i + 1] - old_bounds[i]:
            raise ValueError(f"old shard {i} has {codes.numel()} codes, its range {old_bounds[i + 1] - old_bounds[i]}")
    out = []
    for s, e in zip(new_bounds, new_bounds[1:]):
        pieces = [(codes, absmax, max(s, o) - o, min(e, oe) - o)
                  for (codes, absmax), o, oe in zip(shards, old_bounds, old_bounds[1:]) if max(s, o) < min(e, oe)]
        out.append(quantize_blockwise(dequantize_pieces(pieces, code, block).contiguous(), code, block))
    return out
