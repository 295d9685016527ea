"""Arithmetic on stored matrices a block at a time, so no whole upcast copy is ever held.

A 11008 × 4096 matrix stored in BF16 takes 90 MB; in float64 it takes 360 MB, and ΔW another 360.
The Gram matrices, norms and products below upcast BLOCK rows or columns at a time instead (to
float64 unless told otherwise), into one buffer per call, with the same sums as one large product.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BLOCK = 1024
"""Rows or columns upcast at a time."""
PIECE = 512
"""Rows of a Gram matrix computed together; only pieces on or above the diagonal are multiplied."""

F64 = torch.float64


def blocks(w: torch.Tensor, dim: int, minus: torch.Tensor | None = None, dtype: torch.dtype = F64) -> Iterator[torch.Tensor]:
    """Consecutive slices of W (or of W − minus) along `dim`, each in `dtype`.

    Every slice is a view of the same buffer: it holds its values until the next one is drawn.
    """
    shape = list(w.shape)
    shape[dim] = min(BLOCK, shape[dim])
    buffer = torch.empty(shape, dtype=dtype, device=w.device)
    for start in range(0, w.shape[dim], BLOCK):
        length = min(BLOCK, w.shape[dim] - start)
        block = buffer.narrow(dim, 0, length)
        block.copy_(w.narrow(dim, start, length))
        if minus is not None:
            block.sub_(minus.narrow(dim, start, length))
        yield block


def gram(w: torch.Tensor, minus: torch.Tensor | None = None, dtype: torch.dtype = F64) -> torch.Tensor:
    """The smaller Gram matrix of W (or of W − minus) in `dtype`: W·Wᵀ when m ≤ n, else WᵀW.

    It is symmetric, so of its PIECE × PIECE tiles only those on or above the diagonal are
    computed (about half the products once it spans several pieces); the rest are mirrored.
    """
    rows, cols = w.shape
    size = min(rows, cols)
    out = torch.zeros(size, size, dtype=dtype, device=w.device)
    starts = range(0, size, PIECE)
    for block in blocks(w, 1 if rows <= cols else 0, minus, dtype):
        short = block if rows <= cols else block.mT  # size × block length
        for i in starts:
            out[i : i + PIECE, i:].addmm_(short[i : i + PIECE], short[i:].mT)
    for i in starts:
        out[i + PIECE :, i : i + PIECE] = out[i : i + PIECE, i + PIECE :].mT
    return out


def frobenius(w: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """‖W‖_F (or ‖W − minus‖_F), accumulated in float64."""
    total = torch.zeros((), dtype=F64, device=w.device)
    for block in blocks(w, 0, minus):
        total += block.square().sum()
    return total.sqrt().item()


def times(w: torch.Tensor, right: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """W·right (right in float64), computed in float64 by row blocks and stored in `dtype`."""
    out = torch.empty(w.shape[0], right.shape[1], dtype=dtype, device=w.device)
    start = 0
    for block in blocks(w, 0):
        out[start : start + block.shape[0]] = block @ right
        start += block.shape[0]
    return out


def transposed_times(w: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Wᵀ·left (left in float64, m × c), in float64, summed over row blocks of W."""
    out = torch.zeros(w.shape[1], left.shape[1], dtype=F64, device=w.device)
    start = 0
    for block in blocks(w, 0):
        out.addmm_(block.mT, left[start : start + block.shape[0]])
        start += block.shape[0]
    return out


def gram_times(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W·Wᵀ·x in float64 for a thin x (m × c): two passes over W's row blocks."""
    return times(w, transposed_times(w, x))
