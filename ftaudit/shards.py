"""Audits split into shards, run side by side (one CI job each), and their reports joined into one.

`--shard I/N` audits the I-th of N parts of the matrices, balanced by the work each takes; `join`
rebuilds from the N shards' reports the report that one audit of the whole model gives, verdict
aside, which the policy sets afterwards.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TypeVar

from ftaudit.errors import UsageError
from ftaudit.layout import matrix_tensor
from ftaudit.report import AppliedPolicy, Report, TensorIssues
from ftaudit.summary import summarise

log = logging.getLogger("ftaudit")
T = TypeVar("T")

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_GLOBAL_ISSUES = ("missing_in_base", "missing_in_model", "shape_mismatch", "vocab_resized", "not_selected")
"""What the pairing finds, the same in every shard of one audit."""


@dataclass(frozen=True)
class Shard:
    """Part `index` (from 1) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N`, with 1 ≤ I ≤ N."""
        match = _SHARD.match(text)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise UsageError(f"--shard {text!r}: give I/N, the I-th of N parts, with 1 <= I <= N (such as 2/8)")
        return cls(int(match[1]), int(match[2]))

    def take(self, items: Sequence[T], cost: Callable[[T], float]) -> list[T]:
        """The items of this shard, in their order: each item, costliest first, goes to the shard with the least work
        so far (the lowest-numbered of those tied), so that every shard of the same items computes the same split."""
        # (work, shard) of the shards given work so far, a heap: time and memory grow with the items, not the count
        loads: list[tuple[float, int]] = []
        mine = set()
        for i in sorted(range(len(items)), key=lambda i: -cost(items[i])):
            idle = (0.0, len(loads))  # the lowest-numbered shard with no item yet, if any
            work, shard = idle if len(loads) < self.count and (not loads or idle < loads[0]) else heapq.heappop(loads)
            heapq.heappush(loads, (work + cost(items[i]), shard))
            if shard == self.index - 1:
                mine.add(i)
        return [item for i, item in enumerate(items) if i in mine]

    def as_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}


def matrix_order(name: str) -> tuple[str, int]:
    """Where matrix `name` comes in a report: by its tensor's name, then by expert."""
    tensor = matrix_tensor(name)
    return tensor, int(name[len(tensor) + 1:-1]) if name != tensor else -1


def join(reports: Sequence[Report]) -> Report:
    """The report of the whole audit from its N shards' reports, all of them, given in any order; its verdict is left
    to the policy."""
    first = _check_shards(reports)
    matrices = sorted((m for r in reports for m in r.matrices), key=lambda m: matrix_order(m.name))
    heads = dict(sorted(((name, head) for r in reports for name, head in r.summary.heads.items())))
    tensors = replace(
        first.tensors,
        nonfinite=sorted({n for r in reports for n in r.tensors.nonfinite}, key=matrix_order),
        unchanged=sorted({n for r in reports for n in r.tensors.unchanged}, key=matrix_order),
    )
    devices = sorted({r.settings.device for r in reports})
    return Report(
        tool=first.tool,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=first.model,
        base=first.base,
        settings=replace(first.settings, device=", ".join(devices), shard=None),
        summary=summarise(matrices, first.settings.epsilons, heads, len(tensors.unchanged)),
        tensors=tensors,
        matrices=matrices,
    )


def warn_other_policy(reports: Sequence[Report], policy: AppliedPolicy) -> None:
    """Warn when a shard was judged under another policy than `policy`, the merge's: the merge's alone judges the
    whole, and a policy the shards were given but the merge was not is likely a mistake."""
    for report in reports:
        other = report.verdict.policy
        if other is not None and other.digest != policy.digest:
            log.warning("shard %s was judged under policy %s, the merge under policy %s: the verdict is the merge's; "
                        "give merge the shards' --policy to judge the whole as they were", _name(report),
                        other.describe(), policy.describe())
            return


def _check_shards(reports: Sequence[Report]) -> Report:
    """The first shard's report, once every report is known to be one shard of the same audit, and all are there."""
    shards = [_shard_of(r) for r in reports]
    count = shards[0].count if shards else 0
    if len(shards) != count or any(s.count != count for s in shards) or sorted(
            s.index for s in shards) != list(range(1, count + 1)):
        given = ", ".join(f"{s.index}/{s.count}" for s in shards) or "none"
        raise UsageError(f"the reports are shards {given}: merge needs each of 1/N to N/N once, of one N")
    first = reports[shards.index(min(shards, key=lambda s: s.index))]
    for report in reports:
        _check_same(first, report)
    _check_disjoint(reports)
    return first


def _shard_of(report: Report) -> Shard:
    shard = report.settings.shard
    if shard is None:
        raise UsageError("merge takes the reports of `ftaudit check --shard I/N`: one is the report of a whole audit")
    try:
        found = Shard(**shard)
    except TypeError:
        raise UsageError(f"settings.shard must be {{'index': I, 'count': N}}, not {shard}") from None
    if not 1 <= found.index <= found.count:
        raise UsageError(f"settings.shard {found.index}/{found.count} is not a shard of {found.count}")
    return found


def _check_same(first: Report, other: Report) -> None:
    """`other` is a shard of the audit `first` is a shard of: the same models, settings and ftaudit, and the same
    pairing of their tensors."""
    same = {
        "ftaudit version": (first.tool, other.tool),
        "model": (first.model, other.model),
        "base": (first.base, other.base),
        "settings": (replace(first.settings, device="", shard=None), replace(other.settings, device="", shard=None)),
        "tensors": (_global(first.tensors), _global(other.tensors)),
    }
    for what, (a, b) in same.items():
        if a != b:
            raise UsageError(f"shards {_name(first)} and {_name(other)} differ in their {what}: they are not shards of "
                             "one audit")


def _check_disjoint(reports: Sequence[Report]) -> None:
    """No matrix is measured, and no row norm, in two of the shards: each holds its own part."""
    for measured in (lambda r: [m.name for m in r.matrices] + r.tensors.nonfinite, lambda r: list(r.summary.heads)):
        seen: dict[str, Report] = {}
        for report in reports:
            for name in measured(report):
                if name in seen:
                    raise UsageError(f"shards {_name(seen[name])} and {_name(report)} both measured {name}: they are "
                                     "not parts of one split")
                seen[name] = report


def _global(tensors: TensorIssues) -> tuple[object, ...]:
    return tuple(getattr(tensors, name) for name in _GLOBAL_ISSUES)


def _name(report: Report) -> str:
    shard = _shard_of(report)
    return f"{shard.index}/{shard.count}"
