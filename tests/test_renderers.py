"""Every renderer on reports of real audits: the card section, badge, heatmap, job summary, annotations.

The reports come from auditing checkpoints written here: a strong low-rank update (intruders, fail),
the same under a policy that never fails (warn), a gentle dense update (pass), and a 32-layer model
(the heatmap's dense layout).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import xml.etree.ElementTree as ET

import click
import pytest
import torch

from ftaudit import policy as policy_mod
from ftaudit.audit import AuditOptions
from ftaudit.cardfile import BEGIN, END, NOTE
from ftaudit.check import Target, check
from ftaudit.pairing import Selection
from ftaudit.renderers import badge, card, heatmap, markdown
from ftaudit.renderers import text as text_renderer
from ftaudit.report import Report, Summary
from tests.models import MODULES, llama_like, low_rank_update, small_update, write_model

SVG = "{http://www.w3.org/2000/svg}"
LLAMA_COLUMNS = [f"self_attn.{m}_proj" for m in "qkvo"] + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Report]:
    root = tmp_path_factory.mktemp("renderers")
    base = llama_like()
    write_model(root / "base", base)
    write_model(root / "lora", low_rank_update(base))
    write_model(root / "lora-head", low_rank_update(base, only="."))  # the head too
    write_model(root / "full", small_update(base))
    lenient = root / "lenient.yaml"
    lenient.write_text("verdict:\n  fail_at: never\n")
    deep = llama_like(layers=32, hidden=8, ffn=12)
    write_model(root / "deep-base", deep)
    write_model(root / "deep-lora", low_rank_update(deep, scale=0.6))

    def audit(model: str, base_dir: str = "base", **options: object) -> Report:
        return check(Target(str(root / model), str(root / base_dir)), AuditOptions(**options), policy_mod.load(None))

    fail = audit("lora")
    warn = copy.deepcopy(fail)
    policy_mod.apply(policy_mod.load(lenient), warn)
    return {
        "fail": fail,
        "warn": warn,
        "pass": audit("full"),
        "heads": audit("lora-head", selection=Selection.from_options(["head"], [])),
        "deep": audit("deep-lora", "deep-base"),
    }


def test_the_reports_are_what_the_tests_assume(reports):
    assert reports["fail"].verdict.status == "fail" and reports["fail"].summary.intruder_dimensions > 0
    assert reports["warn"].verdict.status == "warn"
    assert reports["pass"].verdict.status == "pass" and reports["pass"].summary.intruder_dimensions == 0
    assert any(m.layer is None for m in reports["heads"].matrices)
    assert reports["deep"].summary.matrices_analysed == 32 * len(MODULES)


# --- the card section ---------------------------------------------------------------------------

def table_rows(markdown_text: str) -> list[list[str]]:
    """Cells of every table line (split on unescaped pipes)."""
    rows = []
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())
            rows.append([c.strip() for c in cells[1:-1]])
    return rows


def tables(markdown_text: str) -> list[list[list[str]]]:
    out, current = [], []
    for line in [*markdown_text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(table_rows("\n".join(current)))
            current = []
    return out


def assert_tables_well_formed(markdown_text: str) -> None:
    for table in tables(markdown_text):
        assert len(table) >= 3, table
        assert all(re.fullmatch(r":?-+:?", c) for c in table[1]), table[1]
        assert {len(row) for row in table} == {len(table[0])}, table


def test_card_section_of_a_failing_fine_tune(reports):
    report = reports["fail"]
    report.model.revision = "0123456789abcdef0123456789abcdef01234567"  # as a Hub audit records it
    try:
        text = card.render_card_section(report, badge_path="ftaudit/badge.svg", heatmap_path="ftaudit/heatmap.svg")
    finally:
        report.model.revision = None
    s = report.summary
    assert "**Verdict: ❌ FAIL**" in text and "forgetting risk **HIGH**" in text
    assert f"**{s.intruder_dimensions} intruder dimensions** at ε = 0.5" in text
    for reason in report.verdict.reasons:
        assert f"- {markdown.md_escape(reason)}\n" in text
    assert "![ftaudit: fail · " in text and "](ftaudit/badge.svg)" in text
    assert "](ftaudit/heatmap.svg)" in text
    assert f"`{report.model.id}`" in text and f"`{report.base.id}`" in text
    assert "`0123456789ab` (full: `0123456789abcdef0123456789abcdef01234567`)" in text
    assert "--revision 0123456789abcdef0123456789abcdef01234567" in text
    # the intruder curve: every ε and count, the policy's ε in bold
    curve = next(t for t in tables(text) if t[0][0] == "ε")
    assert curve[0][1:] == [f"**{e}**" if e == "0.5" else e for e in s.intruder_curve]
    assert curve[2][1:] == [f"**{c}**" if e == "0.5" else str(c) for e, c in s.intruder_curve.items()]
    # the worst matrices: most intruders first, then the lowest best match
    expected = sorted(report.matrices, key=lambda m: (-m.intruders, min(m.max_cos)))[:5]
    worst = next(t for t in tables(text) if t[0][0] == "Matrix")
    assert [row[0] for row in worst[2:]] == [f"`{m.name}`" for m in expected]
    assert [int(row[2]) for row in worst[2:]] == [m.intruders for m in expected]
    assert [row[3] for row in worst[2:]] == [f"{min(m.max_cos):.3f}" for m in expected]
    assert "‖ΔW‖/‖W₀‖" in worst[0] and worst[2][worst[0].index("‖ΔW‖/‖W₀‖")] == \
        markdown.format_number(expected[0].indicators["relative_update_norm"])
    # the reading, the paper, the confound, the settings
    assert "arXiv:2410.21228" in text and "forgetting of pre-training behaviour" in text
    assert "confound" in text and markdown.format_number(s.relative_update_norm_median, 3) in text
    assert "The forgetting risk is high" in text
    assert f"ftaudit {report.tool['version']} · k = 10 · ε = 0.5" in text and "device `cpu`" in text
    assert_tables_well_formed(text)


def test_card_section_shows_every_numeric_summary_field(reports):
    report = reports["fail"]
    text = card.render_card_section(report)
    numbers = dict(next(t for t in tables(text) if t[0] == ["Indicator", "Value"])[2:])
    for f in dataclasses.fields(Summary):
        value = getattr(report.summary, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            label = markdown.md_escape(markdown.SUMMARY_LABELS.get(f.name) or markdown.humanize(f.name))
            label += " (ε = 0.5)" if f.name == "intruder_dimensions" else ""
            shown = f"{value:.1%}" if f.name == "intruder_rate" else markdown.format_number(value)
            assert numbers[label] == shown, f.name
    assert numbers["Relative update norm ‖ΔW‖/‖W₀‖, median"] == f"{report.summary.relative_update_norm_median:.4g}"
    assert numbers["Forgetting risk (policy)"] == "high"


def test_a_summary_field_added_later_shows_up_with_a_readable_label(reports):
    extended = dataclasses.make_dataclass(
        "ExtendedSummary", [("future_drift_max", "float | None", dataclasses.field(default=None)),
                            ("future_score", "float", dataclasses.field(default=0.25))], bases=(Summary,))
    report = dataclasses.replace(reports["fail"], summary=extended(**dataclasses.asdict(reports["fail"].summary)))
    numbers = dict(next(t for t in tables(card.render_card_section(report)) if t[0] == ["Indicator", "Value"])[2:])
    assert numbers["Future drift, max"] == "n/a" and numbers["Future score"] == "0.25"
    assert "Future score" in markdown.render_job_summary(report)


def test_card_section_of_a_gentle_fine_tune(reports):
    report = reports["pass"]
    text = card.render_card_section(report)
    assert "**Verdict: ✅ PASS**" in text and "forgetting risk **LOW**" in text
    assert "No threshold of the policy was reached." in text
    assert "No intruder dimensions at ε = 0.5" in text and "The forgetting risk is low" in text
    assert "arXiv:2410.21228" in text and "confound" in text
    assert "![" not in text  # no badge or heatmap unless given
    assert "not pinned" in text
    assert "```bash\nftaudit check " in text and f"--base {report.base.id}" in text
    assert_tables_well_formed(text)


def test_renderers_when_no_matrix_could_be_analysed(tmp_path):
    base = llama_like()
    nan = {k: torch.full_like(v, math.nan) if "proj" in k else v for k, v in base.items()}
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "nan", nan)
    report = check(Target(str(tmp_path / "nan"), str(tmp_path / "base")), AuditOptions(), policy_mod.load(None))
    assert report.summary.matrices_analysed == 0 and report.verdict.status == "fail"
    text = card.render_card_section(report)
    assert "No weight matrix could be analysed" in text and "14 matrices with NaN or Inf weights" in text
    assert "line up" not in text and "no weight-space sign of forgetting" not in text
    assert_tables_well_formed(text)
    ET.fromstring(heatmap.render_heatmap_svg(report))
    ET.fromstring(badge.render_badge_svg(report))
    assert "14 matrices with NaN or Inf weights" in markdown.render_job_summary(report)


def test_one_matrix_is_counted_in_the_singular(tmp_path):
    base = llama_like()
    one = {k: torch.full_like(v, math.nan) if k == "model.layers.0.self_attn.q_proj.weight" else v
           for k, v in small_update(base).items() if k != "model.layers.1.mlp.up_proj.weight"}
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "one", one)
    report = check(Target(str(tmp_path / "one"), str(tmp_path / "base")), AuditOptions(), policy_mod.load(None))
    assert report.verdict.reasons == [
        "non-finite weights (NaN or Inf) in 1 matrix, first model.layers.0.self_attn.q_proj.weight",
        "1 matrix missing on one side or of different shapes",
    ]
    rendered = text_renderer.render(report)
    assert "1 matrix with NaN or Inf weights" in rendered and "1 matrix missing in the model" in rendered
    assert "1 matrices" not in rendered


def test_card_section_escapes_what_comes_from_the_report(reports):
    report = dataclasses.replace(reports["fail"], verdict=dataclasses.replace(
        reports["fail"].verdict, reasons=["a | pipe, <b>html</b> and *stars*"]))
    text = card.render_card_section(report, badge_path="my badge (1).svg")
    assert "- a \\| pipe, &lt;b&gt;html&lt;/b&gt; and \\*stars\\*" in text
    assert "](my%20badge%20%281%29.svg)" in text


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("img/my badge (1).svg", "img/my%20badge%20%281%29.svg"),
        ("a\nb.svg", "a%0Ab.svg"),  # a newline would end the image's Markdown, and the line
        ("<b>.svg", "%3Cb%3E.svg"),
        ("[x].svg", "%5Bx%5D.svg"),
        ("C:\\cards\\badge.svg", "C:/cards/badge.svg"),
        ("https://img.shields.io/endpoint?url=https%3A%2F%2Fx.org%2Fb.json&style=flat",
         "https://img.shields.io/endpoint?url=https%3A%2F%2Fx.org%2Fb.json&style=flat"),
    ],
)
def test_a_link_given_for_the_badge_or_heatmap_is_one_markdown_link_target(reports, given, target):
    text = card.render_card_section(reports["fail"], badge_path=given, heatmap_path=given)
    assert text.count(f"]({target})") == 2
    assert "\n" not in given or "a\nb" not in text


def test_names_with_pipes_show_as_they_are_in_and_out_of_tables(reports):
    fail = reports["fail"]
    report = dataclasses.replace(
        fail,
        model=dataclasses.replace(fail.model, id="org/a|b"),
        settings=dataclasses.replace(fail.settings, device="cpu|x"),
        tensors=dataclasses.replace(fail.tensors, missing_in_model=["x|y.weight"]),
        verdict=dataclasses.replace(fail.verdict, policy=dataclasses.replace(fail.verdict.policy, source="p|q.yaml")),
    )
    section, summary = card.render_card_section(report), markdown.render_job_summary(report)
    assert "- 1 matrix missing in the model: `x|y.weight`" in section
    assert "- 1 matrix missing in the model: `x|y.weight`" in summary
    assert summary.splitlines()[2].startswith("**`org/a|b`** against base")
    assert "· policy `p|q.yaml` (digest" in summary and "· device `cpu|x` ·" in summary
    assert "· device `cpu|x`" in section
    for rendered in (section, summary):
        assert_tables_well_formed(rendered)
    assert ["Audited", "`org/a\\|b`", "not pinned (local files or the default branch)"] in tables(section)[0]


def test_reasons_cannot_turn_emphasis_strikethrough_or_links_on(reports):
    reason = "snake_case _x_ *y* ~~gone~~ ~z~ at https://example.com/a_b, HTTP://x.org and www.example.com"
    report = dataclasses.replace(reports["fail"], verdict=dataclasses.replace(reports["fail"].verdict, reasons=[reason]))
    escaped = ("snake\\_case \\_x\\_ \\*y\\* \\~\\~gone\\~\\~ \\~z\\~ at https\\://example.com/a\\_b, "
               "HTTP\\://x.org and www\\.example.com")
    assert f"- {escaped}\n" in card.render_card_section(report)
    assert f"- {escaped}\n" in markdown.render_job_summary(report)


def test_every_text_of_a_hand_made_report_is_escaped(reports, tmp_path):
    from tests.invoke import run

    hostile = "<img src=x onerror=alert(1)> | `x` [a](javascript:alert(1))\n<!--\n"
    data = reports["fail"].to_dict()
    data["tool"]["version"] = hostile
    data["created_at"] = hostile
    data["summary"]["intruder_curve"] = {hostile: 3, "0.5": 2}
    data["model"]["adapter"] = {"type": "lora", "r": hostile, "lora_alpha": hostile}
    (tmp_path / "report.json").write_text(json.dumps(data))
    (tmp_path / "README.md").write_text("# Model\n\nText.\n")
    code, _, stderr = run("card", "update", tmp_path / "README.md", "--report", tmp_path / "report.json")
    assert code == 0, stderr
    card_text = (tmp_path / "README.md").read_text()
    section = card_text[card_text.index(BEGIN) + len(BEGIN):card_text.index(END)].replace(NOTE, "")
    for rendered in (section, markdown.render_job_summary(Report.from_dict(data))):
        assert "<img" not in rendered and "<!--" not in rendered and "](javascript" not in rendered.replace("\\](", "")
        assert_tables_well_formed(rendered)
        curve = next(t for t in tables(rendered) if t[0][0] == "ε")
        assert len(curve[0]) == 3 and "&lt;img" in curve[0][1]


def test_a_fence_line_in_an_option_stays_inside_the_command_block(reports):
    from ftaudit.cardfile import card_data_from_report, update_card

    glob = "x\n```\n<!-- ftaudit:end -->\n"
    report = dataclasses.replace(reports["fail"], settings=dataclasses.replace(reports["fail"].settings, exclude=[glob]))
    section, data = card.render_card_section(report), card_data_from_report(report)
    once = update_card("# Model\n", section, data)
    assert update_card(once, section, data) == once  # the card can still be updated: its end marker is the real one
    assert once.count("\n````bash\n") == 1 and once.endswith("\n````\n\n<!-- ftaudit:end -->\n")


# --- the badge ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, colour, name", [("fail", "#e05d44", "red"), ("warn", "#dfb317", "yellow"),
                                                 ("pass", "#4c1", "brightgreen")])
def test_badge(reports, kind, colour, name):
    report = reports[kind]
    n = report.summary.intruder_dimensions
    message = f"{kind} · {n} intruder{'' if n == 1 else 's'}"
    root = ET.fromstring(badge.render_badge_svg(report))
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    assert root.find(f"{SVG}title").text == f"ftaudit: {message}" == root.get("aria-label")
    rects = root.findall(f".//{SVG}g/{SVG}rect")
    label_rect, message_rect = rects[0], rects[1]
    assert message_rect.get("fill") == colour
    width = int(root.get("width"))
    assert int(label_rect.get("width")) + int(message_rect.get("width")) == width
    texts = [t for t in root.iter(f"{SVG}text") if t.get("aria-hidden") is None]
    assert [t.text for t in texts] == ["ftaudit", message]
    for text, rect in zip(texts, (label_rect, message_rect), strict=True):  # the text fits its half, with padding
        assert float(text.get("textLength")) / 10 == int(rect.get("width")) - 10
        assert float(text.get("textLength")) / 10 >= badge.text_width(text.text) - 0.5
    assert badge.shields_endpoint(report) == {"schemaVersion": 1, "label": "ftaudit", "message": message, "color": name}


def test_badge_width_follows_the_message(reports):
    report = reports["fail"]
    many = dataclasses.replace(report, summary=dataclasses.replace(report.summary, intruder_dimensions=12345))
    narrow = ET.fromstring(badge.render_badge_svg(report))
    wide = ET.fromstring(badge.render_badge_svg(many))
    assert wide.find(f"{SVG}title").text == "ftaudit: fail · 12345 intruders"
    assert int(wide.get("width")) - int(narrow.get("width")) == pytest.approx(3 * badge.text_width("0"), abs=1)
    assert badge.text_width("mmmm") > badge.text_width("iiii")


# --- the heatmap ----------------------------------------------------------------------------------

def cells(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]


def assert_inside(root: ET.Element) -> None:
    """Every label's estimated extent lies inside the drawing (nothing clipped)."""
    width, height = float(root.get("width")), float(root.get("height"))
    for t in root.iter(f"{SVG}text"):
        if t.get("transform", "").startswith("translate"):
            continue  # the vertical axis title
        size = float(t.get("font-size") or 11)
        w = badge.text_width(t.text or "", size, bold=t.get("font-weight") == "bold")
        x, y = float(t.get("x")), float(t.get("y"))
        if "rotate" in t.get("transform", ""):
            angle = math.radians(heatmap.ROTATION)
            assert x + w * math.cos(angle) <= width and y - w * math.sin(angle) - size >= 0, t.text
            continue
        anchor = t.get("text-anchor", "start")
        left = x - (w if anchor == "end" else w / 2 if anchor == "middle" else 0)
        assert left >= 0 and left + w <= width + 0.5, t.text
        assert 0 <= y <= height, t.text


def test_heatmap_of_intruders(reports):
    report = reports["fail"]
    root = ET.fromstring(heatmap.render_heatmap_svg(report))
    assert root.find(f"{SVG}title").text == "Intruder dimensions per layer and module"
    assert str(report.summary.intruder_dimensions) in root.find(f"{SVG}desc").text
    grid = cells(root)
    assert len(grid) == len(report.matrices)
    by_name = {m.name: m for m in report.matrices}
    values = {r.find(f"{SVG}title").text.split(":")[0]: r for r in grid}
    assert set(values) == set(by_name)
    labels = [t for t in root.iter(f"{SVG}text") if t.get("transform", "").startswith("rotate")]
    assert [t.text for t in labels] == LLAMA_COLUMNS
    # cells are drawn row by row (layer 0 then 1), columns in q, k, v, o, gate, up, down order
    expected = [str(by_name[f"model.layers.{layer}.{col}.weight"].intruders)
                for layer in (0, 1) for col in LLAMA_COLUMNS]
    cell_values = [t.text for g in root.iter(f"{SVG}g") if g.get("dominant-baseline") == "central"
                   and g.get("text-anchor") == "middle" for t in g.iter(f"{SVG}text")]
    assert cell_values == expected
    # more intruders, a darker (later) palette colour; zero has its own neutral fill
    fills = {by_name[name].intruders: r.get("fill") for name, r in values.items()}
    assert fills.get(0, heatmap.ZERO_FILL) == heatmap.ZERO_FILL and len(set(fills.values())) == len(fills)
    legend = [t.text for t in root.iter(f"{SVG}text")][-11:]
    assert legend == [str(i) for i in range(11)]  # one swatch per possible count, 0..k
    assert_inside(root)


def test_control_characters_in_names_leave_the_svgs_readable(reports):
    report = copy.deepcopy(reports["fail"])
    report.model = dataclasses.replace(report.model, id="org/model\x01\x1b[31m")
    report.matrices[0].name = "model.layers.0.self_attn.q_proj\x00\x07.weight"
    for svg in (heatmap.render_heatmap_svg(report), badge.render_badge_svg(report)):
        ET.fromstring(svg)  # XML 1.0 forbids these characters: one would make the document unreadable
        assert "\x00" not in svg and "\x01" not in svg and "\x1b" not in svg
    tooltips = [r.find(f"{SVG}title").text for r in cells(ET.fromstring(heatmap.render_heatmap_svg(report)))]
    assert "model.layers.0.self_attn.q_proj\ufffd\ufffd.weight" in {t.split(":")[0] for t in tooltips}
    assert "\x00" not in card.render_card_section(report)


@pytest.mark.parametrize("odd", ["\uffff\ufffe", "\ud800", "\u202e\u2066", "\u200b\ufeff", "\U000e0041"],
                         ids=["noncharacters", "surrogate", "bidi", "zero-width", "tag"])
def test_invisible_or_unencodable_characters_in_names_are_replaced(reports, odd):
    report = copy.deepcopy(reports["fail"])
    report.model = dataclasses.replace(report.model, id=f"org/model{odd}")
    worst = markdown.worst_matrices(report, 1)[0]
    worst.name = worst.name.replace(".weight", f"{odd}x.weight")
    svg = heatmap.render_heatmap_svg(report)
    ET.fromstring(svg.encode("utf-8"))  # XML 1.0 forbids U+FFFE, U+FFFF; UTF-8 cannot hold a lone surrogate
    shown = worst.name.replace(odd, "\ufffd" * len(odd))
    assert shown in {r.find(f"{SVG}title").text.split(":")[0] for r in cells(ET.fromstring(svg))}
    for rendered in (card.render_card_section(report), markdown.render_job_summary(report)):
        rendered.encode("utf-8")
        assert not set(odd) & set(rendered)  # a bidi override would reorder, a zero-width character hide, what follows
        assert f"`{shown}`" in rendered


def test_heatmap_of_an_indicator(reports):
    report = reports["pass"]
    root = ET.fromstring(heatmap.render_heatmap_svg(report, metric="relative_update_norm"))
    assert root.find(f"{SVG}title").text.startswith("Relative update norm")
    grid = cells(root)
    assert len(grid) == len(report.matrices)
    largest = max(m.indicators["relative_update_norm"] for m in report.matrices)
    shown = {r.find(f"{SVG}title").text.split(": ")[1].split(" ")[0] for r in grid}
    assert shown == {heatmap.format_value(m.indicators["relative_update_norm"], largest) for m in report.matrices}
    assert root.find(f".//{SVG}linearGradient[@id='ftaudit-heatmap-scale']") is not None
    # a 0.1 % update is pale on a scale that reaches the policy's high level, and printed dark on it
    assert all(r.get("fill").startswith("#ffff") for r in grid)
    cell_text = [t for g in root.iter(f"{SVG}g") if g.get("dominant-baseline") == "central"
                 and g.get("text-anchor") == "middle" for t in g.iter(f"{SVG}text")]
    assert len(cell_text) == len(grid) and {t.get("fill") for t in cell_text} == {"#1a1a1a"}
    assert_inside(root)
    with pytest.raises(ValueError, match="unknown heatmap metric 'nope'.*relative_update_norm"):
        heatmap.render_heatmap_svg(report, metric="nope")


def test_heatmap_puts_matrices_without_a_layer_in_an_other_row(reports):
    report = reports["heads"]
    root = ET.fromstring(heatmap.render_heatmap_svg(report))
    row_labels = [t.text for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end"
                  and t.get("dominant-baseline") == "central"]
    assert row_labels == ["0", "1", "other"]
    tooltips = [r.find(f"{SVG}title").text for r in cells(root)]
    assert any(t.startswith("lm_head.weight:") for t in tooltips)
    assert any(t.endswith("not analysed") for t in tooltips)  # e.g. layer 0 has no lm_head
    assert "not analysed" in [t.text for t in root.iter(f"{SVG}text")]
    assert_inside(root)


def test_heatmap_of_32_layers_stays_legible(reports):
    report = reports["deep"]
    root = ET.fromstring(heatmap.render_heatmap_svg(report))
    grid = cells(root)
    assert len(grid) == 32 * 7
    heights = {float(r.get("height")) for r in grid}
    widths = {float(r.get("width")) for r in grid}
    assert heights == {17} and len(widths) == 1
    # rotated column labels never overlap: their baselines are a cell width apart
    assert widths.pop() * math.sin(math.radians(heatmap.ROTATION)) > 11
    assert float(root.get("height")) < 800 and float(root.get("width")) < 700
    rows = [t.text for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end"
            and t.get("dominant-baseline") == "central"]
    assert rows == [str(i) for i in range(32)]
    assert_inside(root)


def test_heatmap_gives_a_layers_experts_one_cell_per_module(tmp_path):
    """Each expert's matrices of a mixture of experts, stored one by one or stacked, share a cell per layer and
    module, which shows the largest value among them: 128 experts would otherwise be hundreds of columns."""
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for layer in range(2):
        base[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(32, 32, generator=g)
        for e in range(8):
            base[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"] = torch.randn(48, 32, generator=g)
        base[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.randn(8, 32, 48, generator=g)
    tuned = low_rank_update(base, only="layers.1.")  # the 2-D matrices of layer 1 gain intruders
    tuned["model.layers.1.mlp.experts.down_proj"] = base["model.layers.1.mlp.experts.down_proj"].clone()
    tuned["model.layers.1.mlp.experts.down_proj"][5] += 3 * torch.randn(32, 1, generator=g) @ torch.ones(1, 48)
    tuned = small_update(tuned)
    report = check(Target(str(write_model(tmp_path / "tuned", tuned)), str(write_model(tmp_path / "base", base))),
                   AuditOptions(), policy_mod.load(None))
    root = ET.fromstring(heatmap.render_heatmap_svg(report))
    columns = [t.text for t in root.iter(f"{SVG}text") if t.get("transform", "").startswith("rotate")]
    assert columns == ["self_attn.q_proj", "block_sparse_moe.experts.*.w1", "mlp.experts.down_proj[*]"]
    shown = {r.find(f"{SVG}title").text.split(":")[0]: r.find(f"{SVG}title").text for r in cells(root)}
    assert len(shown) == 2 * 3
    for layer in range(2):
        for column in columns[1:]:
            experts = [m for m in report.matrices if m.layer == layer and heatmap.column_label(m.name) == column]
            worst = max(experts, key=lambda m: m.intruders)
            assert len(experts) == 8 and worst.name in shown
            assert shown[worst.name].startswith(f"{worst.name}: {worst.intruders} (")
            assert shown[worst.name].endswith("; the largest of the layer's 8 experts)")
    assert "model.layers.1.mlp.experts.down_proj[5]" in shown
    assert_inside(root)


def test_heatmap_value_format():
    assert heatmap.format_value(3.0) == "3"
    assert heatmap.format_value(1.2, 1.36) == "1.20" and heatmap.format_value(0.5, 89.5) == "0.5"
    assert heatmap.format_value(0.000998, 0.00103) == "1.0e-3" and heatmap.format_value(None) == "n/a"
    assert heatmap.nice_ticks(0, 1.0) == [0, 0.25, 0.5, 0.75, 1.0]
    assert heatmap.nice_ticks(0, 10) == [0, 2.5, 5, 7.5, 10] and heatmap.nice_ticks(0, 90) == [0, 25, 50, 75]


# --- the terminal ---------------------------------------------------------------------------------

def test_names_cannot_write_escape_sequences_or_lines_of_their_own_to_the_terminal(reports):
    hostile = "x\x1b[2J\x1b[H\x9b31m\r\n::notice title=ftaudit PASS::fine\nVerdict: PASS\u202egnp.exe\u200b"
    plain = text_renderer.render(reports["fail"])
    report = copy.deepcopy(reports["fail"])
    report.model = dataclasses.replace(report.model, id=f"org/model{hostile}")
    report.base = dataclasses.replace(report.base, declared_by=hostile)
    report.verdict.reasons[0] += hostile
    report.tensors.missing_in_base.append(f"model.layers.0.{hostile}.weight")
    markdown.worst_matrices(report, 1)[0].name += hostile
    rendered = click.unstyle(text_renderer.render(report))
    assert "Tensors not analysed" not in plain  # the missing matrix adds a blank line, a heading and its line
    assert len(rendered.splitlines()) == len(click.unstyle(plain).splitlines()) + 3
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e\u200b]", rendered)
    assert not any(line.lstrip().startswith(("::", "Verdict")) for line in rendered.splitlines())
    assert "x\\x1b[2J\\x1b[H\\x9b31m\\r\\n::notice title=ftaudit PASS::fine\\nVerdict: PASS\\u202egnp.exe\\u200b" in rendered


# --- GitHub Actions -------------------------------------------------------------------------------

def test_job_summary(reports):
    report = reports["fail"]
    text = markdown.render_job_summary(report)
    assert text.startswith("## ❌ ftaudit: FAIL — forgetting risk high")
    assert f"| **Intruder dimensions** (ε = 0.5, top 10) | **{report.summary.intruder_dimensions}** |" in text
    assert f"| Matrices analysed | {report.summary.matrices_analysed} |" in text
    for reason in report.verdict.reasons:
        assert f"- {markdown.md_escape(reason)}\n" in text
    worst = markdown.worst_matrices(report, 5)
    assert all(f"`{m.name}`" in text for m in worst)
    assert "<details>" in text and "</details>" in text
    assert_tables_well_formed(text)
    passed = markdown.render_job_summary(reports["pass"])
    assert passed.startswith("## ✅ ftaudit: PASS") and "### Why" not in passed
    assert markdown.render_job_summary(reports["warn"]).startswith("## ⚠️ ftaudit: WARN")


def test_github_annotations(reports):
    fail = markdown.github_annotations(reports["fail"])
    assert len(fail) == len(reports["fail"].verdict.reasons)
    assert all(line.startswith("::error title=ftaudit FAIL%3A ") for line in fail)
    assert all(reason in line for reason, line in zip(reports["fail"].verdict.reasons, fail, strict=True))
    s = reports["fail"].summary
    assert all(f"in {s.matrices_with_intruders} of {s.matrices_analysed} matrices," in line for line in fail)
    assert all(line.startswith("::warning ") for line in markdown.github_annotations(reports["warn"]))
    passed = markdown.github_annotations(reports["pass"])
    assert len(passed) == 1 and passed[0].startswith("::notice ") and "0 intruder dimensions" in passed[0]
    odd = dataclasses.replace(reports["fail"], verdict=dataclasses.replace(
        reports["fail"].verdict, reasons=["100% sure\nsecond line"]))
    [line] = markdown.github_annotations(odd)
    assert line.endswith("100%25 sure%0Asecond line") and "\n" not in line


def test_module_labels():
    assert markdown.module_label("encoder.layer.3.attention.self.query.weight") == "attention.self.query"
    assert markdown.module_label("model.layers.3.block_sparse_moe.input_linear.weight[2]") == "block_sparse_moe.input_linear[2]"
    assert markdown.module_label("model.layers.0.feed_forward.experts.down_proj[11]") == "feed_forward.experts.down_proj[11]"
    assert markdown.module_label("lm_head.weight") == "lm_head"


def test_what_a_models_files_say_cannot_write_lines_of_its_own_to_stderr(tmp_path):
    from tests.invoke import run

    base = llama_like(layers=1)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "model", small_update(base))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "bert\x1b[2K\r\n::notice::fine"}))
    code, _, stderr = run("check", tmp_path / "model", "--base", tmp_path / "base")
    assert code in (0, 1), stderr
    assert "a bert\\x1b[2K\\r\\n::notice::fine model" in stderr
    assert not any(line.lstrip().startswith("::") or "\r" in line for line in stderr.splitlines())


def test_heatmap_shortens_very_long_module_names_and_keeps_them_apart(reports):
    long = "encoder." + "very_long_module_path." * 18  # a name without a layer index is a column of its own
    report = copy.deepcopy(reports["heads"])
    head = next(m for m in report.matrices if m.layer is None)
    twin = copy.deepcopy(head)
    head.name, twin.name = long + "left.q_proj.weight", long + "right.q_proj.weight"
    report.matrices.append(twin)
    svg = heatmap.render_heatmap_svg(report)
    root = ET.fromstring(svg)
    assert int(root.get("width")) <= 640 and int(root.get("height")) <= 640, (root.get("width"), root.get("height"))
    labels = {t.text: t.find(f"{SVG}title").text for t in root.iter(f"{SVG}text") if t.find(f"{SVG}title") is not None}
    left, right = long + "left.q_proj", long + "right.q_proj"
    shown = {full: text for text, full in labels.items()}
    assert shown[left].startswith("…") and shown[left].endswith("left.q_proj") and len(shown[left]) < 40
    assert shown[right].startswith("…") and shown[right].endswith("right.q_proj") and shown[right] != shown[left]
    tooltips = [c.find(f"{SVG}title").text for c in cells(root)]
    assert any(t.startswith(head.name + ":") for t in tooltips) and any(t.startswith(twin.name + ":") for t in tooltips)
    assert_inside(root)
