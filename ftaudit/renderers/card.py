"""The model-card section: the audit in Markdown, for the README of the audited model.

`render_card_section` renders templates/card_section.md.j2; `ftaudit.cardfile.update_card` puts
the result between the `<!-- ftaudit:begin -->` / `<!-- ftaudit:end -->` markers of a card.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from urllib.parse import quote

from ftaudit.renderers import badge, heatmap
from ftaudit.renderers.markdown import (
    base_context,
    code_span,
    format_number,
    is_sha,
    plural,
    render_template,
    status_headline,
)
from ftaudit.report import Report
from ftaudit.secrets import mask_shapes

BADGE, BADGE_JSON, HEATMAP = "ftaudit/badge.svg", "ftaudit/badge.json", "ftaudit/heatmap.svg"
REPO_FILES = (BADGE, BADGE_JSON, HEATMAP)
"""Where a model repo keeps the audit's badge, shields.io endpoint and heatmap, beside its card."""
LINK_SAFE = "/:?#&=%+@~!$,;*'"
"""What a link target keeps as it is: a path's and a URL's delimiters, and escapes already made."""
DECLARED_BY = {"card": "the model card", "adapter_config": "adapter_config.json", "cli": "the audit command"}
PAPER = "Shuttleworth et al. (“LoRA vs Full Fine-tuning: An Illusion of Equivalence”, 2024, arXiv:2410.21228)"


def render_card_section(
    report: Report, badge_path: str | None = None, heatmap_path: str | None = None, top: int = 5
) -> str:
    """The card section for `report`, embedding the badge and heatmap files by these relative paths."""
    return render_template(
        "card_section.md.j2",
        **base_context(report, top),
        headline=status_headline(report),
        badge_path=_link_target(badge_path),
        heatmap_path=_link_target(heatmap_path),
        revision=revision_text,
        declared_by=DECLARED_BY,
        reading=plain_reading(report),
        command=reproduce_command(report),
    )


def revision_text(revision: str | None) -> str:
    """A commit as its short sha and, beside it, the full one (as text: no link to go stale)."""
    if not revision:
        return "not pinned (local files or the default branch)"
    if is_sha(revision):
        return f"{code_span(revision[:12])} (full: {code_span(revision)})"
    return code_span(revision, cell=True)


def plain_reading(report: Report) -> str:
    """One paragraph that says what the numbers mean for someone who wants to use the model."""
    s, risk = report.summary, report.summary.risk
    if not s.matrices_analysed and not report.tensors.nonfinite:  # every matrix compared is the base's
        return (
            "Every weight matrix compared is identical to the base model's (see *Not analysed* above): the "
            "fine-tune changed none of them, so it can have introduced no intruder dimensions there. Check that the "
            "audited model is the one intended and not its base."
        )
    if not s.matrices_analysed:  # every matrix skipped (NaN or Inf weights): nothing was measured
        return (
            "No weight matrix could be analysed (see *Not analysed* above), so the audit measured no intruder "
            "dimensions and no update size, and says nothing about forgetting: the verdict comes from the policy's "
            "rules for matrices that could not be analysed."
        )
    eps = format_number(report.settings.epsilon)
    norm = _norm_phrase(report)
    if s.intruder_dimensions:
        found = (
            f"Fine-tuning introduced {plural(s.intruder_dimensions, 'intruder dimension')} "
            f"({plural(s.matrices_with_intruders, 'matrix', 'matrices')} affected): strong directions in the tuned "
            f"weights that match no direction of the base model (best absolute cosine below {eps}). "
            f"{PAPER} associate such dimensions with forgetting of pre-training behaviour and with "
            f"worse results when the model is fine-tuned again; they are typical of low-rank (LoRA) fine-tunes."
        )
    else:
        found = (
            f"No intruder dimensions at ε = {eps}: the strongest directions of every tuned matrix still line up "
            f"with directions of the base model. {PAPER} report this pattern for full fine-tuning, which "
            f"forgets less of the pre-training behaviour than fine-tunes with intruder dimensions."
        )
    advice = {
        "high": " The forgetting risk is high: expect the model to have lost more of the base model's general "
        "abilities than a gentle fine-tune would, so evaluate it beyond the task it was tuned for before relying "
        "on those abilities, and be careful about fine-tuning it further.",
        "medium": " The forgetting risk is medium: some drift from the base model is likely, so check the base "
        "abilities you rely on.",
        "low": " The forgetting risk is low: the audit finds no weight-space sign of forgetting, though it "
        "cannot rule it out." if not s.intruder_dimensions else " The forgetting risk is still low under the "
        "policy: the intruders are few among the examined vectors.",
    }.get(risk, f" The forgetting risk is {risk}.")
    spike = getattr(s, "spectral_spike_max", None)
    shape = ""
    if spike is not None and spike > 1.005:
        shape = (f" In at least one matrix the update's strongest direction is stronger than anything the base "
                 f"matrix had ({format_number(spike, 3)}× its largest singular value, the spectral spike).")
    caveat = (
        f" The size of the update is reported beside the intruders because it is a confound: a larger update "
        f"changes more of the model whatever its structure{norm}. These are indicators read from the weights, "
        f"not measured behaviour: they say where to look, not what was lost."
    )
    return found + shape + advice + caveat


def _norm_phrase(report: Report) -> str:
    s = report.summary
    if s.relative_update_norm_median is None:
        return ""
    return (
        f" (here ‖ΔW‖/‖W₀‖ has median {format_number(s.relative_update_norm_median, 3)} and max "
        f"{format_number(s.relative_update_norm_max, 3)} over the analysed matrices)"
    )


def reproduce_command(report: Report) -> str:
    """The `ftaudit check` command line that audits the same pair with the same settings, under the same policy file
    (by its path as recorded) when it was not the default."""
    args = ["ftaudit", "check", report.model.id]
    if report.model.revision:
        args += ["--revision", report.model.revision]
    args += ["--base", report.base.id]
    if report.base.revision:
        args += ["--base-revision", report.base.revision]
    args += ["--k", str(report.settings.k), "--epsilon", format_number(report.settings.epsilon)]
    for item in report.settings.include:
        if item not in ("attention", "mlp"):
            args += ["--include", item]
    for item in report.settings.exclude:
        args += ["--exclude", item]
    policy = report.verdict.policy
    if policy is not None and policy.custom:
        args += ["--policy", policy.source]
    return " ".join(shlex.quote(a) for a in args)


def _link_target(path: str | None) -> str | None:
    """A relative file name (or a URL) as one Markdown link target: what would end it or the line (spaces,
    parentheses, a newline) or read as HTML, percent-encoded."""
    if not path:
        return None
    return quote(path.replace("\\", "/"), safe=LINK_SAFE)


def repo_files(report: Report, names: Iterable[str]) -> dict[str, str]:
    """The files of `names` (of REPO_FILES) that show `report` in a model repo."""
    make = {
        BADGE: lambda: badge.render_badge_svg(report),
        BADGE_JSON: lambda: json.dumps(badge.shields_endpoint(report), indent=2) + "\n",
        HEATMAP: lambda: heatmap.render_heatmap_svg(report),
    }
    return {name: mask_shapes(make[name]()) for name in names}
