"""Model-level figures: totals and aggregates of the per-matrix results."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

from ftaudit.analyses.indicators import classify_update
from ftaudit.report import MatrixResult, Summary


def _values(results: Sequence[MatrixResult], key: str) -> list[float]:
    return [v for r in results if (v := r.indicators.get(key)) is not None]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _max(values: Sequence[float]) -> float | None:
    return max(values) if values else None


def _group(results: Sequence[MatrixResult]) -> dict[str, object]:
    norms = _values(results, "relative_update_norm")
    return {
        "matrices": len(results),
        "intruders": sum(r.intruders for r in results),
        "relative_update_norm_median": _median(norms),
        "relative_update_norm_max": _max(norms),
        "spectral_spike_max": _max(_values(results, "spectral_spike")),
    }


def summarise(
    results: Sequence[MatrixResult], epsilons: Sequence[float], heads: dict[str, dict[str, float | None]],
    unchanged: int = 0,
) -> Summary:
    """Totals over the analysed matrices, aggregates by module kind and by layer, the update type (which
    also counts the `unchanged` matrices, identical in both models and not analysed)."""
    examined = sum(len(r.max_cos) for r in results)
    total = sum(r.intruders for r in results)
    by_kind: dict[str, list[MatrixResult]] = defaultdict(list)
    by_layer: dict[str, list[MatrixResult]] = defaultdict(list)
    for r in results:
        by_kind[r.kind].append(r)
        by_layer["none" if r.layer is None else str(r.layer)].append(r)
    strengths = [s["relative_sigma"] for r in results for s in r.intruder_strength if s["relative_sigma"] is not None]
    ratios = [abs(d["mean_norm_ratio"] - 1.0) for d in heads.values() if d["mean_norm_ratio"] is not None]
    return Summary(
        matrices_analysed=len(results),
        intruder_dimensions=total,
        intruder_curve={f"{e:g}": sum(c < e for r in results for c in r.max_cos) for e in epsilons},
        matrices_with_intruders=sum(r.intruders > 0 for r in results),
        intruder_rate=total / examined if examined else 0.0,
        intruder_strength_max=max(strengths, default=0.0),
        relative_update_norm_max=_max(_values(results, "relative_update_norm")),
        relative_update_norm_median=_median(_values(results, "relative_update_norm")),
        spectral_spike_max=_max(_values(results, "spectral_spike")),
        spectral_spike_median=_median(_values(results, "spectral_spike")),
        effective_rank_median=_median(_values(results, "effective_rank")),
        energy_rank_90_median=_median(_values(results, "energy_rank_90")),
        subspace_drift_deg_max=_max(_values(results, "subspace_drift_deg")),
        head_scale_drift=max(ratios) if ratios else None,
        update=classify_update(
            [r.indicators["relative_update_norm"] for r in results],
            [int(r.indicators["numerical_rank"] or 0) for r in results],
            [(r.shape[0], r.shape[1]) for r in results],
            unchanged,
        ),
        by_kind={kind: _group(group) for kind, group in sorted(by_kind.items())},
        by_layer={layer: _group(group) for layer, group in sorted(by_layer.items(), key=_layer_order)},
        heads=heads,
    )


def _layer_order(item: tuple[str, object]) -> tuple[int, int]:
    return (1, 0) if item[0] == "none" else (0, int(item[0]))
