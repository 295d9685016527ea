"""Linear-algebra kernels: exact singular bases in float64 on the chosen device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ftaudit import blockwise
from ftaudit.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; anything else must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def upcast(w: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The matrix in float64 on the device (the stored F16/BF16/F32 values are exact in float64)."""
    return w.to(device=device, dtype=torch.float64, non_blocking=True)


@dataclass(frozen=True)
class Spectrum:
    """Left singular vectors (columns, by decreasing singular value) and the singular values."""

    U: torch.Tensor
    S: torch.Tensor


GRAM_MAX_CONDITION = 1e4
"""A tall matrix's vectors come from its column Gram WᵀW while σ1/σn is at most this; above it, from a QR."""


def left_spectrum(w: torch.Tensor, dtype: torch.dtype = torch.float64, count: int | None = None) -> Spectrum:
    """The first `count` (default: all min(m, n)) left singular vectors and values of a matrix,
    exactly, computed in float64.

    `w` may be stored in any float dtype; it is upcast a block at a time (`blockwise`), and U is
    returned in `dtype`. Wide or square: eigh of W·Wᵀ. Tall: eigh of WᵀW = V·Σ²·Vᵀ and U = W·V·Σ⁻¹,
    which loses about κ = σ1/σn digits' worth of relative accuracy in the small values' vectors; so
    only while κ is at most GRAM_MAX_CONDITION (float64 then keeps ~1e-8), else W = QR first, eigh of
    R·Rᵀ and U = Q·U_R, which never divides by a singular value. All are cheaper than a full SVD and,
    in float64, agree with it to far below the precision of the stored weights.
    """
    eigenvalues, vectors = torch.linalg.eigh(blockwise.gram(w))
    return _left_from_gram(w, eigenvalues, vectors, dtype, min(w.shape) if count is None else count)


def _within_condition(eigenvalues: torch.Tensor, limit: float) -> bool:
    """Whether the Gram eigenvalues (ascending) give a nonsingular matrix with σ1/σn ≤ limit."""
    return bool(eigenvalues[-1] > 0) and bool(eigenvalues[0] * limit**2 >= eigenvalues[-1])


def _left_from_gram(
    w: torch.Tensor, eigenvalues: torch.Tensor, vectors: torch.Tensor, dtype: torch.dtype, count: int
) -> Spectrum:
    """`left_spectrum` from the eigendecomposition of W's smaller Gram matrix (ascending)."""
    rows, cols = w.shape
    values = eigenvalues.flip(-1).clamp(min=0).sqrt()[:count]
    top = vectors[:, vectors.shape[1] - count :].flip(-1)  # the eigenvectors of the `count` largest values
    if rows <= cols:
        return Spectrum(top.to(dtype), values)
    if _within_condition(eigenvalues, GRAM_MAX_CONDITION):
        return Spectrum(blockwise.times(w, top.div_(values), dtype), values)
    Q, R = torch.linalg.qr(w.to(torch.float64))
    eigenvalues, U_R = torch.linalg.eigh(R @ R.mT)
    return Spectrum((Q @ U_R[:, U_R.shape[1] - count :]).flip(-1).to(dtype), eigenvalues.flip(-1).clamp(min=0).sqrt()[:count])


RIGHT_MAX_CONDITION = 1e3
"""A tall base matrix is kept as its right vectors V while σ1/σn is at most this (see `Basis`)."""
BASIS_BLOCK = 1024
"""Basis vectors applied at a time, so that no float64 copy of a whole basis is made."""


@dataclass(frozen=True)
class Basis:
    """A base matrix's full left singular basis U (m × r, r = min(m, n)) and its singular values.

    Held as U itself, or, for a tall matrix (m > n) with σ1/σn ≤ RIGHT_MAX_CONDITION, as its right
    vectors V (n × n, smaller than U), U = W·V·Σ⁻¹ being applied through W whenever it is used, so
    the methods take the base matrix W. Vectors are kept in float32: rounding moves a cosine by under
    1e-6 for U and under κ·6e-8 ≤ 6e-5 for V; it halves what the cache stores and holds, and makes
    cached and freshly computed audits give identical numbers. Products are computed in float64.
    """

    vectors: torch.Tensor
    S: torch.Tensor
    right: bool = False

    @property
    def rank(self) -> int:
        return self.S.numel()

    def to(self, device: torch.device) -> Basis:
        return Basis(self.vectors.to(device), self.S.to(device), self.right)

    def transposed_times(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Uᵀ·x (x float64, m × c): the cosines of x's columns with every basis vector, r × c."""
        if self.right:
            x = blockwise.transposed_times(w, x)
        out = torch.cat([block.to(torch.float64).mT @ x for block in self.vectors.split(BASIS_BLOCK, dim=1)])
        return out / self.S[:, None] if self.right else out

    def times(self, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """U·y (y float64, r × c), m × c."""
        y = y / self.S[:, None] if self.right else y
        out = y.new_zeros(self.vectors.shape[0], y.shape[1])
        for start in range(0, self.rank, BASIS_BLOCK):
            out.addmm_(self.vectors[:, start : start + BASIS_BLOCK].to(torch.float64), y[start : start + BASIS_BLOCK])
        return blockwise.times(w, out) if self.right else out

    def top(self, w: torch.Tensor, k: int) -> torch.Tensor:
        """The first k vectors of U, in float64 (m × k)."""
        k = min(k, self.rank)
        if self.right:
            return blockwise.times(w, self.vectors[:, :k].to(torch.float64) / self.S[:k])
        return self.vectors[:, :k].to(torch.float64)


def base_basis(w: torch.Tensor) -> Basis:
    """The base side of the comparison: its full left basis (`Basis`), computed exactly in float64."""
    eigenvalues, vectors = torch.linalg.eigh(blockwise.gram(w))
    if w.shape[0] > w.shape[1] and _within_condition(eigenvalues, RIGHT_MAX_CONDITION):
        return Basis(vectors.to(torch.float32).flip(-1).contiguous(), eigenvalues.flip(-1).sqrt(), right=True)
    full = _left_from_gram(w, eigenvalues, vectors, torch.float32, min(w.shape))
    return Basis(full.U.contiguous(), full.S.contiguous())


CERTIFIED_SIN = 5e-4
"""Largest accepted bound on the sine of the angle between a computed and an exact singular vector.

A cosine then moves by at most this much: half the 1e-3 agreement with the float64 reference that
ftaudit promises, the other half covering the float32 rounding of the base's basis (under 1e-6).
"""

START_FACTOR = 4
"""The float32 start holds START_FACTOR·k + 1 vectors: close neighbours of the top k sit inside it."""
KRYLOV_STEPS = 2
"""Block Krylov steps from the start: the Rayleigh–Ritz space is span(S, G·S, G²·S)."""


REFINE_MIN = 512
"""Below this many rows or columns the full float64 decomposition costs no more than a float32 start
and its refinement, so `top_left` takes it directly."""


def top_left(w: torch.Tensor, k: int) -> Spectrum:
    """The top-k left singular vectors and values of a matrix, certified exact, computed in float64.

    `w` may be stored in any float dtype; it is read a block at a time and never upcast whole. A
    float32 eigendecomposition of the smaller Gram matrix gives a start that `refine_top_left`
    polishes in float64 and certifies; where it cannot certify (tied or clustered values, k close
    to the rank), and for matrices under REFINE_MIN, the full float64 decomposition answers instead.
    """
    k = min(k, *w.shape)
    if REFINE_MIN <= min(w.shape) and k < min(w.shape):
        refined = refine_top_left(w, _float32_start(w, min(START_FACTOR * k + 1, min(w.shape))), k)
        if refined is not None:
            return refined
    return left_spectrum(w, count=k)


def _float32_start(w: torch.Tensor, count: int) -> torch.Tensor:
    """Approximate top `count` left singular vectors from a float32 eigh of the smaller Gram matrix."""
    vectors = torch.linalg.eigh(blockwise.gram(w, dtype=torch.float32)).eigenvectors[:, -count:].to(torch.float64)
    return vectors if w.shape[0] <= w.shape[1] else blockwise.times(w, vectors)


def refine_top_left(w: torch.Tensor, start: torch.Tensor, k: int) -> Spectrum | None:
    """The top k left singular pairs of W (any stored dtype) from approximate vectors `start` (k + 1 or more columns).

    Rayleigh–Ritz for G = W·Wᵀ in float64 on the block Krylov space of `start` (KRYLOV_STEPS). Each
    Ritz vector u_j is certified by the Davis–Kahan bound sin∠(u_j, exact) ≤ ‖W·Wᵀ·u_j − θ_j·u_j‖ / gap_j, gap_j the distance
    from θ_j to its neighbouring Ritz values; None unless every bound is at most CERTIFIED_SIN.
    """
    krylov = [torch.linalg.qr(start).Q]
    for _ in range(KRYLOV_STEPS):
        krylov.append(blockwise.gram_times(w, krylov[-1]))
    basis = torch.linalg.qr(torch.cat(krylov, 1)).Q
    g_basis = blockwise.gram_times(w, basis)
    theta, y = torch.linalg.eigh(basis.mT @ g_basis)
    theta, y = theta.flip(-1)[: k + 1], y.flip(-1)[:, : k + 1]
    vectors = basis @ y
    residual = torch.linalg.vector_norm(g_basis @ y - vectors * theta, dim=0)[:k]
    neighbours = torch.cat([theta.new_tensor([math.inf]), theta])
    gap = torch.minimum(neighbours[:k] - theta[:k], theta[:k] - theta[1:])
    bound = residual / gap
    if not bool((bound <= CERTIFIED_SIN).all()):
        return None
    return Spectrum(vectors[:, :k], theta[:k].clamp(min=0).sqrt())
