"""The audit: stream tensor pairs, analyse each matrix, assemble the report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import torch

from ftaudit import __version__
from ftaudit.analyses.indicators import HEAD_FIGURES, row_norm_drift
from ftaudit.analyses.matrix import Skipped, StoredPair, analyse_pair
from ftaudit.cache import SpectrumCache, flushed, tensor_key
from ftaudit.layout import Layout, as_analysed
from ftaudit.low_rank import LowRankUpdate
from ftaudit.pairing import VOCAB_KINDS, Selection, TensorPair, pair_tensors
from ftaudit.parallel import in_order, threads_per_worker, worker_count
from ftaudit.report import (
    EPSILONS,
    BaseRef,
    MatrixResult,
    ModelRef,
    Report,
    Settings,
    TensorIssues,
)
from ftaudit.shards import Shard, assignment, matrix_order
from ftaudit.sources.safetensors import TensorInfo
from ftaudit.spectral import resolve_device
from ftaudit.summary import summarise

log = logging.getLogger("ftaudit")


class Tensors(Protocol):
    """A side of the comparison: tensor headers, and tensors loaded one at a time."""

    @property
    def infos(self) -> dict[str, TensorInfo]: ...

    def load(self, name: str, expert: int | None = None) -> torch.Tensor:
        """Tensor `name`, or expert `expert`'s matrix of a stack of experts, as stored."""
        ...


@dataclass(frozen=True)
class AuditOptions:
    k: int = 10
    epsilon: float = 0.5
    epsilons: tuple[float, ...] = EPSILONS
    device: str = "auto"
    selection: Selection = field(default_factory=Selection)
    shard: Shard | None = None
    """Audit only this part of the matrices (ftaudit.shards)."""


Progress = Callable[[int, int, str], None]
Updates = Callable[[str, int | None], LowRankUpdate | None]
"""The tuned side's known low-rank ΔW of a tensor (or of an expert's matrix of a stack), if any: an adapter's factors."""


def run_audit(
    model: ModelRef,
    base: BaseRef,
    tuned_side: Tensors,
    base_side: Tensors,
    options: AuditOptions,
    progress: Progress | None = None,
    cache: SpectrumCache | None = None,
    updates: Updates | None = None,
    unchanged: Collection[str] = frozenset(),
    layout: Layout = Layout(),
    aliases: Mapping[str, str] = {},
) -> Report:
    """Audit every selected matrix pair; the verdict is left to the policy. `unchanged` names the base
    tensors a tuned side that lists only what it changes (an adapter) leaves as they are; `layout`
    says which of the models' tensors hold their matrices in × out (ftaudit.layout); `aliases` gives
    tuned tensors another name that selects them too (an adapter's tied head)."""
    device = resolve_device(options.device)
    pairing = pair_tensors(base_side.infos, tuned_side.infos, options.selection, unchanged, layout, aliases)
    for glob in pairing.unmatched_globs:
        log.warning("%r matches no weight matrix of either model (names as in the report)", glob)
    issues = TensorIssues(
        missing_in_base=pairing.missing_in_base,
        missing_in_model=pairing.missing_in_model,
        shape_mismatch=[{"name": n, "base": list(b), "model": list(t)} for n, b, t in pairing.shape_mismatch],
        vocab_resized=[
            {"name": n, "base_rows": b, "model_rows": t, "compared_rows": min(b, t)} for n, b, t in pairing.resized
        ],
        not_selected=pairing.not_selected,
        unchanged=list(pairing.unchanged),  # a copy: the analysis adds those it finds
    )
    results: list[MatrixResult] = []
    heads: dict[str, dict[str, float | None]] = {}
    # Embeddings and heads measured only for their row norms are often the largest tensors: read
    # first, they are analysed beside the matrices instead of after them.
    scale, pairs = pairing.scale_only, pairing.pairs
    if options.shard is not None:
        scale, pairs = options.shard.take(scale, _cells), options.shard.take(pairs, _work)
    given = [pair.name for pair in pairs] + pairing.unchanged  # every shard lists the pairing's unchanged as its own
    todo = scale + pairs
    scale_only = len(scale)

    def analyse(
        item: tuple[int, Loaded],
    ) -> tuple[int, TensorPair, dict[str, float | None] | None, MatrixResult | Skipped | None]:
        i, (pair, stored, update) = item
        head = row_norm_drift(stored.base.to(device), stored.tuned.to(device)) if pair.kind in VOCAB_KINDS else None
        if i < scale_only:
            return i, pair, head, None
        return i, pair, head, analyse_pair(pair, stored, options.k, options.epsilon, device, cache, update)

    workers = worker_count(device, [pair.shape for pair in pairs])
    loaded = _stream(todo, base_side, tuned_side, updates, pin=device if device.type == "cuda" else None, key=cache is not None, scale_only=scale_only)
    stream = enumerate(loaded)
    with flushed(cache), threads_per_worker(workers):
        for i, pair, head, result in in_order(stream, analyse, workers):
            if head is not None:
                heads[pair.name] = head
            elif result is None:  # measured for its row norms alone, which a NaN or ±inf leaves without a figure
                heads[pair.name] = dict.fromkeys(HEAD_FIGURES)
                issues.nonfinite.append(pair.name)
            if result is Skipped.NONFINITE:
                issues.nonfinite.append(pair.name)
            elif result is Skipped.UNCHANGED:
                issues.unchanged.append(pair.name)
            elif result is not None:
                results.append(result)
            if progress:
                progress(i + 1, len(todo), pair.name)
    settings = Settings(
        k=options.k,
        epsilon=options.epsilon,
        epsilons=list(options.epsilons),
        device=str(device),
        include=sorted(options.selection.kinds) + list(options.selection.globs),
        exclude=list(options.selection.exclude),
        shard=options.shard.as_dict() if options.shard else None,
    )
    issues.unchanged.sort(key=matrix_order)  # the pairing's, then the analysis's: in one order, as a shard's merge
    issues.nonfinite.sort(key=matrix_order)
    heads = dict(sorted(heads.items()))
    return Report(
        tool={"name": "ftaudit", "version": __version__},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model,
        base=base,
        settings=settings,
        summary=summarise(results, options.epsilons, heads, len(issues.unchanged)),
        tensors=issues,
        matrices=results,
        assignment=None if options.shard is None else assignment(
            given, list(heads), len(pairing.pairs) + len(pairing.unchanged)),
    )


def _cells(pair: TensorPair) -> float:
    """The work of measuring a pair's row norms alone, up to a constant."""
    return pair.shape[0] * pair.shape[1]


def _work(pair: TensorPair) -> float:
    """The work of analysing a pair, up to a constant: its decompositions' (Gram matrices and eigensolvers)."""
    return _cells(pair) * min(pair.shape)


Loaded = tuple[TensorPair, StoredPair, LowRankUpdate | None]
"""A pair with its base and tuned tensors as stored, and the tuned side's known low-rank ΔW if any."""


def _stream(
    pairs: Sequence[TensorPair],
    base: Tensors,
    tuned: Tensors,
    updates: Updates | None,
    pin: torch.device | None,
    key: bool,
    scale_only: int,
) -> Iterator[Loaded]:
    """Yield loaded pairs (with any known low-rank ΔW) in order while a background thread reads the next.

    With `pin`, a CUDA device, the reader also pins each analysed pair in page-locked host memory (in
    that device's context, not the first GPU's), so that its copies to the GPU run asynchronously to
    the host. The first `scale_only` pairs, measured for their row norms only and often the largest
    tensors, are copied once and synchronously instead: pinned memory stays reserved once used. With
    `key` the reader also hashes each analysed base tensor for the cache, off the analysis's path.
    """

    def load(i: int) -> Loaded:
        pair = pairs[i]
        w0 = base.load(pair.base_name, pair.expert)
        update = updates(pair.tuned_name, pair.expert) if updates else None
        # an analysed matrix that is W0 + a known low-rank ΔW: built where it is analysed, not read ahead (StoredPair)
        derived = (update is not None and i >= scale_only and pair.kind not in VOCAB_KINDS
                   and w0.dtype != torch.float64 and pair.transposed == pair.tuned_transposed)
        wt = None if derived else tuned.load(pair.tuned_name, pair.expert)
        if pair.rows is not None:
            w0, update = w0[: pair.rows], update.rows(0, pair.rows) if update else None
            wt = None if wt is None else wt[: pair.rows]
        w0, wt = as_analysed(w0, pair.transposed), None if wt is None else as_analysed(wt, pair.tuned_transposed)
        if pair.transposed and update is not None:
            update = update.transposed()
        if pin is not None and i >= scale_only:
            with torch.cuda.device(pin):
                w0, wt = w0.pin_memory(), None if wt is None else wt.pin_memory()
        return pair, StoredPair(w0, wt, tensor_key(w0) if key and i >= scale_only else None), update

    # The tensors are held only by the StoredPair yielded, never by a name here, so the analysis can free them.
    if not pairs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftaudit-read") as pool:
        pending = pool.submit(load, 0)
        for following in range(1, len(pairs) + 1):
            loaded = pending.result()
            if following < len(pairs):
                pending = pool.submit(load, following)
            yield loaded
