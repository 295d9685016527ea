"""Forgetting-risk indicators of the update ΔW = Wt − W0 (RESEARCH.md §2).

Pure functions of tensors on any device, computed in float64 whatever the tensors' stored dtype
(the stored matrices are upcast a block at a time, never whole). One pass over a pair,
`blockwise.pair_sums`, gathers the norms and ΔW's Gram matrix; the expensive step, the spectrum
of ΔW, is done once from it by `delta_spectrum` (eigvalsh, exact in float64 and much cheaper than
an SVD); the other per-matrix indicators take its result. Every function returns plain Python
numbers, reading back from the device once per call, never inside a loop over the data.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from ftaudit.blockwise import PairSums, row_norms, scale_exponent, scaled
from ftaudit.sources.safetensors import FLOAT_DTYPES
from ftaudit.spectral import gram_resolution

NOISE_FACTOR = 0.5
"""Rounding-noise tolerance, in units of eps·(max row norm + max column norm); see `rounding_noise_floor`."""


def relative_update_norm(sums: PairSums) -> float | None:
    """‖Wt − W0‖_F / ‖W0‖_F in float64: 0 for identical matrices, None when the base is all zeros."""
    scale = float(sums.base_rows.sum().item())
    if scale == 0.0:
        return 0.0 if sums.delta_square == 0.0 else None
    return math.sqrt(sums.delta_square / scale)


def delta_spectrum(sums: PairSums) -> torch.Tensor:
    """All min(m, n) singular values of ΔW = tuned − base, descending, on the input's device.

    From eigvalsh of the smaller Gram matrix gathered by `pair_sums` (ΔW·ΔWᵀ when m ≤ n, else
    ΔWᵀ·ΔW), clamped at 0 and square-rooted. In float64 the large values match an SVD to ~1e-15
    relative; values that are exactly zero come out as ~1e-8·σ1 (the square root of float64
    eigenvalue error), which `numerical_rank` allows for. Identical matrices give all zeros.
    """
    if sums.delta_gram is None:
        raise ValueError("delta_spectrum needs pair_sums(..., with_gram=True)")
    return torch.linalg.eigvalsh(sums.delta_gram).flip(-1).clamp(min=0).sqrt()


def spectral_spike(delta_sigma: torch.Tensor, base_sigma1: float) -> float | None:
    """σ1(ΔW) / σ1(W0): 0 when ΔW = 0, None when the base is all zeros and ΔW is not."""
    top = delta_sigma.max().item() if delta_sigma.numel() else 0.0
    if top == 0.0:
        return 0.0
    return top / base_sigma1 if base_sigma1 > 0.0 else None


def energy_rank(delta_sigma: torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ fraction · Σ σ_i² (σ descending); 0 when ΔW = 0."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if delta_sigma.numel() == 0:
        return 0
    energy = torch.cumsum(delta_sigma.square(), dim=0)
    total = energy[-1]
    # Count of prefixes still short of the target, +1; the last prefix is the total itself, so
    # fraction = 1 cannot overrun through rounding. ΔW = 0 gives 0 short prefixes and total 0.
    short = (energy < fraction * total).sum()
    r, total_value = torch.stack([short.to(energy.dtype), total]).tolist()
    return 0 if total_value == 0.0 else min(int(r) + 1, delta_sigma.numel())


def effective_rank(delta_sigma: torch.Tensor) -> float:
    """exp(−Σ p_i ln p_i), p_i = σ_i / Σσ (Roy & Vetterli 2007); 0 when ΔW = 0.

    Lies in [1, min(m, n)] otherwise: (1, 1, 1, 1) gives 4, (1, 0, 0) gives 1 (0·ln 0 = 0).
    """
    total = delta_sigma.sum()
    p = delta_sigma / torch.where(total > 0, total, torch.ones_like(total))
    entropy = -torch.special.xlogy(p, p).sum()
    value, total_value = torch.stack([torch.exp(entropy), total]).tolist()
    return value if total_value > 0.0 else 0.0


def storage_eps(*dtypes: torch.dtype | str) -> float:
    """Machine epsilon of the coarsest of the given storage dtypes (torch dtypes or safetensors
    names such as "F32", "F16", "BF16"): 2^-23 for F32, 2^-10 for F16, 2^-7 for BF16.

    Pass both the base's and the tuned model's stored dtype: rounding in either shows in ΔW.
    """
    if not dtypes:
        raise ValueError("storage_eps needs at least one dtype")
    resolved = [FLOAT_DTYPES[d] if isinstance(d, str) else d for d in dtypes]
    return max(torch.finfo(d).eps for d in resolved)


def rounding_noise_floor(sums: PairSums, eps: float) -> float:
    """Tolerance for singular values of ΔW that storage rounding alone can produce.

    Storing a weight w rounds it by at most half an ulp, ≤ eps·|w|/2, so ΔW carries a noise matrix E
    with independent-looking entries of standard deviation ≈ 0.2·eps·|w_ij|. By random-matrix bounds
    (Bandeira & van Handel 2016) its largest singular value is about that scale times
    (max row norm + max column norm) of the weights; measured on Gaussian weights in F32, F16 and
    BF16 (48 to 4096 wide) it is 0.17–0.21 · eps · (R + C), R and C the largest row and column L2
    norms of either matrix, and 0.28 when both matrices were rounded independently from a common
    master. The floor is NOISE_FACTOR = 0.5 times eps·(R + C): 2.5× the first, 1.8× the second;
    using the largest norms keeps it safe for weights with outlier rows or columns. `eps` is from
    `storage_eps`; 0 (float64 storage) gives 0. The norms come from `pair_sums`.
    """
    if eps == 0.0 or sums.base_rows.numel() == 0 or sums.base_cols.numel() == 0:
        return 0.0
    largest = torch.stack(
        [torch.maximum(sums.base_rows.max(), sums.tuned_rows.max()), torch.maximum(sums.base_cols.max(), sums.tuned_cols.max())]
    ).sqrt().sum()
    return NOISE_FACTOR * eps * largest.item()


def numerical_rank(delta_sigma: torch.Tensor, shape: tuple[int, int], noise_floor: float = 0.0) -> int:
    """Number of singular values of ΔW above tol = max(noise_floor, √(max(m, n)·eps64)·σ1(ΔW)).

    `noise_floor` is `rounding_noise_floor(...)`: without it every stored update looks full rank,
    because rounding the stored weights adds a full-rank noise matrix to ΔW. With it, a merged
    rank-r LoRA stored in F32, F16 or BF16 counts as rank r provided its r-th singular value
    clears the floor (a tiny update in BF16 may not, and counts lower), and a model that was only
    re-saved in a coarser dtype counts as rank 0. The second term is the float64 accuracy
    of `delta_spectrum` (zeros come out at ~1e-8·σ1; the term is ~20× that). 0 when ΔW = 0.
    """
    if delta_sigma.numel() == 0:
        return 0
    arithmetic = gram_resolution(shape) * delta_sigma.max()
    tol = torch.clamp(arithmetic, min=noise_floor)
    return int((delta_sigma > tol).sum().item())


def subspace_drift(base_U: torch.Tensor, tuned_U: torch.Tensor, k: int) -> list[float]:
    """Principal angles, in degrees and ascending, between span(base_U[:, :k]) and span(tuned_U[:, :k]).

    Columns must be orthonormal (as from `left_spectrum`); k is capped at each side's number of columns. Where
    that leaves the two sides with different numbers (one of rank under k, as from `top_left` or `base_basis`),
    neither span can be the other, and the last angle is 90°. Cosines come from the singular values of Aᵀ·B and
    sines from those of B − A·(Aᵀ·B); each angle is taken from the sine when below 45° and from the cosine
    above, so small angles stay accurate (Knyazev & Argentati 2002). The last entry is the largest angle. If the
    base has tied singular values at position k, its top-k subspace is not unique and neither are the angles.
    """
    sides = min(k, base_U.shape[1]), min(k, tuned_U.shape[1])
    apart = [90.0] if sides[0] != sides[1] else []
    k = min(sides)
    if k <= 0:
        return apart
    A, B = base_U[:, :k], tuned_U[:, :k]
    cross = A.mT @ B
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending: smallest angle first
    sin = torch.linalg.svdvals(B - A @ cross).clamp(0.0, 1.0).flip(-1)  # ascending: smallest angle first
    angles = torch.where(sin < math.sqrt(0.5), torch.asin(sin), torch.acos(cos))
    return torch.rad2deg(angles).sort().values.tolist() + apart


def intruder_strength(
    sigma: Sequence[float], max_cos: Sequence[float], epsilon: float, base_sigma1: float
) -> list[dict[str, float | int | None]]:
    """Each intruder (max_cos < epsilon) among the tuned top-k vectors, in order.

    `sigma` and `max_cos` are the tuned top-k singular values (descending) and their cosines, as in
    `IntruderResult`. Each entry: "rank", the vector's 1-based position among the tuned singular
    values (1 = the dominant direction); "sigma"; "relative_sigma" = sigma / σ1(W0), None when the
    base is all zeros.
    """
    return [
        {"rank": j + 1, "sigma": s, "relative_sigma": s / base_sigma1 if base_sigma1 > 0.0 else None}
        for j, (s, c) in enumerate(zip(sigma, max_cos, strict=True))
        if c < epsilon
    ]


HEAD_FIGURES = ("mean_norm_ratio", "median_relative_change", "max_relative_change", "zero_base_rows")
"""What `row_norm_drift` measures of a head or embedding."""


def row_norm_drift(base: torch.Tensor, tuned: torch.Tensor) -> dict[str, float | None] | None:
    """Drift of row L2 norms, for output heads and embeddings (one row per class or token).

    A heuristic, weight-only proxy for logit-scale miscalibration: Mai et al. 2024 ("Fine-Tuning
    is Fine, if Calibrated") find forgetting of absent classes is largely a logit-scale shift,
    which shows in the head's row norms but is not measured here on any data.

    "mean_norm_ratio": mean tuned row norm / mean base row norm (1 if both are 0, None if only
    the base is). "median_relative_change" (signed) and "max_relative_change" (largest absolute)
    of (‖t_i‖ − ‖b_i‖) / ‖b_i‖ over rows whose base row is not all zeros; None if there are none.
    "zero_base_rows": how many base rows were all zeros (excluded from the per-row figures).
    None when either matrix holds a NaN or ±inf (its row's float64 norm then does too). Every figure
    is a ratio: float64 weights beyond float64's squaring range are measured scaled (`scale_exponent`).
    """
    exponent = scale_exponent(base, tuned)
    nb, nt = row_norms(scaled(base, exponent)), row_norms(scaled(tuned, exponent))
    if not bool(torch.isfinite(nb.sum() + nt.sum())):
        return None
    live = nb > 0
    change = (nt[live] - nb[live]) / nb[live]
    if change.numel():
        per_row = torch.stack([torch.quantile(change, 0.5), change.abs().max()])
    else:
        per_row = torch.full((2,), math.nan, dtype=nb.dtype, device=nb.device)
    mean_b, mean_t, median, largest, zero_rows = torch.cat(
        [torch.stack([nb.mean(), nt.mean()]), per_row, (~live).sum().to(nb.dtype).reshape(1)]
    ).tolist()
    if mean_b > 0.0:
        ratio: float | None = mean_t / mean_b
    else:
        ratio = 1.0 if mean_t == 0.0 else None
    return dict(zip(HEAD_FIGURES, (ratio, None if math.isnan(median) else median,
                                   None if math.isnan(largest) else largest, float(zero_rows))))


def low_rank_bound(shape: tuple[int, int]) -> int:
    """Largest numerical rank that still counts as a low-rank (LoRA-like) update: min(64, min(m, n) // 4)."""
    return min(64, min(shape) // 4)


def classify_update(
    relative_norms: Sequence[float | None], numerical_ranks: Sequence[int], shapes: Sequence[tuple[int, int]],
    unchanged: int = 0,
) -> dict[str, object]:
    """Model-level kind of update, from the per-matrix relative norms and numerical ranks of the analysed
    matrices, and the count of `unchanged` ones (identical in both models, not analysed).

    A matrix changed when its relative norm is not 0 (None, a zero base that changed, counts).
    A changed matrix is low-rank when 0 < numerical rank ≤ `low_rank_bound(shape)`, and within
    rounding when its numerical rank is 0 (ΔW is no more than storage-rounding noise).

    "update" describes the changed matrices: "low-rank" (all that are above rounding are
    low-rank: a merged LoRA), "full" (any dense), "requantised" (all within rounding, e.g. the
    model was only re-saved in another dtype), None (nothing changed). "type" is "untouched" when
    nothing changed, "partial" when some matrices changed and others did not, else `update`.
    "rank": the median numerical rank of the low-rank matrices when update is "low-rank"
    ("low-rank update, r ≈ 8"), else None. Counts: "changed", "total", "low_rank", "within_rounding".
    """
    if not len(relative_norms) == len(numerical_ranks) == len(shapes):
        raise ValueError("relative_norms, numerical_ranks and shapes must have the same length")
    changed = [(r, s) for n, r, s in zip(relative_norms, numerical_ranks, shapes) if n != 0.0]
    effective = [(r, s) for r, s in changed if r > 0]
    low = [r for r, s in effective if r <= low_rank_bound(s)]
    update: str | None
    if not changed:
        update = None
    elif not effective:
        update = "requantised"
    elif len(low) == len(effective):
        update = "low-rank"
    else:
        update = "full"
    if update is None:
        kind = "untouched"
    elif len(changed) < len(shapes) + unchanged:
        kind = "partial"
    else:
        kind = update
    return {
        "type": kind,
        "update": update,
        "rank": round(statistics.median(low)) if update == "low-rank" else None,
        "changed": len(changed),
        "total": len(shapes) + unchanged,
        "low_rank": len(low),
        "within_rounding": len(changed) - len(effective),
    }
