"""Everything measured on one matrix pair: intruder dimensions and the update's indicators."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ftaudit.analyses.indicators import (
    delta_spectrum,
    effective_rank,
    energy_rank,
    intruder_strength,
    numerical_rank,
    relative_update_norm,
    rounding_noise_floor,
    spectral_spike,
    storage_eps,
    subspace_drift,
)
from ftaudit.analyses.intruders import intruders
from ftaudit.blockwise import pair_sums, scale_exponent, scaled, unscaled
from ftaudit.cache import SpectrumCache
from ftaudit.low_rank import LowRankUpdate, top_left_updated
from ftaudit.pairing import TensorPair
from ftaudit.report import MatrixResult
from ftaudit.spectral import Spectrum, base_basis, top_left


class StoredPair:
    """A pair's base and tuned tensors as stored, handed over to `analyse_pair`, with the base's
    cache key (`tensor_key`), computed by the reader when there is a cache.

    The holder is the caller's only hold on the tensors, so that `analyse_pair` can let go of the
    tuned one (`take_tuned`) once it is measured, before the base's decomposition, the step that
    needs the most memory. A tuned tensor `derived` (given as None) is the base plus the pair's
    known low-rank update, in float64, which `analyse_pair` builds where it analyses the pair: the
    reader then holds no float64 copy of the matrix ahead of the analysis, nor copies one to a GPU.
    """

    def __init__(self, base: torch.Tensor, tuned: torch.Tensor | None, base_key: str | None = None) -> None:
        self.base = base
        self._tuned = tuned
        self.derived = tuned is None
        self.tuned_dtype = torch.float64 if tuned is None else tuned.dtype
        self.base_key = base_key

    @property
    def tuned(self) -> torch.Tensor:
        if self._tuned is None:
            raise RuntimeError("the tuned tensor was already taken")
        return self._tuned

    def take_tuned(self) -> torch.Tensor:
        """The tuned tensor, which this holder no longer keeps."""
        tuned = self.tuned
        self._tuned = None
        return tuned


class Skipped(Enum):
    """Why a pair gets no MatrixResult."""

    NONFINITE = "a matrix holds a NaN or ±inf"
    UNCHANGED = "the matrices are identical (ΔW = 0): nothing to measure"


@dataclass(frozen=True)
class _Update:
    """What is measured on ΔW = tuned − base before the base's decomposition."""

    relative_norm: float | None
    delta_sigma: torch.Tensor
    noise_floor: float
    tuned_top: Spectrum | None
    """The tuned top-k, when it needs no base spectrum (no known factors)."""


def analyse_pair(
    pair: TensorPair,
    stored: StoredPair,
    k: int,
    epsilon: float,
    device: torch.device,
    cache: SpectrumCache | None = None,
    update: LowRankUpdate | None = None,
) -> MatrixResult | Skipped:
    """All per-matrix analyses of one pair as stored, or why there are none (Skipped).

    `update`, when the tuned side is w0 + a known low-rank ΔW (an adapter), gives the tuned top-k
    and ΔW's spectrum from the factors instead of decomposing the tuned matrix and ΔW. Everything is
    computed in float64 from the stored tensors, upcast a block at a time, never whole. Without
    `update`, the tuned tensor is taken from `stored` and freed before the base is decomposed.
    Float64 weights whose squares would leave float64's range are measured scaled by a power of two
    (`scale_exponent`), and their singular values reported at their own scale.
    """
    exponent = scale_exponent(stored.base) if stored.derived else scale_exponent(stored.base, stored.tuned)
    w0 = scaled(stored.base.to(device, non_blocking=True), exponent)
    # A float64 tuned side is an adapter applied in float64: only the base carries storage rounding,
    # and it cancels in ΔW. Otherwise the rounding of either stored side shows up in ΔW.
    dtypes = () if stored.tuned_dtype == torch.float64 else (stored.base.dtype, stored.tuned_dtype)
    if update is None:  # the tuned matrix is needed only to measure ΔW and its own top k
        wt = None
        measured = _measure_update(w0, scaled(stored.take_tuned().to(device, non_blocking=True), exponent), dtypes, k, None)
    else:  # it also refines the top k found from the base's spectrum, below: moved to the device once
        update = update.to(device).scaled(exponent)
        wt = (w0.to(torch.float64, copy=True).addmm_(update.left, update.right) if stored.derived
              else scaled(stored.tuned.to(device, non_blocking=True), exponent))
        measured = _measure_update(w0, wt, dtypes, k, update)
    if isinstance(measured, Skipped):
        return measured
    if cache is None:
        base = base_basis(w0)
    else:
        assert stored.base_key is not None, "with a cache, the reader keys every analysed base tensor"
        base = cache.get_or_compute(stored.base_key, lambda: base_basis(w0)).to(device)
    tuned = measured.tuned_top
    if tuned is None:  # known factors: the tuned top-k comes from the base's spectrum
        assert update is not None and wt is not None
        tuned = top_left_updated(base, w0, wt, update, k)
    delta_sigma = measured.delta_sigma
    found = intruders(base, w0, tuned)
    base_sigma1 = base.sigma1
    drift = subspace_drift(base.top(w0, k), tuned.U, k)
    sigma = unscaled(found.sigma, exponent, pair.name)
    return MatrixResult(
        name=pair.name,
        kind=pair.kind,
        layer=pair.layer,
        shape=list(pair.shape),
        max_cos=found.max_cos,
        intruders=found.count(epsilon),
        sigma=sigma,
        match=found.match,
        outside_span=found.outside_span,
        indicators={
            "relative_update_norm": measured.relative_norm,
            "spectral_spike": spectral_spike(delta_sigma, base_sigma1),
            "effective_rank": effective_rank(delta_sigma),
            "energy_rank_90": energy_rank(delta_sigma, 0.9),
            "numerical_rank": numerical_rank(delta_sigma, pair.shape, measured.noise_floor),
            "subspace_drift_deg": drift[-1] if drift else 0.0,
        },
        intruder_strength=intruder_strength(sigma, found.max_cos, epsilon, unscaled([base_sigma1], exponent, pair.name)[0]),
    )


def _measure_update(
    w0: torch.Tensor, wt: torch.Tensor, dtypes: tuple[torch.dtype, ...], k: int, update: LowRankUpdate | None
) -> _Update | Skipped:
    """ΔW's norm, spectrum and rounding floor, and (without `update`) the tuned top-k; or why not."""
    sums = pair_sums(w0, wt, with_gram=update is None)
    if not sums.finite:
        return Skipped.NONFINITE
    if sums.delta_square == 0:
        return Skipped.UNCHANGED
    floor = rounding_noise_floor(sums, storage_eps(*dtypes)) if dtypes else 0.0
    relative = relative_update_norm(sums)
    sigma = delta_spectrum(sums) if update is None else update.singular_values()
    del sums  # ΔW's Gram matrix is freed before the tuned matrix is decomposed
    return _Update(relative, sigma, floor, top_left(wt, k) if update is None else None)
