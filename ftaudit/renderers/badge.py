"""The badge: a self-contained shields-style SVG, and the JSON of a shields.io endpoint badge.

`render_badge_svg` renders templates/badge.svg.j2 (the "flat" style: a grey label, a coloured
message, 20 px high); it needs no external service. `shields_endpoint` gives the same badge as the
JSON that https://img.shields.io/endpoint?url=... reads.
"""

from __future__ import annotations

from ftaudit.renderers.markdown import render_template, status_headline
from ftaudit.report import Report

LABEL = "ftaudit"
# shields.io's named colours and the hex values it draws them with.
STATUS_COLOURS = {"pass": "brightgreen", "warn": "yellow", "fail": "red"}
NAMED_HEX = {"brightgreen": "#4c1", "yellow": "#dfb317", "red": "#e05d44", "lightgrey": "#9f9f9f"}

# Advance widths of Verdana at 11 px (the font shields draws with), for the printable ASCII range.
_VERDANA_11 = dict(zip(
    " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~",
    [3.87, 4.33, 5.05, 9.0, 6.99, 11.84, 7.99, 2.95, 5.0, 5.0, 6.99, 9.0, 4.0, 5.0, 4.0, 5.0,
     *[6.99] * 10, 5.0, 5.0, 9.0, 9.0, 9.0, 6.0, 11.0,
     7.52, 7.54, 7.68, 8.48, 6.96, 6.32, 8.53, 8.27, 4.63, 5.0, 7.62, 6.12, 9.27, 8.23, 8.66, 6.63, 8.66,
     7.65, 7.52, 6.78, 8.05, 7.52, 10.88, 7.54, 6.77, 7.54, 5.0, 5.0, 5.0, 9.0, 6.99, 6.99,
     6.61, 6.85, 5.73, 6.85, 6.55, 3.87, 6.85, 6.96, 3.02, 3.79, 6.51, 3.02, 10.7, 6.96, 6.68, 6.85, 6.85,
     4.69, 5.73, 4.33, 6.96, 6.51, 8.99, 6.51, 6.51, 5.76, 6.98, 5.0, 6.98, 9.0],
    strict=True,
))
_OTHER = {"·": 4.0, "…": 11.0, "ε": 6.2, "‖": 5.0, "Δ": 8.0, "×": 9.0, "–": 6.99, "—": 11.0}


def text_width(text: str, size: float = 11.0, bold: bool = False) -> float:
    """Estimated width in px of `text` in Verdana (or the like) at `size` px; a little generous."""
    width = sum(_VERDANA_11.get(ch) or _OTHER.get(ch) or (11.0 if ord(ch) > 0x2E7F else 7.5) for ch in text)
    return width * size / 11.0 * (1.1 if bold else 1.0)


def badge_colour(report: Report) -> str:
    """The shields.io colour name of the verdict (lightgrey for anything but pass, warn, fail)."""
    return STATUS_COLOURS.get(report.verdict.status, "lightgrey")


def badge_message(report: Report) -> str:
    """`pass · 0 intruders`, `fail · 42 intruders`."""
    return status_headline(report)


def shields_endpoint(report: Report) -> dict[str, object]:
    """The shields.io endpoint-badge JSON of the verdict."""
    return {"schemaVersion": 1, "label": LABEL, "message": badge_message(report), "color": badge_colour(report)}


def render_badge_svg(report: Report) -> str:
    """A flat shields-style badge, `ftaudit | fail · 42 intruders`, as a standalone SVG document."""
    label, message = LABEL, badge_message(report)
    label_w = round(text_width(label)) + 10
    message_w = round(text_width(message)) + 10
    return render_template(
        "badge.svg.j2",
        label=label,
        message=message,
        colour=NAMED_HEX[badge_colour(report)],
        label_w=label_w,
        message_w=message_w,
        width=label_w + message_w,
        # shields lays the text out at 10x scale for sub-pixel positions
        label_x=label_w * 5,
        message_x=(label_w + message_w / 2) * 10,
        label_len=(label_w - 10) * 10,
        message_len=(message_w - 10) * 10,
    )
