"""The linear algebra of `ftaudit fix`: find a matrix's intruders and scale them down.

For a tuned matrix W with top left singular vectors u_j and values σ_j, the right singular vectors
are v_j = Wᵀu_j/σ_j, so σ_j·u_j·v_jᵀ = u_j·u_jᵀ·W. Scaling the chosen σ_j by λ (Shuttleworth et al.,
arXiv 2410.21228, Section 5) is therefore W' = W − (1−λ)·U_I·U_Iᵀ·W, U_I the chosen vectors as
columns: exact, without dividing by σ. Everything here is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftaudit.analyses.intruders import intruders
from ftaudit.spectral import Basis, top_left


@dataclass(frozen=True)
class Directions:
    """The intruders chosen in one matrix, by decreasing singular value."""

    index: list[int]
    """Positions among the matrix's top-k singular vectors."""
    U: torch.Tensor
    """The left singular vectors, as columns (m × len(index))."""
    sigma: list[float]
    max_cos: list[float]


def find_directions(
    base: Basis, w0: torch.Tensor, w: torch.Tensor, k: int, epsilon: float, only_top: int | None
) -> Directions:
    """The top-k singular vectors of `w` whose largest |cos| with the basis of the base matrix w0 is under ε.

    `only_top` keeps only that many of them, those of largest singular value.
    """
    top = top_left(w, k)
    found = intruders(base, w0, top)
    index = [j for j, c in enumerate(found.max_cos) if c < epsilon][:only_top]
    return Directions(index, top.U[:, index], [found.sigma[j] for j in index], [found.max_cos[j] for j in index])


def scale_directions(w: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """W with the singular values of the (singular, orthonormal) columns of `u` multiplied by λ."""
    return w - (1.0 - lam) * (u @ (u.T @ w))


@dataclass(frozen=True)
class Factors:
    """New LoRA factors and the relative Frobenius error of cutting the update back to their rank."""

    b: torch.Tensor
    a: torch.Tensor
    error: float


def refactor_lora(
    b: torch.Tensor, a: torch.Tensor, w: torch.Tensor, u: torch.Tensor, lam: float, scaling: float, transpose: bool
) -> Factors:
    """Factors B', A' of the same rank r with W0 + scaling·B'A' the best rank-r approximation of the fix.

    `w` = W0 + scaling·ΔW is the merged matrix as stored (ΔW = BA, or (BA)ᵀ with `transpose`), `u` the
    directions to scale. The new update ΔW' = ΔW − (1−λ)/scaling·U·Uᵀ·W has rank at most r + q; it is
    formed as a product of two thin factors, decomposed exactly through their QR factorisations, and
    cut to rank r, √S going to each side as PEFT does.
    """
    c = (1.0 - lam) / scaling
    if transpose:  # ΔW'ᵀ = BA − c·(WᵀU)·Uᵀ
        left, right = torch.cat([b, w.T @ u], dim=1), torch.cat([a, -c * u.T], dim=0)
    else:  # ΔW' = BA − c·U·(UᵀW)
        left, right = torch.cat([b, u], dim=1), torch.cat([a, -c * (u.T @ w)], dim=0)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    core_u, s, core_vh = torch.linalg.svd(r_left @ r_right.T)
    rank = a.shape[0]
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    new_b = torch.zeros_like(b)
    new_a = torch.zeros_like(a)
    new_b[:, :keep] = (q_left @ core_u[:, :keep]) * root
    new_a[:keep] = root[:, None] * (core_vh[:keep] @ q_right.T)
    total = s.square().sum()
    error = (s[keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return Factors(new_b, new_a, error)
