"""Spectra of a base matrix plus a known low-rank update, W = W0 + L·R (a LoRA adapter's ΔW).

The tuned Gram matrix is G = W·Wᵀ = G0 + C·M·Cᵀ with C = [L, W0·Rᵀ] (m × 2r) and
M = [[R·Rᵀ, I], [I, 0]]. In the base's left basis U0 (completed, for a tall or rank-deficient base, by the part
of C outside its column space), G0 is the diagonal D of the base's squared singular values, so G is "diagonal plus
rank 2r". Its top eigenvalues come from Sylvester's law of inertia, each by multisection on a
2r × 2r count, and its eigenvectors from the secular formula x = (θ − D)⁻¹·Ĉ·w, w spanning the null space
of M⁻¹ − Ĉᵀ(θ − D)⁻¹Ĉ. The result is refined and certified by `refine_top_left` against W itself,
so no second full decomposition is made; where it cannot be certified, the full one is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftaudit import blockwise
from ftaudit.spectral import Basis, Spectrum, left_spectrum, nonzero, refine_top_left, top_left

FACTOR_ROUTE_MIN = 512
"""Below this many rows or columns a float32 start on the tuned matrix (`top_left`) is cheaper than
the factor route's fixed cost of SEARCH_STEPS small batched solves."""
OUTSIDE_FLOOR = 1e-4
"""Part of C, relative to ‖C‖₂, below which a direction found outside a tall base's column space is
rounding of its basis (float32 U, or V with U = W·V·Σ⁻¹: at most κ·6e-8 ≤ 6e-5), not the update's."""
SECTIONS = 8
"""Each search step splits every eigenvalue's interval into this many parts (multisection)."""
SEARCH_STEPS = 16
"""Steps of the search: the interval shrinks by SECTIONS**SEARCH_STEPS = 2^48, to float64's reach."""


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = left @ right exactly, in float64: left is m × r, right is r × n, scaling folded in."""

    left: torch.Tensor
    right: torch.Tensor

    def to(self, device: torch.device) -> LowRankUpdate:
        return LowRankUpdate(self.left.to(device), self.right.to(device))

    def scaled(self, exponent: int) -> LowRankUpdate:
        """2^exponent·ΔW (`blockwise.scaled`)."""
        return LowRankUpdate(blockwise.scaled(self.left, exponent), self.right)

    def transposed(self) -> LowRankUpdate:
        """ΔWᵀ = rightᵀ @ leftᵀ."""
        return LowRankUpdate(self.right.mT.contiguous(), self.left.mT.contiguous())

    def rows(self, start: int, stop: int) -> LowRankUpdate:
        """The update restricted to rows [start, stop)."""
        return LowRankUpdate(self.left[start:stop], self.right)

    def singular_values(self) -> torch.Tensor:
        """All min(m, n) singular values of ΔW, descending: those of R_L·R_Rᵀ, then zeros."""
        r_left = torch.linalg.qr(self.left).R
        r_right = torch.linalg.qr(self.right.mT).R
        values = torch.linalg.svdvals(r_left @ r_right.mT)
        size = min(self.left.shape[0], self.right.shape[1])
        return torch.cat([values, values.new_zeros(max(size - values.numel(), 0))])[:size]


def top_left_updated(base: Basis, w0: torch.Tensor, wt: torch.Tensor, update: LowRankUpdate, k: int) -> Spectrum:
    """The top-k left singular pairs of wt = w0 + update of nonzero singular value (as `top_left` gives them),
    from the base's spectrum and the factors.

    `base` is the base's basis of its column space (as from `base_basis`); `wt` serves only to refine and
    certify the vectors (a few products with it), never to decompose it. Small matrices (under
    FACTOR_ROUTE_MIN) go through `top_left`, which is cheaper there.
    """
    if min(wt.shape) < FACTOR_ROUTE_MIN:
        return top_left(wt, k)
    k = min(k, *wt.shape)
    try:
        start = _secular_vectors(base, w0, update, k + 1) if k < min(wt.shape) else None
    except torch.linalg.LinAlgError:  # a shift landed on a base value exactly
        start = None
    refined = refine_top_left(wt, start, k) if start is not None else None
    return nonzero(wt, refined if refined is not None else left_spectrum(wt, count=k))


def _secular_vectors(base: Basis, w0: torch.Tensor, update: LowRankUpdate, count: int) -> torch.Tensor | None:
    """The top `count` eigenvectors of G = (w0 + L·R)(w0 + L·R)ᵀ, as columns; None if not finite, or if G has fewer
    than `count` nonzero eigenvalues (the others' vectors are any basis of its null space)."""
    left, right = update.left, update.right
    r = right.shape[0]
    c = torch.cat([left, blockwise.times(w0, right.mT)], 1)
    c_hat = base.transposed_times(w0, c)
    d = base.S.to(torch.float64).square()
    outside = None
    if w0.shape[0] > base.rank:  # tall or rank-deficient: the update may leave the base's column space
        outside = c - base.times(w0, c_hat)
        outside = outside - base.times(w0, base.transposed_times(w0, outside))
        # What the projections leave of C's part inside the column space is rounding of the basis,
        # at most OUTSIDE_FLOOR of C: kept as a direction, it would enter D with value 0.
        directions, sizes, _ = torch.linalg.svd(outside, full_matrices=False)
        outside = directions[:, sizes > OUTSIDE_FLOOR * torch.linalg.matrix_norm(c, 2)]
        c_hat = torch.cat([c_hat, outside.mT @ c])
        d = torch.cat([d, d.new_zeros(outside.shape[1])])
    if d.numel() < count:  # G's range lies in span(U0, outside), of dimension d.numel()
        return None
    eye, zero = torch.eye(r, dtype=c.dtype, device=c.device), torch.zeros(r, r, dtype=c.dtype, device=c.device)
    m_inv = torch.cat([torch.cat([zero, eye], 1), torch.cat([eye, -right @ right.mT], 1)])

    def secular(shifts: torch.Tensor) -> torch.Tensor:
        """Ĉᵀ(σ − D)⁻¹Ĉ − M⁻¹ for each shift σ (batch × 2r × 2r)."""
        weights = 1.0 / (shifts[:, None] - d[None, :])
        return (c_hat.mT[None] * weights[:, None, :]) @ c_hat - m_inv

    def above(shifts: torch.Tensor) -> torch.Tensor:
        """How many eigenvalues of G exceed each shift (Sylvester inertia of the bordered system)."""
        positive = (torch.linalg.eigvalsh(secular(shifts)) > 0).sum(1)
        return (d[None, :] > shifts[:, None]).sum(1) + positive - r

    top = (base.sigma1 + (torch.linalg.matrix_norm(left) * torch.linalg.matrix_norm(right)).item()) ** 2
    wanted = torch.arange(1, count + 1, device=c.device)
    low, high = torch.zeros(count, dtype=c.dtype, device=c.device), torch.full_like(d[:count], top * (1 + 1e-9))
    fractions = torch.arange(1, SECTIONS, dtype=c.dtype, device=c.device) / SECTIONS
    for _ in range(SEARCH_STEPS):
        shifts = low[:, None] + (high - low)[:, None] * fractions
        below = (above(shifts.flatten()).view_as(shifts) >= wanted[:, None]).sum(1, keepdim=True)
        grid = torch.cat([low[:, None], shifts, high[:, None]], 1)
        low, high = grid.gather(1, below).squeeze(1), grid.gather(1, below + 1).squeeze(1)
    theta = (low + high) / 2
    values, vectors = torch.linalg.eigh(secular(theta))
    null = vectors[torch.arange(count, device=vectors.device), :, values.abs().argmin(1)]
    coords = ((null @ c_hat.mT) / (theta[:, None] - d[None, :])).mT
    x = base.times(w0, coords[: base.rank])
    if outside is not None:
        x = x + outside @ coords[base.rank :]
    return x if bool(torch.isfinite(x).all()) else None
