"""Markdown renderers and what the template renderers share.

`render_job_summary` writes the GitHub Actions job summary, `github_annotations` the workflow
commands that put the verdict on the run's page. The helpers below (the jinja2 environment, number
formatting, readable labels of summary fields, the worst matrices, module labels) are shared by
the card section, the badge and the heatmap, so that every renderer words a number the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

from ftaudit.report import MatrixResult, Report

STATUS_EMOJI = {"pass": "✅", "warn": "⚠️", "fail": "❌"}
STATUS_LEVEL = {"pass": "notice", "warn": "warning", "fail": "error"}

# Readable labels of the summary's numeric fields; a field not listed here gets one made from its
# name, so that indicators added to the report later show up without touching the renderers.
SUMMARY_LABELS = {
    "matrices_analysed": "Matrices analysed",
    "intruder_dimensions": "Intruder dimensions",
    "matrices_with_intruders": "Matrices with intruders",
    "intruder_rate": "Intruder rate (share of examined top-k vectors)",
    "intruder_strength_max": "Strongest intruder, σ / σ₁(W₀)",
    "relative_update_norm_median": "Relative update norm ‖ΔW‖/‖W₀‖, median",
    "relative_update_norm_max": "Relative update norm ‖ΔW‖/‖W₀‖, max",
    "spectral_spike_median": "Spectral spike σ₁(ΔW)/σ₁(W₀), median",
    "spectral_spike_max": "Spectral spike σ₁(ΔW)/σ₁(W₀), max",
    "effective_rank_median": "Effective rank of ΔW, median",
    "energy_rank_90_median": "Rank holding 90 % of ΔW's energy, median",
    "subspace_drift_deg_max": "Rotation of the top-k subspace (degrees), max",
    "head_scale_drift": "Head/embedding row-norm drift, max |ratio − 1|",
}
PERCENT_FIELDS = {"intruder_rate"}
INDICATOR_LABELS = {
    "relative_update_norm": "‖ΔW‖/‖W₀‖",
    "spectral_spike": "σ₁(ΔW)/σ₁(W₀)",
    "effective_rank": "Effective rank",
    "energy_rank_90": "Rank (90 % energy)",
    "numerical_rank": "Rank of ΔW",
    "subspace_drift_deg": "Subspace rotation (°)",
}
# Per-matrix indicators left out of the worst-matrices tables (the summary carries their medians);
# any other indicator, including ones added later, gets a column.
TABLE_HIDDEN_INDICATORS = {"effective_rank", "energy_rank_90"}
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@dataclass(frozen=True)
class Metric:
    """One numeric field of the summary, ready to print."""

    key: str
    label: str
    value: float | int | None
    text: str


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The jinja2 environment of `templates/` (the package ftaudit.templates).

    SVG templates are XML-escaped; Markdown templates are not, and escape with the `md`, `code` and
    `cell_code` (a code span in a table cell) filters where text from the report lands. Every value passes through `printable` (a tensor name can
    hold any character). jinja2 is imported here, on first use: an audit that renders nothing does not
    pay for it.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ftaudit.templates", "."),
        autoescape=jinja2.select_autoescape(enabled_extensions=("svg.j2",), default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=printable,
    )
    env.filters.update(md=md_escape, code=code_span, cell_code=partial(code_span, cell=True), num=format_number,
                       pct=format_percent, sha=short_sha, fence=code_fence)
    return env


def render_template(name: str, **context: object) -> str:
    return environment().get_template(name).render(**context)


# --- formatting -------------------------------------------------------------------------------

INVISIBLE = "\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e007f"
"""Format characters, as ranges of a regular expression's class, that show nothing yet hide or reorder the text around
them: zero-width characters, bidi controls (which reorder what follows them), tags."""
_UNPRINTABLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"      # control characters but tab and line breaks
    f"\ud800-\udfff\ufffe\uffff{INVISIBLE}]"    # lone surrogates (no UTF-8), the noncharacters XML forbids
)


def printable(value: object) -> object:
    """`value` with the characters that would make an SVG unreadable (XML forbids them, or UTF-8 cannot hold them) or
    that show nothing yet hide or reorder the text around them (zero-width, bidi controls) replaced by U+FFFD."""
    return _UNPRINTABLE.sub("\ufffd", value) if isinstance(value, str) else value


def format_number(value: object, digits: int = 4) -> str:
    """An int as is, a float to `digits` significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def format_percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}%}"


def short_sha(revision: str | None) -> str:
    """The first 12 characters of a commit sha; any other revision (a branch, a tag) unchanged."""
    if not revision:
        return "not pinned"
    return revision[:12] if _SHA.fullmatch(revision) else revision


def is_sha(revision: str | None) -> bool:
    return bool(revision and _SHA.fullmatch(revision))


def md_escape(text: object) -> str:
    """Text from a report made inert in Markdown (and in the HTML a model card may contain): no emphasis,
    strikethrough, link, autolink (`https://...`, `www....`) or table cell boundary."""
    out = str(text).replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "`*_~[]|":
        out = out.replace(ch, "\\" + ch)
    out = _AUTOLINK.sub(lambda found: "\\" + found[0], out)
    return out.replace("\r", " ").replace("\n", " ")


_AUTOLINK = re.compile(r"(?<=www)\.|:(?=//)", re.IGNORECASE)
"""What makes GitHub link bare text: the `:` of `scheme://`, the `.` of `www.` (escaped, they show as they are)."""


def code_span(text: object, cell: bool = False) -> str:
    """A Markdown code span holding `text` verbatim; with `cell`, inside a table cell (where a `|` is escaped, as a
    table's cells are split before their code spans are read)."""
    s = str(text).replace("\r", " ").replace("\n", " ")
    if cell:
        s = s.replace("|", "\\|")
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def code_fence(text: object) -> str:
    """A backtick fence for a code block holding `text`: longer than any backtick run in it (a line of ``` in a
    name would close a plain fence, and what follows would be read as Markdown, ftaudit's end marker included)."""
    longest = max((len(m) for m in re.findall(r"`+", str(text))), default=0)
    return "`" * max(3, longest + 1)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 intruder`, `2 intruders`; `many` for irregular plurals (matrix, matrices)."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


# --- what the renderers show ------------------------------------------------------------------

def humanize(key: str) -> str:
    """`spectral_drift_max` -> `Spectral drift, max` (labels for fields without a known label)."""
    words = key.split("_")
    suffix = ""
    if len(words) > 1 and words[-1] in ("max", "min", "median", "mean", "p90", "p95", "p99"):
        suffix = ", " + words.pop()
    text = " ".join(words) + suffix
    return text[:1].upper() + text[1:]


def summary_metrics(report: Report) -> list[Metric]:
    """Every numeric field of the summary, in the order the report declares them.

    A field that is None is kept when its declared type is numeric (an indicator that could not be
    computed shows as n/a); strings, booleans and mappings (risk, the intruder curve) are left out.
    """
    summary = report.summary
    if dataclasses.is_dataclass(summary):
        items = [(f.name, getattr(summary, f.name), str(f.type)) for f in dataclasses.fields(summary)]
    else:  # pragma: no cover - a plain namespace
        items = [(k, v, "") for k, v in vars(summary).items()]
    metrics = []
    for key, value, declared in items:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric and not (value is None and re.search(r"\b(int|float)\b", declared)):
            continue
        text = format_percent(value) if key in PERCENT_FIELDS else format_number(value)
        metrics.append(Metric(key, SUMMARY_LABELS.get(key) or humanize(key), value, text))
    return metrics


def indicator_label(key: str) -> str:
    return INDICATOR_LABELS.get(key) or humanize(key)


def worst_matrices(report: Report, n: int = 5) -> list[MatrixResult]:
    """Most intruders first, then the lowest best match among the examined vectors, then by name."""
    return sorted(report.matrices, key=lambda m: (-m.intruders, min(m.max_cos, default=1.0), m.name))[:n]


def indicator_keys(matrices: list[MatrixResult]) -> list[str]:
    """The per-matrix indicators shown beside `matrices`, in first-seen order."""
    keys: dict[str, None] = {}
    for m in matrices:
        keys.update(dict.fromkeys(k for k in m.indicators if k not in TABLE_HIDDEN_INDICATORS))
    return list(keys)


def update_type(report: Report) -> str | None:
    """`low-rank (rank 8), 36 of 36 matrices changed` from the summary's inferred update type."""
    update = getattr(report.summary, "update", None)
    if not isinstance(update, dict) or not update.get("type"):
        return None
    text = str(update["type"])
    if update.get("rank") is not None:
        text += f" (rank {update['rank']})"
    changed, total = update.get("changed"), update.get("total")
    if isinstance(changed, int) and isinstance(total, int):  # a report edited by hand can hold anything here
        text += f", {changed} of {plural(total, 'matrix', 'matrices')} changed"
    return text


def module_label(name: str) -> str:
    """The module part of a matrix name: what follows the layer index, without `.weight`.

    `encoder.layer.3.attention.self.query.weight` -> `attention.self.query`, an expert's
    `model.layers.3.moe.input_linear.weight[2]` -> `moe.input_linear[2]`; a name without a layer
    index (or with nothing after it) is kept whole.
    """
    stem = re.sub(r"\.weight(\[\d+\])?$", r"\1", name)
    parts = stem.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            rest = ".".join(parts[i + 1:])
            return rest or stem
    return stem


def status_headline(report: Report) -> str:
    """`fail · 27 intruders` — the verdict in a few words (the badge's message)."""
    return f"{report.verdict.status} · {plural(report.summary.intruder_dimensions, 'intruder')}"


def base_context(report: Report, top: int = 5) -> dict[str, object]:
    """What every Markdown template is given."""
    worst = worst_matrices(report, top)
    return {
        "r": report,
        "s": report.summary,
        "status": report.verdict.status,
        "emoji": STATUS_EMOJI.get(report.verdict.status, "❔"),
        "risk": report.summary.risk,
        "policy": report.verdict.policy,
        "eps": format_number(report.settings.epsilon),
        "metrics": summary_metrics(report),
        "worst": worst,
        "worst_indicators": indicator_keys(worst),
        "indicator_label": indicator_label,
        "curve": [(eps, count, _same_eps(eps, report.settings.epsilon))
                  for eps, count in report.summary.intruder_curve.items()],
        "tensor_notes": tensor_notes(report),
        "update_type": update_type(report),
        "is_sha": is_sha,
        "plural": plural,
        "min_cos": lambda m: f"{min(m.max_cos):.3f}" if m.max_cos else "n/a",
    }


def _same_eps(key: str, epsilon: float) -> bool:
    try:
        return math.isclose(float(key), epsilon)
    except ValueError:
        return False


def unanalysed(report: Report) -> list[tuple[str, list[str]]]:
    """The matrices that could not be, or need not be, analysed, by reason (reasons without matrices left out)."""
    t = report.tensors
    groups = [
        ("missing in the base", t.missing_in_base),
        ("missing in the model", t.missing_in_model),
        ("with NaN or Inf weights", t.nonfinite),
        ("of different shapes in the two models", [str(m.get("name")) for m in t.shape_mismatch]),
        ("identical in the two models (unchanged)", t.unchanged),
    ]
    return [(label, names) for label, names in groups if names]


def tensor_notes(report: Report) -> list[str]:
    """One line per kind of matrix that could not be analysed."""
    notes = []
    for label, names in unanalysed(report):
        shown = ", ".join(code_span(n) for n in names[:3]) + (", …" if len(names) > 3 else "")
        notes.append(f"{plural(len(names), 'matrix', 'matrices')} {label}: {shown}")
    return notes


# --- GitHub Actions ---------------------------------------------------------------------------

def render_job_summary(report: Report, top: int = 5) -> str:
    """Markdown for $GITHUB_STEP_SUMMARY: the verdict, the key numbers, the worst matrices, why."""
    return render_template("job_summary.md.j2", **base_context(report, top))


def github_annotations(report: Report, limit: int = 10) -> list[str]:
    """Workflow commands (`::error::`, `::warning::`, `::notice::`) that show the verdict on the run.

    The level follows the verdict (fail, warn, pass); one command per reason, or one that states
    the result when no reason fired. GitHub shows at most 10 of each level per step.
    """
    status = report.verdict.status
    level = STATUS_LEVEL.get(status, "warning")
    title = _escape_property(f"ftaudit {status.upper()}: {report.model.id}")
    s = report.summary
    headline = (
        f"{plural(s.intruder_dimensions, 'intruder dimension')} at ε={format_number(report.settings.epsilon)} "
        f"in {s.matrices_with_intruders} of {s.matrices_analysed} matrices, forgetting risk {s.risk}"
    )
    messages = [f"{headline}: {reason}" for reason in report.verdict.reasons] or [headline]
    return [f"::{level} title={title}::{_escape_data(m)}" for m in messages[:limit]]


def workflow_warning(message: str) -> str:
    """A `::warning::` workflow command: the run's page shows `message` as an ftaudit warning."""
    return f"::warning title=ftaudit::{_escape_data(message)}"


def workflow_error(message: str) -> str:
    """An `::error::` workflow command: the run's page shows `message` as the error that stopped ftaudit."""
    return f"::error title=ftaudit::{_escape_data(message)}"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
