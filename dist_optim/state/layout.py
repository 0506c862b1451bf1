"""How an optimizer keeps a moment under ``state_dtype="int8"`` (the format of this package's
docstring, made concrete): the moment's own key holds the uint8 codes (1-D, the local shard's
elements in row-major order) and ``<key>_absmax`` the fp32 per-block absmax, block ``QBLOCK``.

The absmax sits under a key of its own rather than in a nested mapping: every consumer of
``optimizer.state`` (torch's state_dict packing, the key-block checks of a load, snapshots in
tests) handles flat tensors, and the moment's key keeps naming the moment in either mode.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .blockwise import MAX_BLOCK, dequantize_blockwise, num_blocks, quantize_blockwise
from .codes import SIGNED, UNSIGNED

STATE_DTYPES = ("fp32", "int8")

# Every quantized moment uses the largest block: the fewest absmax bytes (4 / 256 per element), and
# one block size for every kernel tile (the Triton tiles are multiples of it).
QBLOCK = MAX_BLOCK

# Signed map for moments that take either sign, unsigned for the non-negative second moments.
SIGNED_KEYS = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
UNSIGNED_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg"})
ABSMAX_SUFFIX = "_absmax"
# In a checkpoint (``state_dict()``), a moment saved as int8 is ``<key>_codes`` + ``<key>_absmax``
# and one saved as fp32 is ``<key>``: the two forms share no entry name, so a DCP load whose target
# expects the other form fails on a missing key instead of reading codes into an fp32 tensor (DCP
# copies across dtypes without a word).
CODES_SUFFIX = "_codes"


def absmax_key(key: str) -> str:
    return key + ABSMAX_SUFFIX


def codes_key(key: str) -> str:
    return key + CODES_SUFFIX


def saved_absmax_shape(shape) -> tuple[int, ...] | None:
    """The shape of a saved moment's absmax for a param of (global) ``shape``, or None where the
    shape has no int8 checkpoint form (it is then saved in fp32 form).

    Blocks are laid out over the param flattened row-major, block 0 at element 0 (the in-memory
    layout of an unsharded param). To be shardable like the param on dim 0, the absmax of a param of
    two or more dims is shaped [shape[0], m / QBLOCK], m = the elements of one dim-0 slice, which
    requires ``m % QBLOCK == 0`` (every block then lies in one slice: a shard of whole dim-0 slices
    holds whole blocks); a 1-D param's is [ceil(n / QBLOCK)].
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return None
    if len(shape) == 1:
        return (num_blocks(shape[0], QBLOCK),)
    per_slice = 1
    for s in shape[1:]:
        per_slice *= s
    if per_slice % QBLOCK:
        return None
    return (shape[0], per_slice // QBLOCK)


def code_map(key: str) -> torch.Tensor:
    if key in SIGNED_KEYS:
        return SIGNED
    if key in UNSIGNED_KEYS:
        return UNSIGNED
    raise ValueError(f"state key {key!r} has no int8 code map")


def is_quantized(state: Mapping[str, object], key: str) -> bool:
    return absmax_key(key) in state


def check_state_dtype(value) -> str:
    if value not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {value!r} (must be one of {', '.join(map(repr, STATE_DTYPES))})")
    return value


def quantize_state(values: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of fp32 ``values`` (any shape, flattened row-major) for moment ``key``."""
    return quantize_blockwise(values.detach().reshape(-1).to(torch.float32).contiguous(), code_map(key).to(values.device),
                              QBLOCK)


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, key: str, shape=None) -> torch.Tensor:
    out = dequantize_blockwise(codes, absmax, code_map(key), QBLOCK)
    return out if shape is None else out.reshape(shape)


def zero_state(numel: int, key: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The int8 form of a zero moment of ``numel`` local elements (the map's zero code, absmax 0)."""
    codes, absmax = quantize_state(torch.zeros(numel, dtype=torch.float32, device=device), key)
    return {key: codes, absmax_key(key): absmax}


__all__ = ["ABSMAX_SUFFIX", "CODES_SUFFIX", "QBLOCK", "SIGNED_KEYS", "STATE_DTYPES", "UNSIGNED_KEYS", "absmax_key", "check_state_dtype",
           "code_map", "codes_key", "dequantize_state", "is_quantized", "num_blocks", "quantize_state",
           "saved_absmax_shape", "zero_state"]
