"""Progress where stderr is not a terminal (a CI log): a line every LINE_EVERY seconds, none for short work."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from ftaudit import progress
from ftaudit.cli import main
from tests.models import llama_like, low_rank_update, write_model


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def test_a_line_every_interval_with_the_time_left(clock, caplog):
    update, close = progress.progress_display("Auditing")
    caplog.set_level("INFO", logger="ftaudit")
    for done, at in [(1, 10), (2, 29), (3, 31), (4, 40), (5, 62), (6, 200), (10, 400)]:
        clock.now = 1000.0 + at
        update(done, 10, f"m{done}")
    close()
    assert [r.getMessage() for r in caplog.records] == [
        "Auditing: 3 of 10 matrices after 31s, about 1m12s left",
        "Auditing: 5 of 10 matrices after 1m02s, about 1m02s left",
        "Auditing: 6 of 10 matrices after 3m20s, about 2m13s left",
    ]


def test_durations_read_as_people_read_them():
    assert [progress.duration(s) for s in (0, 44.6, 60, 185, 3599.4, 3720, 90000)] == [
        "0s", "45s", "1m00s", "3m05s", "59m59s", "1h02m", "25h00m"]


@pytest.mark.parametrize("quiet", [False, True])
def test_an_audit_logs_its_progress_unless_quiet(tmp_path, monkeypatch, quiet):
    base = llama_like(layers=2)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", low_rank_update(base))
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    report = tmp_path / "r.json"
    args = ["check", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"), "--json", str(report)]
    result = CliRunner().invoke(main, args + ["--quiet"] * quiet)
    assert result.exit_code == 1
    summary = json.loads(report.read_text())["summary"]
    total = summary["matrices_analysed"] + len(summary["heads"])  # heads: their row norms only
    counts = [line.split(": ")[3].split(" matrices")[0] for line in result.stderr.splitlines()
              if line.startswith("ftaudit: INFO: Auditing: ")]
    assert counts == ([] if quiet else [f"{done} of {total}" for done in range(1, total)])  # none after the last


def test_each_phase_of_a_fix_is_counted_in_its_own_unit(tmp_path, monkeypatch):
    base = llama_like(layers=1)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", low_rank_update(base))
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    result = CliRunner().invoke(main, ["fix", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code in (0, 1), result.stderr
    phases = {line.split(": ")[2] + " " + line.split(" of ")[1].split(" after")[0].split(" ", 1)[1]
              for line in result.stderr.splitlines() if line.startswith("ftaudit: INFO: ") and " of " in line}
    assert phases == {"Auditing input matrices", "Writing tensors", "Auditing output matrices"}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_sees_a_bar_naming_the_tensor_with_token_shaped_text_masked(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"
    update, close = progress.progress_display("Auditing")
    update(1, 4, "model.layers.0.mlp.experts.gate_up_proj[11]")
    update(2, 4, f"{token}.weight")
    close()
    shown = terminal.getvalue()
    assert "Auditing" in shown and "1/4" in shown and "2/4" in shown
    assert "...mlp.experts.gate_up_proj[11]" in shown  # the name's end, to fit the line
    assert all(len(line) <= 80 for line in shown.replace("\x1b[?25l", "").replace("\x1b[?25h", "").split("\r"))
    assert "***.weight" in shown and token not in shown and "hf_" not in shown
