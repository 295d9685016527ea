"""The heatmap: one cell per analysed matrix, layers as rows and modules as columns, as an SVG.

`render_heatmap_svg` lays the grid out here (sizes, colours, label rotation) and renders
templates/heatmap.svg.j2. The colour is the matrix's intruder count, or one of its indicators
(`MatrixResult.indicators`, e.g. `relative_update_norm`); the value is printed in each cell and the
full tensor name is the cell's tooltip. A layer's experts share one cell per module (`experts.*.w1`,
`experts.gate_up_proj[*]`), which shows the largest value among them: a model of 128 experts stays
a figure of a few columns.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ftaudit.renderers.badge import text_width
from ftaudit.renderers.markdown import indicator_label, module_label, render_template
from ftaudit.report import MatrixResult, Report

FONT = "Verdana,Geneva,DejaVu Sans,sans-serif"
# ColorBrewer YlOrRd: pale yellow to dark red (sequential, readable by colour-blind readers).
PALETTE = ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"]
ZERO_FILL = "#f1f3f5"   # exactly zero: nothing to see
PAD, TITLE_SIZE, LABEL_SIZE = 16, 15, 11
ROTATION = 45           # degrees, for column labels wider than their column

# The usual order of a block's matrices, so that columns read q, k, v, o, then the MLP.
_CANONICAL = [
    "q_proj", "query", "wq", "q", "k_proj", "key", "wk", "k", "v_proj", "value", "wv", "v",
    "qkv", "query_key_value", "qkv_proj", "c_attn", "Wqkv", "o_proj", "out_proj", "wo", "o", "attention.output",
    "gate_proj", "w1", "fc1", "c_fc", "up_proj", "w3", "intermediate", "dense_h_to_4h",
    "down_proj", "w2", "fc2", "dense_4h_to_h", "output",
]
_KIND_ORDER = {"attention": 0, "mlp": 1}
# The top of the colour scale is at least this for these indicators (the default policy's high-risk
# levels, a right angle for rotations), so that a small update looks small rather than saturated.
SCALE_FLOOR = {"relative_update_norm": 1.0, "spectral_spike": 2.5, "subspace_drift_deg": 90.0}
MAX_WIDTH = 640         # the figure grows up to this to fit the model ids, then shortens them
MAX_LABEL_W = 180       # px; a wider column label is shortened from the left (…tail), its full text its tooltip
_EXPERT_INDEX = re.compile(r"(experts\.)\d+(?=\.|$)|\[\d+\]$")
"""An expert's index in a module label: `experts.3` of a model that stores each expert's matrices, `[3]` of a stack."""


@dataclass(frozen=True)
class Cell:
    x: float
    y: float
    fill: str
    text: str
    text_fill: str
    tooltip: str


@dataclass(frozen=True)
class Legend:
    """The colour key: its title, swatches or gradient bar with ticks, the "not analysed" key, and its extent."""

    title: str
    x: float
    y: float
    swatch_y: float
    swatch_h: int
    swatch_w: int
    swatches: list[tuple[float, str, str]]
    stops: list[tuple[str, str]]
    ticks: list[tuple[float, str, str]]
    bar_w: int
    label_y: float
    missing: bool
    none_x: float
    right: float
    bottom: float


def render_heatmap_svg(report: Report, metric: str = "intruders") -> str:
    """The heatmap of `metric` ("intruders" or a key of the matrices' indicators) as an SVG document."""
    values = _metric_values(report, metric)
    rows = sorted({m.layer for m in report.matrices if m.layer is not None})
    row_keys: list[int | None] = [*rows, *([None] if any(m.layer is None for m in report.matrices) else [])]
    columns = _column_order(report.matrices)
    shared: dict[tuple[int | None, str], list[MatrixResult]] = {}
    for matrix in report.matrices:
        shared.setdefault((matrix.layer, column_label(matrix.name)), []).append(matrix)
    grid = {key: max(ms, key=lambda m: _order(values[id(m)])) for key, ms in shared.items()}

    dense = len(row_keys) > 12
    cell_h = 17 if dense else 28
    value_size = 9.5 if dense else 11
    largest = max((abs(v) for v in values.values() if v is not None and math.isfinite(v)), default=None)
    integral = all(v is None or float(v).is_integer() for v in values.values())
    texts = {id(m): format_value(values[id(m)], None if integral else largest) for m in report.matrices}
    widest_value = max((text_width(t, value_size) for t in texts.values()), default=0)
    cell_w = math.ceil(max(38 if dense else 48, widest_value + 10))

    # Domain of the colour scale: intruders out of k; an indicator from 0 (or its minimum) to its maximum.
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    if metric == "intruders":
        lo, hi = 0.0, float(max(report.settings.k, *finite, 1))
    else:
        lo = min(0.0, *finite) if finite else 0.0
        hi = max(max(finite) if finite else 1.0, SCALE_FLOOR.get(metric, 0.0))
    scale = _Scale(lo, hi if hi > lo else lo + 1.0, counts=integral)

    shown = short_labels(columns)
    label_w = {c: text_width(shown[c], LABEL_SIZE) for c in columns}
    rotate = max(label_w.values(), default=0) > cell_w - 6
    sin = math.sin(math.radians(ROTATION))
    header_h = (max(label_w.values(), default=0) * sin + LABEL_SIZE + 6) if rotate else LABEL_SIZE + 8
    row_labels = {key: ("other" if key is None else str(key)) for key in row_keys}
    row_label_w = max((text_width(t, LABEL_SIZE) for t in row_labels.values()), default=0)

    title = f"{_metric_title(metric)} per layer and module"
    grid_x = math.ceil(PAD + 18 + row_label_w + 8)
    title_block = TITLE_SIZE + 8 + LABEL_SIZE + 10
    axis_y = PAD + title_block + LABEL_SIZE
    grid_y = math.ceil(axis_y + 6 + header_h)
    grid_w, grid_h = len(columns) * cell_w, len(row_keys) * cell_h
    overhang = 0.0
    if rotate:
        overhang = max(
            (i + 0.5) * cell_w + label_w[c] * math.cos(math.radians(ROTATION)) - grid_w for i, c in enumerate(columns)
        )
    legend = _legend(scale, metric, report, values, grid_x, grid_y + grid_h + 18)
    width = math.ceil(max(
        grid_x + grid_w + max(overhang, 0) + PAD,
        PAD * 2 + text_width(title, TITLE_SIZE, bold=True),
        legend.right + PAD,
        320,
    ))
    ids = f"{report.model.id} vs {report.base.id}"
    width = max(width, min(MAX_WIDTH, math.ceil(2 * PAD + text_width(ids, LABEL_SIZE))))
    subtitle = _fit_ids(report.model.id, report.base.id, width - 2 * PAD)
    height = math.ceil(legend.bottom + PAD)

    cells = []
    for r, key in enumerate(row_keys):
        for c, column in enumerate(columns):
            m = grid.get((key, column))
            x, y = grid_x + c * cell_w, grid_y + r * cell_h
            if m is None:
                tooltip = f"{row_labels[key]} · {column}: not analysed"
                cells.append(Cell(x, y, "url(#ftaudit-heatmap-none)", "", "#000", tooltip))
                continue
            value = values[id(m)]
            fill = scale.colour(value)
            experts = len(shared[(key, column)])
            cells.append(Cell(
                x, y, fill, texts[id(m)],
                "#8a9099" if fill == ZERO_FILL or fill.startswith("url(") else _text_on(fill),
                f"{m.name}: {texts[id(m)]} ({_metric_title(metric).lower()}"
                + (f"; lowest best match {min(m.max_cos):.3f}" if m.max_cos else "")
                + (f"; the largest of the layer's {experts} experts)" if experts > 1 else ")"),
            ))
    return render_template(
        "heatmap.svg.j2",
        width=width, height=height, font=FONT,
        title=title, subtitle=subtitle, title_size=TITLE_SIZE, label_size=LABEL_SIZE, value_size=value_size,
        description=_description(report, metric, values),
        pad=PAD, title_y=PAD + TITLE_SIZE, subtitle_y=PAD + TITLE_SIZE + 8 + LABEL_SIZE,
        grid_x=grid_x, grid_y=grid_y, grid_w=grid_w, grid_h=grid_h, cell_w=cell_w, cell_h=cell_h,
        cells=cells,
        rows=[(row_labels[key], grid_y + (i + 0.5) * cell_h) for i, key in enumerate(row_keys)],
        columns=[(shown[col], col, grid_x + (i + 0.5) * cell_w) for i, col in enumerate(columns)],
        rotate=rotate, rotation=ROTATION, column_label_y=grid_y - 6,
        axis_y=axis_y, row_axis_x=PAD + 10, row_axis_y=grid_y + grid_h / 2,
        legend=legend,
    )


def format_value(value: float | None, reference: float | None = None) -> str:
    """A cell's value in at most ~6 characters: 12, 0.85, 1.3e-3.

    `reference` (the largest magnitude shown) fixes the number of decimals, so that the cells of
    one heatmap are printed alike (1.20 beside 1.36, not 1.2).
    """
    if value is None or not math.isfinite(value):
        return "n/a"
    ref = abs(reference) if reference is not None and math.isfinite(reference) else abs(value)
    if float(value).is_integer() and (reference is None or float(reference).is_integer()) and abs(value) < 1e5:
        return str(int(value))
    if ref >= 100:
        return f"{value:.0f}"
    if ref >= 0.01:
        decimals = min(max(2 - math.floor(math.log10(ref)), 0), 3)
        return f"{value:.{decimals}f}"
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (multiples of 1, 2, 2.5 or 5 × 10^n) from `lo` to at most `hi`."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


class _Scale:
    """Values to colours. For counts (`counts=True`, from 0) zero gets its own neutral colour and the
    palette starts a step in, so that one intruder stands out from none."""

    def __init__(self, lo: float, hi: float, counts: bool = False) -> None:
        self.lo, self.hi = lo, hi
        self.counts = counts and lo == 0

    def colour(self, value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return "url(#ftaudit-heatmap-none)"
        if self.counts and value == 0:
            return ZERO_FILL
        t = min(max((value - self.lo) / (self.hi - self.lo), 0.0), 1.0)
        if self.counts:
            t = 0.2 + 0.8 * t
        return _interpolate(t)


def _interpolate(t: float) -> str:
    pos = t * (len(PALETTE) - 1)
    i = min(int(pos), len(PALETTE) - 2)
    f = pos - i
    a, b = _rgb(PALETTE[i]), _rgb(PALETTE[i + 1])
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _text_on(fill: str) -> str:
    """Dark text on light cells, white on dark ones (relative luminance, WCAG)."""
    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in _rgb(fill))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#1a1a1a" if luminance > 0.22 else "#ffffff"


def _metric_values(report: Report, metric: str) -> dict[int, float | None]:
    if metric == "intruders":
        return {id(m): float(m.intruders) for m in report.matrices}
    known = {k for m in report.matrices for k in m.indicators}
    if metric not in known:
        raise ValueError(f"unknown heatmap metric {metric!r} (known: intruders, {', '.join(sorted(known))})")
    out: dict[int, float | None] = {}
    for m in report.matrices:
        v = m.indicators.get(metric)
        out[id(m)] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


METRIC_TITLES = {"intruders": "Intruder dimensions", "relative_update_norm": "Relative update norm ‖ΔW‖/‖W₀‖"}


def _metric_title(metric: str) -> str:
    return METRIC_TITLES.get(metric) or indicator_label(metric)


def column_label(name: str) -> str:
    """A matrix's column: its module label, an expert's index replaced by `*` (`block_sparse_moe.experts.*.w1`,
    `mlp.experts.gate_up_proj[*]`), so that a layer's experts share a cell."""
    return _EXPERT_INDEX.sub(lambda found: f"{found[1]}*" if found[1] else "[*]", module_label(name))


def _order(value: float | None) -> float:
    """How a value ranks among those sharing a cell: the largest is shown; a missing one, never before another."""
    return -math.inf if value is None or math.isnan(value) else value


def _column_order(matrices: list[MatrixResult]) -> list[str]:
    """Module labels: attention before MLP, q/k/v/o and gate/up/down in their usual order."""
    first: dict[str, tuple[int, int, int]] = {}
    for i, m in enumerate(matrices):
        label = column_label(m.name)
        if label not in first:
            first[label] = (_KIND_ORDER.get(m.kind, 2), _canonical_rank(label), i)
    return sorted(first, key=first.__getitem__)


def _canonical_rank(label: str) -> int:
    parts = label.split(".")
    for rank, token in enumerate(_CANONICAL):
        if token in parts or ("." in token and re.search(rf"(^|\.){re.escape(token)}(\.|$)", label)):
            return rank
    return len(_CANONICAL)


def _fit_ids(model: str, base: str, width: float, size: float = LABEL_SIZE) -> str:
    """`model vs base`, each id shortened from the left (…/name) if both do not fit `width` px."""
    text = f"{model} vs {base}"
    if text_width(text, size) <= width:
        return text
    room = (width - text_width(" vs ", size)) / 2
    return f"{_tail(model, room, size)} vs {_tail(base, room, size)}"


def short_labels(labels: list[str], width: float = MAX_LABEL_W, size: float = LABEL_SIZE) -> dict[str, str]:
    """Each label as shown: whole if it fits `width` px, else its end (`…self_attn.q_proj`), longer where two ends
    would read alike, so that distinct labels stay distinct."""
    shown = {label: _tail(label, width, size) for label in labels}
    while True:
        seen: dict[str, list[str]] = {}
        for label, text in shown.items():
            seen.setdefault(text, []).append(label)
        alike = [label for same in seen.values() if len(same) > 1 for label in same if shown[label] != label]
        if not alike:
            return shown
        for label in alike:
            keep = len(shown[label])  # one character more of its end
            shown[label] = label if keep >= len(label) else "…" + label[-keep:]


def _tail(text: str, width: float, size: float) -> str:
    if text_width(text, size) <= width:
        return text
    keep = len(text) - 1
    while keep > 1 and text_width("…" + text[-keep:], size) > width:
        keep -= 1
    return "…" + text[-keep:]


def _legend(scale: _Scale, metric: str, report: Report, values: dict[int, float | None],
            x: float, y: float) -> Legend:
    """The colour key: one swatch per value for small integer ranges, a gradient bar otherwise."""
    title = (f"Intruders per matrix at ε = {report.settings.epsilon:g}, of its top {report.settings.k} "
             "singular vectors" if metric == "intruders"
             else _metric_title(metric))
    swatch_y = y + LABEL_SIZE + 6
    integral = all(v is None or float(v).is_integer() for v in values.values())
    swatches: list[tuple[float, str, str]] = []
    stops: list[tuple[str, str]] = []
    ticks: list[tuple[float, str, str]] = []
    if integral and scale.hi - scale.lo <= 12:
        size = 22
        for i, count in enumerate(range(int(scale.lo), int(scale.hi) + 1)):
            swatches.append((x + i * size, scale.colour(count), str(count)))
        bar_w = size * len(swatches)
        swatch_w = size
    else:
        bar_w, swatch_w = 200, 0
        stops = [(f"{i / (len(PALETTE) - 1):.3f}", c) for i, c in enumerate(PALETTE)]
        if scale.counts:
            stops = [(f"{0.2 + 0.8 * float(o):.3f}", c) for o, c in stops]
            stops.insert(0, ("0.000", ZERO_FILL))
        values_at = nice_ticks(scale.lo, scale.hi)
        step = values_at[1] - values_at[0] if len(values_at) > 1 else scale.hi - scale.lo
        for v in values_at:
            offset = bar_w * (v - scale.lo) / (scale.hi - scale.lo)
            anchor = "start" if offset < 8 else "end" if offset > bar_w - 8 else "middle"
            ticks.append((x + offset, _tick_label(v, step), anchor))
    missing = any(v is None for v in values.values()) or _has_gaps(report)
    none_x = x + bar_w + 24
    key_right = none_x + 20 + text_width("not analysed", LABEL_SIZE) if missing else x + bar_w + 20
    right = max(x + text_width(title, LABEL_SIZE), key_right)
    return Legend(
        title=title, x=x, y=y, swatch_y=swatch_y, swatch_h=14, swatch_w=swatch_w,
        swatches=swatches, stops=stops, ticks=ticks, bar_w=bar_w,
        label_y=swatch_y + 14 + LABEL_SIZE + 3, missing=missing, none_x=none_x,
        right=right, bottom=swatch_y + 14 + LABEL_SIZE + 6,
    )


def _tick_label(value: float, step: float) -> str:
    """A tick value with just the decimals its step needs (0, 0.25, 0.5 ... or 2e-4 in small scales)."""
    if value == 0:
        return "0"
    if step < 0.01:
        return format_value(value, value)
    decimals = next((d for d in range(5) if abs(round(step, d) - step) < step * 1e-6), 4)
    return f"{value:.{decimals}f}"


def _has_gaps(report: Report) -> bool:
    cells = {(m.layer, column_label(m.name)) for m in report.matrices}
    layers = {m.layer for m in report.matrices}
    columns = {column_label(m.name) for m in report.matrices}
    return len(cells) < len(layers) * len(columns)


def _description(report: Report, metric: str, values: dict[int, float | None]) -> str:
    s = report.summary
    if metric == "intruders":
        return (f"{s.intruder_dimensions} intruder dimensions at epsilon {report.settings.epsilon:g} in "
                f"{s.matrices_with_intruders} of {s.matrices_analysed} matrices of {report.model.id}.")
    finite = [v for v in values.values() if v is not None]
    top = f", max {format_value(max(finite))}" if finite else ""
    return f"{_metric_title(metric)} of {len(finite)} matrices of {report.model.id}{top}."
