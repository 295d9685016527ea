"""The audit: stream tensor pairs, analyse each matrix, assemble the report."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import torch

from ftaudit import __version__
from ftaudit.analyses.indicators import relative_update_norm
from ftaudit.analyses.intruders import intruders
from ftaudit.pairing import Selection, TensorPair, pair_tensors
from ftaudit.report import (
    EPSILONS,
    BaseRef,
    MatrixResult,
    ModelRef,
    Report,
    Settings,
    Summary,
    TensorIssues,
)
from ftaudit.sources.safetensors import TensorInfo
from ftaudit.cache import SpectrumCache, tensor_key
from ftaudit.spectral import Spectrum, base_basis, resolve_device, top_left, upcast


class Tensors(Protocol):
    """A side of the comparison: tensor headers, and tensors loaded one at a time."""

    @property
    def infos(self) -> dict[str, TensorInfo]: ...

    def load(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class AuditOptions:
    k: int = 10
    epsilon: float = 0.5
    epsilons: tuple[float, ...] = EPSILONS
    device: str = "auto"
    selection: Selection = field(default_factory=Selection)


Progress = Callable[[int, int, str], None]


def run_audit(
    model: ModelRef,
    base: BaseRef,
    tuned_side: Tensors,
    base_side: Tensors,
    options: AuditOptions,
    progress: Progress | None = None,
    cache: SpectrumCache | None = None,
) -> Report:
    """Audit every selected matrix pair; the verdict is left to the policy."""
    device = resolve_device(options.device)
    pairing = pair_tensors(base_side.infos, tuned_side.infos, options.selection)
    issues = TensorIssues(
        missing_in_base=pairing.missing_in_base,
        missing_in_model=pairing.missing_in_model,
        shape_mismatch=[{"name": n, "base": list(b), "model": list(t)} for n, b, t in pairing.shape_mismatch],
        vocab_resized=[
            {"name": n, "base_rows": b, "model_rows": t, "compared_rows": min(b, t)} for n, b, t in pairing.resized
        ],
        not_selected=pairing.not_selected,
    )
    results: list[MatrixResult] = []
    total = len(pairing.pairs)
    for i, (pair, w0, wt) in enumerate(_stream(pairing.pairs, base_side, tuned_side)):
        if progress:
            progress(i, total, pair.name)
        result = analyse_pair(pair, w0, wt, options, device, cache)
        if result is None:
            issues.nonfinite.append(pair.name)
        else:
            results.append(result)
    if progress:
        progress(total, total, "")
    settings = Settings(
        k=options.k,
        epsilon=options.epsilon,
        epsilons=list(options.epsilons),
        device=str(device),
        include=sorted(options.selection.kinds) + list(options.selection.globs),
        exclude=list(options.selection.exclude),
    )
    return Report(
        tool={"name": "ftaudit", "version": __version__},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model,
        base=base,
        settings=settings,
        summary=summarise(results, options),
        tensors=issues,
        matrices=results,
    )


def analyse_pair(
    pair: TensorPair,
    raw_w0: torch.Tensor,
    raw_wt: torch.Tensor,
    options: AuditOptions,
    device: torch.device,
    cache: SpectrumCache | None = None,
) -> MatrixResult | None:
    """All per-matrix analyses of one pair as stored; None when either matrix is not finite."""
    w0, wt = upcast(raw_w0, device), upcast(raw_wt, device)
    if not (torch.isfinite(w0).all() and torch.isfinite(wt).all()):
        return None
    if cache is None:
        base = base_basis(w0)
    else:
        cached = cache.get_or_compute(tensor_key(raw_w0), lambda: base_basis(w0))
        base = Spectrum(cached.U.to(device), cached.S.to(device))
    found = intruders(base, top_left(wt, options.k))
    return MatrixResult(
        name=pair.name,
        kind=pair.kind,
        layer=pair.layer,
        shape=list(pair.shape),
        max_cos=found.max_cos,
        intruders=found.count(options.epsilon),
        sigma=found.sigma,
        match=found.match,
        outside_span=found.outside_span,
        indicators={"relative_update_norm": relative_update_norm(w0, wt)},
    )


def summarise(results: Sequence[MatrixResult], options: AuditOptions) -> Summary:
    """Model-level totals over the analysed matrices."""
    examined = sum(len(r.max_cos) for r in results)
    norms = [n for r in results if (n := r.indicators.get("relative_update_norm")) is not None]
    total = sum(r.intruders for r in results)
    return Summary(
        matrices_analysed=len(results),
        intruder_dimensions=total,
        intruder_curve={f"{e:g}": sum(c < e for r in results for c in r.max_cos) for e in options.epsilons},
        matrices_with_intruders=sum(r.intruders > 0 for r in results),
        intruder_rate=total / examined if examined else 0.0,
        relative_update_norm_max=max(norms) if norms else None,
        relative_update_norm_median=statistics.median(norms) if norms else None,
    )


def _stream(
    pairs: Sequence[TensorPair], base: Tensors, tuned: Tensors
) -> Iterator[tuple[TensorPair, torch.Tensor, torch.Tensor]]:
    """Yield loaded pairs in order while a background thread reads the next one."""

    def load(pair: TensorPair) -> tuple[torch.Tensor, torch.Tensor]:
        w0, wt = base.load(pair.base_name), tuned.load(pair.tuned_name)
        return (w0, wt) if pair.rows is None else (w0[: pair.rows], wt[: pair.rows])

    if not pairs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftaudit-read") as pool:
        pending = pool.submit(load, pairs[0])
        for i, pair in enumerate(pairs):
            w0, wt = pending.result()
            if i + 1 < len(pairs):
                pending = pool.submit(load, pairs[i + 1])
            yield pair, w0, wt
