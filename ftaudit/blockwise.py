"""Arithmetic on stored matrices a block at a time, so no whole upcast copy is ever held.

A 11008 × 4096 matrix stored in BF16 takes 90 MB; in float64 it takes 360 MB, and ΔW another 360.
The Gram matrices, norms and products below upcast BLOCK rows or columns at a time instead (to
float64 unless told otherwise), into one buffer per call, with the same sums as one large product.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ftaudit.errors import UnsupportedError

BLOCK = 1024
"""Rows or columns upcast at a time."""
PIECE = 512
"""Rows of a Gram matrix computed together; only pieces on or above the diagonal are multiplied."""

F64 = torch.float64


SAFE_EXPONENT = 400
"""Largest |log2| of a float64 matrix's largest magnitude measured as stored: beyond it, sums of squares
could overflow (past 2^511) or lose their digits to underflow (below 2^-511), so `scale_exponent`
brings the matrix back. F32, F16 and BF16 values never get there."""


def scale_exponent(*matrices: torch.Tensor) -> int:
    """e such that 2^e·W has its largest magnitude in [1/2, 1), W the first of `matrices` not all zeros,
    when W is stored in float64 and that magnitude lies beyond 2^±SAFE_EXPONENT; else 0.

    Scaling by a power of two is exact: singular vectors and every ratio of the scaled matrices are
    the matrices' own, and their singular values are 2^e times theirs.
    """
    for w in matrices:
        if w.dtype != F64 or w.numel() == 0:
            return 0
        low, high = torch.aminmax(w)
        largest = torch.stack([-low, high]).max().item()  # NaN when W holds one
        if not math.isfinite(largest):
            return 0
        if largest > 0:
            exponent = math.frexp(largest)[1]
            return -exponent if abs(exponent) > SAFE_EXPONENT else 0
    return 0


def scaled(w: torch.Tensor, exponent: int) -> torch.Tensor:
    """2^exponent·W, exactly (in two halves, so that neither factor leaves float64's range); W itself when 0."""
    if exponent == 0:
        return w
    half = exponent // 2
    return (w * 2.0**half).mul_(2.0 ** (exponent - half))


def unscaled(values: list[float], exponent: int, name: str) -> list[float]:
    """Singular values measured on a matrix scaled by 2^exponent (`scaled`), at the matrix's own scale."""
    try:
        return [math.ldexp(v, -exponent) for v in values]
    except OverflowError:
        raise UnsupportedError(f"matrix {name!r}: its singular values exceed float64's range") from None


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
    """The smaller Gram matrix of W (or of W − minus) in `dtype`: W·Wᵀ when m ≤ n, else WᵀW."""
    out, dim = _empty_gram(w, dtype), _gram_dim(w)
    for block in blocks(w, dim, minus, dtype):
        _add_gram(out, block, dim)
    return _mirrored(out)


def _gram_dim(w: torch.Tensor) -> int:
    """The dimension a Gram matrix sums over: columns of a wide or square matrix, rows of a tall one."""
    return 1 if w.shape[0] <= w.shape[1] else 0


def _empty_gram(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    size = min(w.shape)
    return torch.zeros(size, size, dtype=dtype, device=w.device)


def _add_gram(out: torch.Tensor, block: torch.Tensor, dim: int) -> None:
    """out += the Gram share of a block sliced along `dim`, in its PIECE × PIECE tiles on or above the diagonal.

    A Gram matrix is symmetric, so once it spans several pieces this takes about half the products.
    """
    short = block if dim == 1 else block.mT  # size × block length
    for i in range(0, out.shape[0], PIECE):
        out[i : i + PIECE, i:].addmm_(short[i : i + PIECE], short[i:].mT)


def _mirrored(out: torch.Tensor) -> torch.Tensor:
    """The whole, exactly symmetric matrix from the tiles `_add_gram` filled (its upper triangle:
    a diagonal tile's two triangles come from separate dot products, which some BLAS kernels round
    differently)."""
    for i in range(0, out.shape[0], PIECE):
        tile = out[i : i + PIECE, i : i + PIECE]
        tile.copy_(tile.triu() + tile.triu(1).mT)
        out[i + PIECE :, i : i + PIECE] = out[i : i + PIECE, i + PIECE :].mT
    return out


@dataclass(frozen=True)
class PairSums:
    """What one pass over a base and a tuned matrix gathers for the indicators, in float64."""

    base_rows: torch.Tensor
    """Squared L2 norm of each row of W0; `base_cols` of each column; `tuned_…` the same for Wt."""
    base_cols: torch.Tensor
    tuned_rows: torch.Tensor
    tuned_cols: torch.Tensor
    delta_square: float
    """‖Wt − W0‖_F²."""
    delta_gram: torch.Tensor | None
    """The smaller Gram matrix of ΔW = Wt − W0, when asked for."""

    @property
    def finite(self) -> bool:
        """Whether both matrices hold only finite values (a NaN or ±inf makes its row's sum so)."""
        sums = (self.base_rows, self.base_cols, self.tuned_rows, self.tuned_cols)
        return bool(torch.stack([torch.isfinite(s).all() for s in sums]).all())


def pair_sums(base: torch.Tensor, tuned: torch.Tensor, with_gram: bool = True) -> PairSums:
    """Row and column norms of both matrices, ‖ΔW‖_F² and (`with_gram`) ΔW's Gram matrix, in one
    float64 pass that upcasts a block of each matrix at a time.

    Float64 squares of stored F32, F16 or BF16 values cannot overflow, so a sum is non-finite
    exactly when its row or column holds a NaN or ±inf (float64 weights beyond 1e154 count so too: see
    `scale_exponent`).
    """
    dim = _gram_dim(base)
    other = 1 - dim
    lengths = base.shape[other], base.shape[dim]
    sums = [torch.zeros(n, dtype=F64, device=base.device) for n in (*lengths, *lengths)]
    gram_out = _empty_gram(base, F64) if with_gram else None
    delta_square = torch.zeros((), dtype=F64, device=base.device)
    start = 0
    for b, t in zip(blocks(base, dim), blocks(tuned, dim), strict=True):
        length = b.shape[dim]
        for block, (across, along) in ((b, sums[0:2]), (t, sums[2:4])):
            square = block.square()
            across += square.sum(dim)
            along[start : start + length] = square.sum(other)
        t.sub_(b)
        delta_square += t.square().sum()
        if gram_out is not None:
            _add_gram(gram_out, t, dim)
        start += length
    rows, cols = (0, 1) if dim == 1 else (1, 0)
    return PairSums(
        base_rows=sums[rows], base_cols=sums[cols], tuned_rows=sums[2 + rows], tuned_cols=sums[2 + cols],
        delta_square=delta_square.item(), delta_gram=None if gram_out is None else _mirrored(gram_out),
    )


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of W, in float64."""
    if w.shape[0] == 0:
        return torch.zeros(0, dtype=F64, device=w.device)
    return torch.cat([torch.linalg.vector_norm(block, dim=1) for block in blocks(w, 0)])


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
