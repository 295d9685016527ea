"""Intruder dimensions (Shuttleworth et al., arXiv 2410.21228).

A top-k left singular vector u_j of the tuned matrix is an intruder at threshold ε when its
largest |cosine| with every left singular vector of the base matrix is below ε.

Singular vectors of a zero singular value are no directions of the matrix: any orthonormal basis of
its null space is an equally valid choice, and so would be any cosine with them. Both sides keep only
the vectors of nonzero singular value (`ftaudit.spectral.rank_tolerance`): a tuned matrix of rank
r < k has r vectors examined (none when it is all zeros), and the base's are a basis of its column
space, so a tuned direction in the base's null space is an intruder.

That column space is all of R^m only for a base of rank m. A tall matrix (m > n) has only n left
singular vectors, spanning an n-dimensional subspace of R^m; a rank-deficient one (zero-initialised,
pruned) fewer. ftaudit compares against exactly those vectors, as the definition says, and does not
complete them to a basis of R^m (any completion would be arbitrary, and so would the cosines with it).
A tuned vector that leaves the base's column space therefore scores low; the fraction of its energy
outside that space is reported beside it as `outside_span`. Against an all-zero base, every tuned
vector scores 0, wholly outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftaudit.spectral import Basis, Spectrum


@dataclass(frozen=True)
class IntruderResult:
    """Per examined tuned vector (the top k of nonzero singular value), in order of decreasing singular value."""

    max_cos: list[float]
    """Largest |cos| against any base left singular vector of nonzero singular value (0 when there is none)."""
    match: list[int | None]
    """Index (0 = largest) of the base singular vector that attains it; None when the base is all zeros."""
    sigma: list[float]
    """The tuned matrix's singular values for these vectors."""
    outside_span: list[float]
    """Fraction of each vector's energy outside the base's column space (0 when that space is all of R^m)."""

    def count(self, epsilon: float) -> int:
        """Number of intruders at threshold `epsilon`."""
        return sum(c < epsilon for c in self.max_cos)


def intruders(base: Basis, w0: torch.Tensor, tuned_top: Spectrum) -> IntruderResult:
    """Compare the tuned top-k left singular vectors with the base matrix w0's basis of its column space."""
    cos = base.transposed_times(w0, tuned_top.U.to(torch.float64))
    examined = cos.shape[1]
    if base.rank:
        best, where = cos.abs().max(dim=0)
        max_cos, match = best.tolist(), where.tolist()
    else:
        max_cos, match = [0.0] * examined, [None] * examined
    if w0.shape[0] > base.rank:
        outside = (1.0 - (cos * cos).sum(dim=0)).clamp(min=0.0).tolist()
    else:
        outside = [0.0] * examined  # the base vectors are a complete basis of R^m
    return IntruderResult(max_cos=max_cos, match=match, sigma=tuned_top.S.tolist(), outside_span=outside)
