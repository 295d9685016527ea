"""The terminal summary of a report."""

from __future__ import annotations

import re

import click

from ftaudit.renderers.markdown import INVISIBLE, plural, unanalysed, worst_matrices
from ftaudit.report import Report

STATUS_COLOURS = {"pass": "green", "warn": "yellow", "fail": "red"}
RISK_COLOURS = {"low": "green", "medium": "yellow", "high": "red"}
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff{INVISIBLE}]")


def safe(text: object) -> str:
    """`text` inert in a terminal, on one line: control characters (the escape sequences that move the cursor, clear the
    screen or colour, line breaks that would start a line of their own), line separators, lone surrogates and invisible
    format characters written as escapes (\\x1b, \\n, \\u202e)."""
    return _UNSAFE.sub(lambda found: found[0].encode("unicode_escape").decode("ascii"), str(text))


def render(report: Report, top: int = 10) -> str:
    """A short, readable summary: verdict last, worst matrices first."""
    s = report.summary
    rev = lambda r: f" @ {safe(r[:12])}" if r else ""  # noqa: E731
    lines = [
        click.style("ftaudit", bold=True) + f"  {safe(report.model.id)}{rev(report.model.revision)}",
        f"  base  {safe(report.base.id)}{rev(report.base.revision)}  (declared by {safe(report.base.declared_by)})",
        f"  {s.matrices_analysed} matrices analysed, top k={report.settings.k} singular vectors each, "
        f"on {safe(report.settings.device)}",
        *_shard_note(report),
        *_tied_note(report),
        "",
        f"Intruder dimensions at ε={report.settings.epsilon:g}: "
        + click.style(str(s.intruder_dimensions), bold=True)
        + f"  ({s.intruder_rate:.1%} of examined vectors, in {s.matrices_with_intruders} matrices)",
        "  ε      " + " ".join(f"{safe(e):>5}" for e in s.intruder_curve),
        "  count  " + " ".join(f"{c:>5}" for c in s.intruder_curve.values()),
    ]
    if s.relative_update_norm_max is not None:
        lines.append(
            f"Relative update norm ‖ΔW‖/‖W0‖: median {s.relative_update_norm_median:.4g}, "
            f"max {s.relative_update_norm_max:.4g}"
        )
    worst = [m for m in worst_matrices(report, top) if m.intruders]
    if worst:
        lines += ["", "Worst matrices", f"  {'intruders':>9}  {'min cos':>7}  {'ΔW/W0':>8}  matrix"]
        for m in worst:
            norm = m.indicators.get("relative_update_norm")
            norm_text = f"{norm:8.4f}" if norm is not None else f"{'n/a':>8}"
            lines.append(f"  {m.intruders:>9}  {min(m.max_cos):7.3f}  {norm_text}  {safe(m.name)}")
    lines += _tensor_notes(report)
    risk = report.summary.risk
    status = report.verdict.status
    policy = report.verdict.policy
    lines += [
        "",
        "Forgetting risk: " + click.style(risk.upper(), fg=RISK_COLOURS.get(risk), bold=True)
        + "   Verdict: " + click.style(status.upper(), fg=STATUS_COLOURS.get(status), bold=True)
        + (f"   Policy: {safe(policy.describe())}" if policy else ""),
    ]
    lines += [f"  - {safe(reason)}" for reason in report.verdict.reasons]
    return "\n".join(lines)


def _shard_note(report: Report) -> list[str]:
    shard = report.settings.shard
    if shard is None:
        return []
    return [f"  shard {shard['index']} of {shard['count']}: the numbers and the verdict cover its matrices only; "
            "`ftaudit merge` joins the shards' reports"]


def _tied_note(report: Report) -> list[str]:
    heads = report.tensors.tied_heads
    if not heads:
        return []
    return ["  tied heads: " + "; ".join(
        f"the {safe(h['side'])} stores no {safe(h['name'])}: its input embedding {safe(h['embedding'])}, tied to it "
        "(tie_word_embeddings), is compared in its place" for h in heads)]


def _tensor_notes(report: Report) -> list[str]:
    t = report.tensors
    notes = [
        f"  {plural(len(names), 'matrix', 'matrices')} {label}: " + ", ".join(safe(n) for n in names[:3])
        + (", ..." if len(names) > 3 else "")
        for label, names in unanalysed(report)
    ]
    notes += [
        f"  {safe(r['name'])}: vocabulary resized ({r['base_rows']} -> {r['model_rows']} rows), "
        f"first {r['compared_rows']} rows compared"
        for r in t.vocab_resized
    ]
    return ["", "Tensors not analysed in full", *notes] if notes else []
