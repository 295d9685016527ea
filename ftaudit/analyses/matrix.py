"""Everything measured on one matrix pair: intruder dimensions and the update's indicators."""

from __future__ import annotations

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
from ftaudit.blockwise import pair_sums
from ftaudit.cache import SpectrumCache, tensor_key
from ftaudit.low_rank import LowRankUpdate, top_left_updated
from ftaudit.pairing import TensorPair
from ftaudit.report import MatrixResult
from ftaudit.spectral import Spectrum, base_basis, top_left


def analyse_pair(
    pair: TensorPair,
    raw_w0: torch.Tensor,
    raw_wt: torch.Tensor,
    k: int,
    epsilon: float,
    device: torch.device,
    cache: SpectrumCache | None = None,
    update: LowRankUpdate | None = None,
) -> MatrixResult | None:
    """All per-matrix analyses of one pair as stored; None when either matrix holds a NaN or ±inf.

    `update`, when the tuned side is w0 + a known low-rank ΔW (an adapter), gives the tuned top-k
    and ΔW's spectrum from the factors instead of decomposing the tuned matrix and ΔW. Everything is
    computed in float64 from the stored tensors, upcast a block at a time, never whole.
    """
    w0, wt = raw_w0.to(device, non_blocking=True), raw_wt.to(device, non_blocking=True)
    update = update.to(device) if update is not None else None
    sums = pair_sums(w0, wt, with_gram=update is None)
    if not sums.finite:
        return None
    # A float64 tuned side is an adapter applied in float64: only the base carries storage rounding,
    # and it cancels in ΔW. Otherwise the rounding of either stored side shows up in ΔW.
    dtypes = () if raw_wt.dtype == torch.float64 else (raw_w0.dtype, raw_wt.dtype)
    floor = rounding_noise_floor(sums, storage_eps(*dtypes)) if dtypes else 0.0
    relative = relative_update_norm(sums)
    delta_sigma = delta_spectrum(sums) if update is None else update.singular_values()
    del sums  # ΔW's Gram matrix is as large as the base's, which is decomposed next
    if cache is None:
        base = base_basis(w0)
    else:
        cached = cache.get_or_compute(tensor_key(raw_w0), lambda: base_basis(w0))
        base = Spectrum(cached.U.to(device), cached.S.to(device))
    tuned = top_left(wt, k) if update is None else top_left_updated(base, w0, wt, update, k)
    found = intruders(base, tuned)
    base_sigma1 = base.S[0].item()
    drift = subspace_drift(base.U[:, :k].to(torch.float64), tuned.U, k)
    return MatrixResult(
        name=pair.name,
        kind=pair.kind,
        layer=pair.layer,
        shape=list(pair.shape),
        max_cos=found.max_cos,
        intruders=found.count(epsilon),
        sigma=found.sigma,
        match=found.match,
        outside_span=found.outside_span,
        indicators={
            "relative_update_norm": relative,
            "spectral_spike": spectral_spike(delta_sigma, base_sigma1),
            "effective_rank": effective_rank(delta_sigma),
            "energy_rank_90": energy_rank(delta_sigma, 0.9),
            "numerical_rank": numerical_rank(delta_sigma, pair.shape, floor),
            "subspace_drift_deg": drift[-1] if drift else 0.0,
        },
        intruder_strength=intruder_strength(found.sigma, found.max_cos, epsilon, base_sigma1),
    )
