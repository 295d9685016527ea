"""What `ftaudit fix` did, for the terminal and for the model card.

The card section of a patched model is the audit of the output (ftaudit.renderers.card) followed by
the fix: its settings, the before/after comparison and the matrices changed.
"""

from __future__ import annotations

import shlex

import click

from ftaudit.cardfile import card_data_from_report
from ftaudit.fixreport import FixResult
from ftaudit.renderers import card
from ftaudit.renderers.markdown import (
    PERCENT_FIELDS,
    SUMMARY_LABELS,
    format_number,
    format_percent,
    plural,
    render_template,
)
from ftaudit.renderers.text import RISK_COLOURS, STATUS_COLOURS, safe
from ftaudit.report import Report

COMPARED = (
    "intruder_dimensions", "matrices_with_intruders", "intruder_rate", "intruder_strength_max",
    "relative_update_norm_median", "relative_update_norm_max", "spectral_spike_max",
)
"""Summary fields shown before and after."""
WHAT = {"model": "model", "adapter": "LoRA adapter", "merged": "merged model"}


def comparison(result: FixResult) -> list[tuple[str, str, str]]:
    """(label, before, after) for the compared summary fields, the risk level and the verdict."""
    eps = format_number(result.settings.epsilon)
    rows = []
    for key in COMPARED:
        label = SUMMARY_LABELS[key] + (f" (ε = {eps})" if key == "intruder_dimensions" else "")
        rows.append((label, _value(result.before, key), _value(result.after, key)))
    rows.append(("Forgetting risk", result.before.summary.risk, result.after.summary.risk))
    rows.append(("Verdict", result.before.verdict.status, result.after.verdict.status))
    return rows


def _value(report: Report, key: str) -> str:
    value = getattr(report.summary, key)
    return format_percent(value) if key in PERCENT_FIELDS else format_number(value)


def render_text(result: FixResult, top: int = 10) -> str:
    """The terminal summary: what was written, the before/after table, the matrices changed."""
    st = result.settings
    only = f", at most {st.only_top} per matrix" if st.only_top else ""
    lines = [
        click.style("ftaudit fix", bold=True) + f"  {safe(result.before.model.id)}  ->  {safe(result.output)}",
        f"  base  {safe(result.before.base.id)}",
        f"  wrote a {WHAT[result.format]}: σ -> {format_number(st.lam)}·σ for each intruder at "
        f"ε={format_number(st.epsilon)} among the top k={st.k}{only}",
        f"  {plural(len(result.changes), 'matrix', 'matrices')} changed, "
        f"{plural(result.directions_scaled, 'direction')} scaled",
    ]
    if result.truncation_error_max is not None:
        lines.append(f"  rank-r cut of the patched updates: relative error max {result.truncation_error_max:.4g}")
    rows = comparison(result)
    width = max(len(label) for label, _, _ in rows)
    lines += ["", f"  {'':<{width}}  {'before':>10}  {'after':>10}"]
    colours = {"Forgetting risk": RISK_COLOURS, "Verdict": STATUS_COLOURS}
    for label, before, after in rows:
        cells = [_cell(v, colours.get(label)) for v in (before, after)]
        lines.append(f"  {label:<{width}}  {cells[0]}  {cells[1]}")
    lines += [f"    - {safe(reason)}" for reason in result.after.verdict.reasons]
    if result.changes:
        lines += ["", "Changed matrices", f"  {'scaled':>6}  {'σ before':>9}  {'σ after':>9}  matrix"]
        for c in sorted(result.changes, key=lambda c: -max(c.sigma_before))[:top]:
            lines.append(f"  {len(c.directions):>6}  {max(c.sigma_before):9.4g}  {max(c.sigma_after):9.4g}  {safe(c.name)}")
        if len(result.changes) > top:
            lines.append(f"  ... and {len(result.changes) - top} more (--json has them all)")
    return "\n".join(lines)


def _cell(value: str, colours: dict[str, str] | None) -> str:
    text = f"{value.upper() if colours else value:>10}"
    return click.style(text, fg=colours.get(value), bold=True) if colours else text


def render_fix_section(result: FixResult) -> str:
    """The card's account of the fix (Markdown)."""
    return render_template(
        "fix_section.md.j2", result=result, st=result.settings, what=WHAT[result.format],
        rows=comparison(result), plural=plural, command=reproduce_command(result),
    )


def render_card_section(result: FixResult, badge_path: str | None = None, heatmap_path: str | None = None) -> str:
    """The whole card section of the patched model: its audit (embedding the badge and heatmap by these relative
    paths), then the fix."""
    return (card.render_card_section(result.after, badge_path=badge_path, heatmap_path=heatmap_path).rstrip("\n")
            + "\n\n" + render_fix_section(result))


def card_data(result: FixResult) -> dict[str, object]:
    """The card's `ftaudit:` front-matter key: the audit of the output, and the fix under `fix`."""
    st = result.settings
    return {
        **card_data_from_report(result.after),
        "fix": {
            "lambda": st.lam, "epsilon": st.epsilon, "k": st.k, "only_top": st.only_top,
            "source": result.before.model.id, "source_revision": result.before.model.revision,
            "matrices_changed": len(result.changes), "directions_scaled": result.directions_scaled,
        },
    }


def reproduce_command(result: FixResult) -> str:
    """The `ftaudit fix` command line that writes the same output (the audit's options, then the fix's)."""
    st = result.settings
    args = ["--out", result.output, "--lambda", format_number(st.lam)]
    if st.only_top:
        args += ["--only-top", str(st.only_top)]
    if result.format == "merged":
        args.append("--merge")
    audit = card.reproduce_command(result.before).removeprefix("ftaudit check ")
    return f"ftaudit fix {audit} " + " ".join(shlex.quote(a) for a in args)
