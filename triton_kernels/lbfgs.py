"""L-BFGS's vector work in single passes over the history: every history row's dot product with
the gradient, and the direction as one linear combination of the gradient and the history rows.

Each program owns a slice of columns and walks all rows, so S, Y and g are each read once; the dot
products are written as per-slice partials and summed by torch in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._support import interpreting

GPU_BLOCK = 1024
BLOCK = 64 if interpreting() else GPU_BLOCK


# Sizes and strides are not specialized on (a growing history would otherwise compile new
# variants mid-run: rows == 1, strides divisible by 16); all index arithmetic is int64, since
# (rows - 1) * row_stride + n passes 2^31 at ~21.5M elements with a 100-row history.
@triton.jit(do_not_specialize=["n", "rows", "row_stride"])
def _dots_kernel(V, H, OUT, n, rows, row_stride, NVEC: tl.constexpr, BLOCK: tl.constexpr):
    # OUT[r, j, chunk] = H[r, chunk] . V[j, chunk]; each history row is read once for all NVEC vectors.
    chunk = tl.program_id(0).to(tl.int64)
    chunks = tl.num_programs(0).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n64 = n.to(tl.int64)
    stride = row_stride.to(tl.int64)
    for r in range(0, rows):
        h = tl.load(H + r * stride + offs, mask=mask, other=0.0)
        for j in tl.static_range(NVEC):
            v = tl.load(V + j * n64 + offs, mask=mask, other=0.0)
            tl.store(OUT + (r * NVEC + j) * chunks + chunk, tl.sum(h * v, axis=0))


@triton.jit(do_not_specialize=["n", "rows", "row_stride"])
def _combine_kernel(G, Y, S, W, D, n, rows, row_stride, c_g, BLOCK: tl.constexpr):
    # ``rows`` is the filled part of the history: rows not yet written are never addressed, so the
    # loop needs no test on the weights and an early step reads only what it has. W holds the Y
    # weights then the S weights: one pointer, whose alignment does not change as the history grows
    # (a second pointer at W + rows would compile a new variant whenever rows % 4 changes).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * c_g
    stride = row_stride.to(tl.int64)
    for r in range(0, rows):
        row = r * stride
        acc += tl.load(W + r) * tl.load(Y + row + offs, mask=mask, other=0.0)
        acc += tl.load(W + rows + r) * tl.load(S + row + offs, mask=mask, other=0.0)
    tl.store(D + offs, acc, mask=mask)


def _check(g: torch.Tensor, *rows: torch.Tensor) -> None:
    if g.dtype != torch.float32 or any(r.dtype != torch.float32 for r in rows):
        raise ValueError("the L-BFGS kernels take fp32 vectors (fp64 runs use the torch path)")
    if not g.is_contiguous() or any(r.stride(1) != 1 or r.shape[1] != g.numel() for r in rows):
        raise ValueError("history rows must be contiguous and as long as the gradient")


def history_dots(v: torch.Tensor, Y: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S v, Y v) for a vector v or the columns of an (n, r) matrix, with row-major histories whose
    rows may be longer than n (a column slice)."""
    vectors = (v.reshape(-1, 1) if v.dim() == 1 else v).t().contiguous()  # (r, n)
    _check(vectors[0], Y, S)
    nvec, n = vectors.shape
    m = S.shape[0]
    chunks = triton.cdiv(n, BLOCK)
    out = []
    for H in (S, Y):
        partial = torch.empty(m, nvec, chunks, dtype=torch.float32, device=v.device)
        _launch.run(_dots_kernel, (chunks,), v.device, vectors, H, partial, n, m, H.stride(0), NVEC=nvec, BLOCK=BLOCK)
        dots = partial.sum(dim=2)
        out.append(dots[:, 0] if v.dim() == 1 else dots)
    return out[0], out[1]


def combine(g: torch.Tensor, Y: torch.Tensor, S: torch.Tensor, c_g: float, w: torch.Tensor) -> torch.Tensor:
    """c_g g + w[0] @ Y + w[1] @ S for a contiguous (2, rows) fp32 ``w``, reading exactly the rows of
    Y and S that are passed."""
    _check(g, Y, S)
    if not (Y.shape[0] == S.shape[0]) or w.shape != (2, Y.shape[0]) or Y.stride(0) != S.stride(0):
        raise ValueError("combine: Y and S must have the same rows and row stride, and w shape (2, rows)")
    if w.dtype != torch.float32 or not w.is_contiguous():
        raise ValueError("combine: the weights must be contiguous fp32")
    n = g.numel()
    d = torch.empty_like(g)
    _launch.run(_combine_kernel, (triton.cdiv(n, BLOCK),), g.device, g, Y, S, w, d, n, Y.shape[0], Y.stride(0),
                float(c_g), BLOCK=BLOCK)
    return d
