"""Intruder dimensions (Shuttleworth et al., arXiv 2410.21228).

A top-k left singular vector u_j of the tuned matrix is an intruder at threshold ε when its
largest |cosine| with every left singular vector of the base matrix is below ε.

Tall matrices (m > n): the base has only n left singular vectors, which span an n-dimensional
subspace of R^m. ftaudit compares against exactly those n vectors, as the definition says, and does
not complete them to a basis of R^m (any completion would be arbitrary, and so would the cosines
with it). A tuned vector that leaves the base's column space therefore scores low; the fraction of
its energy outside that space is reported beside it as `outside_span`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftaudit.spectral import Basis, Spectrum


@dataclass(frozen=True)
class IntruderResult:
    """Per examined tuned vector, in order of decreasing singular value."""

    max_cos: list[float]
    """Largest |cos| against any base left singular vector."""
    match: list[int]
    """Index (0 = largest) of the base singular vector that attains it."""
    sigma: list[float]
    """The tuned matrix's singular values for these vectors."""
    outside_span: list[float]
    """Fraction of each vector's energy outside the base's column space (0 unless tall)."""

    def count(self, epsilon: float) -> int:
        """Number of intruders at threshold `epsilon`."""
        return sum(c < epsilon for c in self.max_cos)


def intruders(base: Basis, w0: torch.Tensor, tuned_top: Spectrum) -> IntruderResult:
    """Compare the tuned top-k left singular vectors with the full left basis of the base matrix w0."""
    cos = base.transposed_times(w0, tuned_top.U.to(torch.float64))
    best, where = cos.abs().max(dim=0)
    if w0.shape[0] > base.rank:
        outside = (1.0 - (cos * cos).sum(dim=0)).clamp(min=0.0).tolist()
    else:
        outside = [0.0] * cos.shape[1]  # the base vectors are a complete basis of R^m
    return IntruderResult(max_cos=best.tolist(), match=where.tolist(), sigma=tuned_top.S.tolist(), outside_span=outside)
