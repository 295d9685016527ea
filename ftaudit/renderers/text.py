"""The terminal summary of a report."""

from __future__ import annotations

import click

from ftaudit.report import MatrixResult, Report

STATUS_COLOURS = {"pass": "green", "warn": "yellow", "fail": "red"}
RISK_COLOURS = {"low": "green", "medium": "yellow", "high": "red"}


def worst_matrices(report: Report, n: int) -> list[MatrixResult]:
    """Most intruders first, then the lowest best match among the examined vectors."""
    return sorted(report.matrices, key=lambda m: (-m.intruders, min(m.max_cos, default=1.0)))[:n]


def render(report: Report, top: int = 10) -> str:
    """A short, readable summary: verdict last, worst matrices first."""
    s, t = report.summary, report.tensors
    rev = lambda r: f" @ {r[:12]}" if r else ""  # noqa: E731
    lines = [
        click.style("ftaudit", bold=True) + f"  {report.model.id}{rev(report.model.revision)}",
        f"  base  {report.base.id}{rev(report.base.revision)}  (declared by {report.base.declared_by})",
        f"  {s.matrices_analysed} matrices analysed, top k={report.settings.k} singular vectors each, "
        f"on {report.settings.device}",
        "",
        f"Intruder dimensions at ε={report.settings.epsilon:g}: "
        + click.style(str(s.intruder_dimensions), bold=True)
        + f"  ({s.intruder_rate:.1%} of examined vectors, in {s.matrices_with_intruders} matrices)",
        "  ε      " + " ".join(f"{e:>5}" for e in s.intruder_curve),
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
            lines.append(f"  {m.intruders:>9}  {min(m.max_cos):7.3f}  {norm_text}  {m.name}")
    lines += _tensor_notes(report)
    risk = report.summary.risk
    status = report.verdict.status
    lines += [
        "",
        "Forgetting risk: " + click.style(risk.upper(), fg=RISK_COLOURS.get(risk), bold=True)
        + "   Verdict: " + click.style(status.upper(), fg=STATUS_COLOURS.get(status), bold=True),
    ]
    lines += [f"  - {reason}" for reason in report.verdict.reasons]
    return "\n".join(lines)


def _tensor_notes(report: Report) -> list[str]:
    t = report.tensors
    notes = []
    for label, names in (
        ("missing in the base", t.missing_in_base),
        ("missing in the model", t.missing_in_model),
        ("with NaN or Inf", t.nonfinite),
        ("of different shapes", [m["name"] for m in t.shape_mismatch]),
    ):
        if names:
            shown = ", ".join(str(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            notes.append(f"  {len(names)} matrices {label}: {shown}")
    notes += [
        f"  {r['name']}: vocabulary resized ({r['base_rows']} -> {r['model_rows']} rows), "
        f"first {r['compared_rows']} rows compared"
        for r in t.vocab_resized
    ]
    return ["", "Tensors not analysed in full", *notes] if notes else []
