"""8-bit code maps: sorted 256-entry fp32 tables of normalized values in [-1, 1] (signed) or
[0, 1] (unsigned); a block's element is stored as the index of a table entry, its value is
``table[index] * absmax``.

Candidates (compared in benchmarks/quant_error.py, results in benchmarks/results/quant_error.md):

- ``dynamic_tree``: the dynamic exponent format of Dettmers et al. (8-bit optimizers, 2022): after
  the sign bit (signed codes only), a run of e zero bits scales by 10**-e, the first one bit ends
  the run, and the remaining bits are a linear fraction in (0.1, 1]. Relative precision is roughly
  constant over 7 (signed) or 8 (unsigned) decades, which suits moments whose magnitudes in a
  block span orders of magnitude.
- ``dynamic_tree_nozero``: the unsigned tree with its zero entry moved one decade further down
  (1e-8). Li et al. (4-bit states, 2023) show that a second moment rounded to zero turns
  m / (sqrt(v) + eps) into m / eps; without a zero entry no nonzero v can vanish.
- ``linear``: evenly spaced values.
- ``power``: companding ``sign(k) * |k / K|**p``: fine steps near zero, coarse near absmax.

The chosen maps are ``SIGNED`` and ``UNSIGNED`` at the end of this module.

Quantization (``thresholds``): an element's code is the number of decision thresholds below it,
the thresholds being the fp32 midpoints of adjacent table entries. A value exactly on a threshold
therefore takes the lower code. Signed maps are symmetric with a zero, 255 values; their 256th
entry duplicates +1 at the top, whose threshold (1.0 * absmax) no element exceeds, so code 255 is
never produced and every produced code requantizes to itself (a duplicate anywhere else would
make two codes for one value).
"""

from __future__ import annotations

import functools

import torch

ENTRIES = 256


def _finish(values: list[float]) -> torch.Tensor:
    if len(values) != ENTRIES:
        raise AssertionError(f"a code map has {ENTRIES} entries, not {len(values)}")
    return torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)


def _tree_magnitudes(value_bits: int) -> list[float]:
    """Positive values of the dynamic tree with ``value_bits`` bits after the sign: for e leading
    zeros, ``value_bits - e - 1`` fraction bits spread over (0.1, 1] and scaled by 10**-e; the
    all-zero pattern is zero (not included here)."""
    out = []
    for e in range(value_bits):
        fraction_bits = value_bits - 1 - e
        levels = 2 ** fraction_bits
        out += [10.0 ** -e * (0.1 + 0.9 * (j + 1) / levels) for j in range(levels)]
    return out


def dynamic_tree(signed: bool) -> torch.Tensor:
    if signed:
        mags = _tree_magnitudes(7)  # 127 values; with zero and the mirror image, 255 entries
        # the 256th (the format's -0) duplicates +1, where quantization never selects it (see below)
        return _finish([0.0] + mags + [-m for m in mags] + [1.0])
    return _finish([0.0] + _tree_magnitudes(8))


def dynamic_tree_nozero() -> torch.Tensor:
    mags = _tree_magnitudes(8)
    return _finish([min(mags) / 10.0] + mags)


def linear(signed: bool) -> torch.Tensor:
    if signed:  # 255 symmetric levels; the 256th duplicates +1 so that +-1 are both exact
        return _finish([k / 127.0 for k in range(-127, 128)] + [1.0])
    return _finish([k / 255.0 for k in range(256)])


def power(signed: bool, p: float) -> torch.Tensor:
    if signed:
        return _finish([(1.0 if k >= 0 else -1.0) * (abs(k) / 127.0) ** p for k in range(-127, 128)] + [1.0])
    return _finish([(k / 255.0) ** p for k in range(256)])


@functools.lru_cache(maxsize=None)
def _named(name: str) -> torch.Tensor:
    kind, _, arg = name.partition(":")
    signed = kind.endswith("-signed")
    base = kind.removesuffix("-signed").removesuffix("-unsigned")
    if base == "dynamic_tree":
        return dynamic_tree(signed)
    if base == "dynamic_tree_nozero":
        return dynamic_tree_nozero()
    if base == "linear":
        return linear(signed)
    if base == "power":
        return power(signed, float(arg))
    raise ValueError(f"unknown code map {name!r}")


def named(name: str) -> torch.Tensor:
    """A code map by name: ``{dynamic_tree,linear,power}-{signed,unsigned}[:p]`` or
    ``dynamic_tree_nozero-unsigned``, e.g. ``power-unsigned:4``."""
    return _named(name).clone()


def thresholds(code: torch.Tensor) -> torch.Tensor:
    """The 255 decision thresholds (fp32 midpoints of adjacent entries, computed in fp64), padded
    to 256 with +inf so that a table has a power-of-two size (the binary search never reads it)."""
    if code.shape != (ENTRIES,) or code.dtype != torch.float32:
        raise ValueError(f"a code map is a ({ENTRIES},) fp32 tensor, got {code.dtype} {tuple(code.shape)}")
    c = code.double()
    if not bool((c[1:] >= c[:-1]).all()):
        raise ValueError("a code map must be sorted ascending")
    mid = ((c[1:] + c[:-1]) / 2).float()
    return torch.cat([mid, torch.tensor([float("inf")])])


def max_half_gap(code: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> float:
    """The largest quantization error of a normalized value in [lo, hi] (before scaling by the
    block's absmax): half the widest gap between adjacent entries that overlaps [lo, hi]."""
    c = code.double()
    gaps = [(c[i + 1] - c[i]).item() / 2 for i in range(ENTRIES - 1) if c[i + 1] >= lo and c[i] <= hi]
    return max(gaps)


def half_gap_at(code: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
    """Per value: half the gap between the two table entries around it (its rounding error bound
    before scaling), in fp64."""
    c = code.double()
    y = normalized.double().clamp(c[0].item(), c[-1].item())
    hi = torch.searchsorted(c, y, right=False).clamp(1, ENTRIES - 1)
    return (c[hi] - c[hi - 1]) / 2


# Chosen on the measurements of benchmarks/quant_error.py (benchmarks/results/quant_error.md):
# - second moments: the dynamic tree without zero. Every map with a zero entry rounds the small v
#   of rarely-updated coordinates (heavy-tailed and sparse gradients) to 0 under a nonzero m, and
#   the update direction m / (sqrt(v) + eps) then errs by 1e2 to 1e7 (relative L2); without the
#   zero the error is 0.29, and on the GPT's moments it is as good as the best (0.014).
# - first moments: cubic companding, sign(k) (|k| / 127)**3: the lowest per-block error of the
#   maps that reach small values (GPT 0.0091, heavy-tailed 0.0068 against the dynamic tree's
#   0.0117 and 0.0094), reaching 5e-7 of absmax, and with it the lowest update-direction errors
#   together with the unsigned map above. Quadratic companding is closer on large values but
#   zeroes values below 3e-5 of absmax.
SIGNED = power(signed=True, p=3.0)
UNSIGNED = dynamic_tree_nozero()
