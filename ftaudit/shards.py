"""Audits split into shards, run side by side (one CI job each), and their reports joined into one.

`--shard I/N` audits the I-th of N parts of the matrices, balanced by the work each takes; `join`
rebuilds from the N shards' reports the report that one audit of the whole model gives, verdict
aside, which the policy sets afterwards.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TypeVar

from ftaudit.errors import UsageError
from ftaudit.layout import matrix_tensor
from ftaudit.report import AppliedPolicy, Assignment, BaseRef, ModelRef, Report, TensorIssues
from ftaudit.summary import summarise

log = logging.getLogger("ftaudit")
T = TypeVar("T")
Ref = TypeVar("Ref", ModelRef, BaseRef)

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_GLOBAL_ISSUES = ("missing_in_base", "missing_in_model", "shape_mismatch", "vocab_resized", "not_selected",
                  "tied_heads")
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


def assignment(matrices: Sequence[str], heads: Sequence[str], all_matrices: int) -> Assignment:
    """The record of what a shard was given: its `matrices` (to analyse, or found nonfinite or unchanged) of the whole
    audit's `all_matrices`, and the `heads` it measured for their row norms."""
    return Assignment(len(matrices), len(heads), all_matrices, names_sha256(matrices, heads))


def names_sha256(matrices: Sequence[str], heads: Sequence[str]) -> str:
    """Hex SHA-256 of the JSON array of the sorted names of `matrices` and that of `heads`."""
    return hashlib.sha256(json.dumps([sorted(matrices), sorted(heads)]).encode()).hexdigest()


@dataclass(frozen=True)
class ShardReport:
    """A shard's report, and the file it was read from."""

    file: str
    report: Report
    shard: Shard
    assignment: Assignment


def join(reports: Sequence[tuple[str, Report]]) -> Report:
    """The report of the whole audit from its N shards' reports (file, report), all of them, given in any order; its
    verdict is left to the policy."""
    shards = _check_shards(reports)
    first = shards[0].report
    matrices = sorted((m for s in shards for m in s.report.matrices), key=lambda m: matrix_order(m.name))
    heads = dict(sorted(((name, head) for s in shards for name, head in s.report.summary.heads.items())))
    tensors = replace(
        first.tensors,
        nonfinite=sorted({n for s in shards for n in s.report.tensors.nonfinite}, key=matrix_order),
        unchanged=sorted({n for s in shards for n in s.report.tensors.unchanged}, key=matrix_order),
    )
    devices = sorted({s.report.settings.device for s in shards})
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


def warn_other_policy(reports: Sequence[tuple[str, Report]], policy: AppliedPolicy) -> None:
    """Warn when a shard (file, report) was judged under another policy than `policy`, the merge's: the merge's alone
    judges the whole, and a policy the shards were given but the merge was not is likely a mistake."""
    for file, report in reports:
        other = report.verdict.policy
        if other is not None and other.digest != policy.digest:
            shard = _shard_of(report)
            advice = "give merge no --policy" if not other.custom else "give merge the shards' --policy"
            log.warning("shard %d/%d (%s) was judged under policy %s, the merge under policy %s: the verdict is the "
                        "merge's; %s to judge the whole as they were",
                        shard.index, shard.count, file, other.describe(), policy.describe(), advice)
            return


def _check_shards(reports: Sequence[tuple[str, Report]]) -> list[ShardReport]:
    """The reports, by shard, once every one is known to be one shard of the same audit, holding all it was given,
    and all are there."""
    shards = [_shard_report(file, report) for file, report in reports]
    count = shards[0].shard.count if shards else 0
    if len(shards) != count or any(s.shard.count != count for s in shards) or sorted(
            s.shard.index for s in shards) != list(range(1, count + 1)):
        given = ", ".join(f"{s.shard.index}/{s.shard.count}" for s in shards) or "none"
        raise UsageError(f"the reports are shards {given}: merge needs each of 1/N to N/N once, of one N")
    shards.sort(key=lambda s: s.shard.index)
    for shard in shards:
        _check_same(shards[0], shard)
    _check_disjoint(shards)
    for shard in shards:
        _check_holds_its_part(shard)
    _check_all_there(shards)
    return shards


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


def _shard_report(file: str, report: Report) -> ShardReport:
    """The report of a shard that records what merge checks: its assignment, and what identifies local weights."""
    shard = _shard_of(report)
    missing = [what for what, absent in (
        ("assignment", report.assignment is None),
        ("model.fingerprint", report.model.revision is None and report.model.fingerprint is None),
        ("base.fingerprint", report.base.revision is None and report.base.fingerprint is None),
    ) if absent]
    if missing or report.assignment is None:
        raise UsageError(f"shard {shard.index}/{shard.count} ({file}) records no {' or '.join(missing)}, by which "
                         "merge checks the shards (a report of an earlier ftaudit, or edited): audit the shard again "
                         "with this ftaudit")
    return ShardReport(file, report, shard, report.assignment)


def _check_same(first: ShardReport, other: ShardReport) -> None:
    """`other` is a shard of the audit `first` is a shard of: the same models and weights, settings and ftaudit, the
    same pairing of their tensors and the same matrices split."""
    a, b = first.report, other.report
    same = {
        "ftaudit version": (a.tool, b.tool),
        "model": (_named(a.model), _named(b.model)),
        "base": (_named(a.base), _named(b.base)),
        "settings": (replace(a.settings, device="", shard=None), replace(b.settings, device="", shard=None)),
        "tensors": (_global(a.tensors), _global(b.tensors)),
        "number of matrices split (assignment.all_matrices)": (first.assignment.all_matrices,
                                                                other.assignment.all_matrices),
    }
    for what, (x, y) in same.items():
        if x != y:
            raise UsageError(f"shards {_name(first)} and {_name(other)} differ in their {what}: they are not shards "
                             "of one audit")
    for side, x, y in (("model", a.model, b.model), ("base", a.base, b.base)):
        if x.fingerprint != y.fingerprint:
            where, why = ((f" from {x.id}", "the folder changed") if x.id == y.id else
                          (f", from {x.id} and from {y.id}", "other files, or the folder changed"))
            raise UsageError(f"shards {_name(first)} and {_name(other)} read different weights{where} (their "
                             f"{side}.fingerprint differs): {why} between their audits; audit every shard from the "
                             "same files")


def _named(ref: Ref) -> Ref:
    """`ref` without what may differ between the shards of one audit: its fingerprint (compared apart) and, for a local
    folder, which the fingerprint identifies, its id: the path each shard's job reached it by."""
    local = ref.revision is None and ref.fingerprint is not None
    return replace(ref, id="" if local else ref.id, fingerprint=None)


def _check_disjoint(shards: Sequence[ShardReport]) -> None:
    """No matrix is measured, and no row norm, in two of the shards: each holds its own part."""
    for measured in (lambda r: [m.name for m in r.matrices] + r.tensors.nonfinite, lambda r: list(r.summary.heads)):
        seen: dict[str, ShardReport] = {}
        for shard in shards:
            for name in measured(shard.report):
                if name in seen:
                    raise UsageError(f"shards {_name(seen[name])} and {_name(shard)} both measured {name}: they are "
                                     "not parts of one split")
                seen[name] = shard


def _check_holds_its_part(shard: ShardReport) -> None:
    """The report lists every matrix and head its audit was given, and no other."""
    matrices, heads = _held(shard.report)
    given = shard.assignment
    if names_sha256(matrices, heads) != given.names_sha256:
        lists = (f"{len(matrices)} matrices and {len(heads)} heads where its audit had {given.matrices} and "
                 f"{given.heads}" if (len(matrices), len(heads)) != (given.matrices, given.heads) else
                 "other matrices or heads than its audit had")
        raise UsageError(f"shard {_name(shard)} lists {lists} (assignment): the report was edited or cut short; "
                         "audit the shard again")


def _check_all_there(shards: Sequence[ShardReport]) -> None:
    """Together the shards list every matrix of the whole audit."""
    listed = len({name for s in shards for name in _held(s.report)[0]})
    expected = shards[0].assignment.all_matrices
    if listed != expected:
        raise UsageError(f"the shards list {listed} matrices of the {expected} their audit split among them "
                         "(assignment.all_matrices): they are not parts of one split")


def _held(report: Report) -> tuple[list[str], list[str]]:
    """The matrices a shard's report lists (analysed, nonfinite or unchanged) and the heads it measured (a nonfinite
    head, in both `summary.heads` and `tensors.nonfinite`, among the heads)."""
    return [m.name for m in report.matrices] + report.nonfinite_matrices + report.tensors.unchanged, list(
        report.summary.heads)


def _global(tensors: TensorIssues) -> tuple[object, ...]:
    return tuple(getattr(tensors, name) for name in _GLOBAL_ISSUES)


def _name(shard: ShardReport) -> str:
    return f"{shard.shard.index}/{shard.shard.count} ({shard.file})"
