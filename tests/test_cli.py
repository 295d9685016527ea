"""`ftaudit check` end to end on real checkpoints written in the test: exit codes, report, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ftaudit.cli import main
from tests import reference
from tests.invoke import json_report, run
from tests.models import card, llama_like, low_rank_update, small_update, write_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = llama_like()
    return {
        "base": write_model(root / "base", base),
        "full": write_model(root / "full", small_update(base), readme=card(str(root / "base"))),
        "lora": write_model(root / "lora", low_rank_update(base), readme=card(str(root / "base"))),
    }


def test_gentle_update_passes_and_writes_the_contract(pair, tmp_path):
    out = tmp_path / "report.json"
    code, stdout, _ = run("check", pair["full"], "--json", out)
    assert code == 0, stdout
    report = json.loads(out.read_text())
    assert report["schema_version"] == "1"
    assert report["tool"]["name"] == "ftaudit"
    fingerprints = report["model"].pop("fingerprint"), report["base"].pop("fingerprint")
    assert report["model"] == {"id": str(pair["full"]), "revision": None, "adapter": None}
    assert report["base"] == {"id": str(pair["base"]), "revision": None, "declared_by": "card", "quantization": None}
    assert all(re.fullmatch("[0-9a-f]{64}", f) for f in fingerprints) and len(set(fingerprints)) == 2
    assert report["settings"]["k"] == 10 and report["settings"]["epsilon"] == 0.5
    assert report["settings"]["device"] == "cpu"
    s = report["summary"]
    assert s["matrices_analysed"] == 14 and s["intruder_dimensions"] == 0
    assert list(s["intruder_curve"]) == ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert s["risk"] == "low" and report["verdict"]["status"] == "pass"
    m = report["matrices"][0]
    assert set(m) >= {"name", "shape", "max_cos", "intruders", "indicators"}
    assert len(m["max_cos"]) == 10 and 0 < m["indicators"]["relative_update_norm"] < 0.01
    assert "Verdict: PASS" in stdout


def test_low_rank_update_fails_with_intruders_matching_the_reference(pair, tmp_path):
    out = tmp_path / "report.json"
    code, stdout, _ = run("check", pair["lora"], "--json", out)
    assert code == 1, stdout
    report = json.loads(out.read_text())
    assert report["summary"]["intruder_dimensions"] > 0
    assert report["summary"]["risk"] == "high" and report["verdict"]["status"] == "fail"
    assert any("intruder_rate" in r for r in report["verdict"]["reasons"])
    from safetensors.torch import load_file
    w0 = load_file(pair["base"] / "model.safetensors")
    wt = load_file(pair["lora"] / "model.safetensors")
    for m in report["matrices"]:
        assert m["max_cos"] == pytest.approx(reference.max_cos(w0[m["name"]], wt[m["name"]]), abs=1e-6)
    assert "Worst matrices" in stdout and "Verdict: FAIL" in stdout


def test_policy_file_changes_the_verdict_and_options_override_it(pair, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("verdict:\n  fail_at: never\nk: 4\n")
    out = tmp_path / "r.json"
    code, _, _ = run("check", pair["lora"], "--policy", policy, "--json", out)
    report = json.loads(out.read_text())
    assert code == 0 and report["verdict"]["status"] == "warn" and report["settings"]["k"] == 4
    code, _, _ = run("check", pair["lora"], "--policy", policy, "--k", 2, "--epsilon", 0.3, "--json", out)
    report = json.loads(out.read_text())
    assert report["settings"]["k"] == 2 and report["settings"]["epsilon"] == 0.3
    assert all(len(m["max_cos"]) == 2 for m in report["matrices"])


def test_a_command_line_error_is_redacted_too(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_InTheEnvironmentAbcdefghijklmn")
    code, _, stderr = run("policy", "hf_InTheEnvironmentAbcdefghijklmn")
    assert code == 2 and stderr == "ftaudit: error: Got unexpected extra argument (***) (see main policy --help)\n"


def test_with_format_github_a_command_line_error_is_a_workflow_command_too(pair, monkeypatch):
    """click's own errors (a value out of range, an unknown option, an extra argument) follow --format github as
    every other error does, redacted alike; the last --format given counts, as click takes it."""
    monkeypatch.setenv("HF_TOKEN", "hf_InTheEnvironmentAbcdefghijklmn")
    code, stdout, stderr = run("check", pair["full"], "--format", "github", "--epsilon", 7)
    assert (code, stdout) == (2, "")
    assert stderr == "::error title=ftaudit::Invalid value for '--epsilon': 7.0 is not in the range 0<x<=1. " \
        "(see main check --help)\n"
    code, _, stderr = run("check", pair["full"], "hf_InTheEnvironmentAbcdefghijklmn", "--format=github")
    assert code == 2 and stderr == "::error title=ftaudit::Got unexpected extra argument (***) (see main check --help)\n"
    code, _, stderr = run("check", pair["full"], "--format", "github", "--format", "text", "--epsilon", 7)
    assert code == 2 and stderr.startswith("ftaudit: error: Invalid value for '--epsilon'")


def test_a_glob_that_matches_nothing_is_warned_about(pair, tmp_path):
    out = tmp_path / "r.json"
    code, _, stderr = run("check", pair["full"], "--exclude", "*.q_porj.*", "--exclude", "*.k_proj.*", "--json", out)
    assert code == 0 and stderr == "ftaudit: WARNING: '*.q_porj.*' matches no weight matrix of either model " \
        "(names as in the report)\n"
    assert not any(".k_proj." in m["name"] for m in json.loads(out.read_text())["matrices"])
    code, stdout, quiet_stderr = run("check", pair["full"], "--exclude", "*.q_porj.*", "--quiet")
    assert code == 0 and stdout == "" and quiet_stderr == stderr  # --quiet keeps warnings


@pytest.mark.parametrize("exclude", [["*"], ["*.self_attn.*", "*.mlp.*"]])
def test_a_selection_that_leaves_nothing_is_blamed_not_the_base(pair, exclude):
    code, _, stderr = run("check", pair["full"], *[x for glob in exclude for x in ("--exclude", glob)])
    assert code == 2 and stderr == "ftaudit: error: the selection (--include/--exclude) leaves no weight matrix to " \
        "analyse: exclude fewer, or --include other module kinds\n"


def test_a_base_with_no_matrix_in_common_is_still_doubted(pair, tmp_path):
    other = write_model(tmp_path / "other", {n.replace("_proj", "_lin"): t for n, t in llama_like().items()})
    code, _, stderr = run("check", pair["full"], "--base", other, "--exclude", "*.mlp.*")
    assert code == 2 and stderr.endswith(f"{other} share no analysable weight matrices: is it really the base?\n")


def test_with_format_github_warnings_are_workflow_commands_and_stay_redacted(pair, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_InTheEnvironmentAbcdefghijklmn")
    glob = "50%_hf_InTheEnvironmentAbcdefghijklmn"
    code, stdout, stderr = run("check", pair["full"], "--format", "github", "--exclude", glob)
    assert code == 0 and stdout.startswith("::notice ")
    assert stderr == "::warning title=ftaudit::'50%25_***' matches no weight matrix of either model " \
        "(names as in the report)\n"


def test_with_format_github_an_error_is_a_workflow_command_that_stays_redacted(pair, tmp_path, monkeypatch):
    """The run's page shows why the step failed, as it shows warnings; other formats keep the plain line."""
    monkeypatch.setenv("HF_TOKEN", "hf_InTheEnvironmentAbcdefghijklmn")
    missing = tmp_path / "100%_hf_InTheEnvironmentAbcdefghijklmn"
    code, stdout, stderr = run("check", pair["full"], "--base", missing, "--format", "github")
    assert code == 2 and stdout == ""
    assert stderr.startswith("::error title=ftaudit::") and stderr.count("\n") == 1
    assert "100%25_***" in stderr and "hf_In" not in stderr
    code, _, plain = run("check", pair["full"], "--base", missing)
    assert code == 2 and plain == "ftaudit: error: " + stderr.split("::", 2)[2].replace("%25", "%")
    code, _, merged = run("merge", tmp_path / "none.json", "--format", "github")
    assert code == 2 and merged.startswith("::error title=ftaudit::")
    report = tmp_path / "r.json"
    assert run("check", pair["full"], "--format", "github", "--json", report)[0] == 0
    code, _, card = run("card", "update", tmp_path / "README.md", "--report", tmp_path / "none.json")
    assert code == 2 and card.startswith("ftaudit: error: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [("risk: {intruder_count: {high: 1}}", "unknown risk metric"), ("verdict: {fail_at: sometimes}", "fail_at"),
     ("k: 0", "k must be"), ("[1, 2", "not valid YAML"), ("bogus: 1", "unknown key"),
     ("note: 2024-13-45", "not valid YAML (not a date: month must be in 1..12)"),
     ("epsilon: .nan", "epsilon must be"), ("risk: {intruder_rate: {medium: .nan, high: 1}}", "risk.intruder_rate"),
     ("verdict: [fail]", "verdict must be a mapping"), ("verdict: fail", "verdict must be a mapping"),
     ("verdict: []", "verdict must be a mapping"), ("verdict: false", "verdict must be a mapping"),
     ("risk: []", "risk must map metrics"), ("risk: 0", "risk must map metrics"), ("version: true", "version must be 1"),
     ("version: 1.0", "version must be 1"),
     ("epsilon: true", "epsilon must be"), ("k: 4\nnote: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
     ("risk: {intruder_rate: {medium: 0.5, high: 0.1}}", "risk.intruder_rate: medium (0.5) must not exceed high (0.1)")],
)
def test_bad_policies_are_one_line_errors(pair, tmp_path, text, message):
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, stderr = run("check", pair["full"], "--policy", policy)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert "internal error" not in stderr


def test_sharded_bf16_model_gives_the_same_audit_as_float32(tmp_path):
    base = llama_like(seed=4)
    tuned = low_rank_update(base, seed=5)
    write_model(tmp_path / "base", {k: v.to(torch.bfloat16) for k, v in base.items()}, shards=3)
    write_model(tmp_path / "tuned", {k: v.to(torch.bfloat16) for k, v in tuned.items()}, shards=2)
    out = tmp_path / "r.json"
    code, _, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--json", out)
    assert code == 1, stderr
    report = json.loads(out.read_text())
    assert report["base"]["declared_by"] == "cli" and report["summary"]["matrices_analysed"] == 14


@pytest.mark.parametrize("side, bad", [("tuned", float("nan")), ("base", float("-inf"))])
def test_nonfinite_weights_fail_with_the_tensor_named(tmp_path, side, bad):
    base = llama_like()
    tuned = small_update(base)
    (tuned if side == "tuned" else base)["model.layers.1.mlp.up_proj.weight"][3, 4] = bad
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    out = tmp_path / "r.json"
    code, stdout, _ = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--json", out)
    report = json.loads(out.read_text())
    assert code == 1 and report["tensors"]["nonfinite"] == ["model.layers.1.mlp.up_proj.weight"]
    assert any("model.layers.1.mlp.up_proj.weight" in r for r in report["verdict"]["reasons"])
    assert report["summary"]["matrices_analysed"] == 13


def test_a_nonfinite_embedding_measured_for_its_row_norms_fails_with_its_name(tmp_path):
    """It had been left out of the report, as if unchanged: no row-norm figures, not listed, and a pass."""
    base = llama_like()
    tuned = small_update(base)
    tuned["model.embed_tokens.weight"][5, 2] = float("nan")
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    report = json_report("check", tmp_path / "tuned", "--base", tmp_path / "base", "--format", "json")
    assert report["tensors"]["nonfinite"] == ["model.embed_tokens.weight"] and report["verdict"]["status"] == "fail"
    assert report["summary"]["heads"]["model.embed_tokens.weight"] == dict.fromkeys(
        ["mean_norm_ratio", "median_relative_change", "max_relative_change", "zero_base_rows"])
    assert report["summary"]["matrices_analysed"] == 14 and report["tensors"]["not_selected"] == 2


def test_a_model_whose_only_change_is_a_nonfinite_head_is_not_taken_for_its_base(tmp_path):
    """Every matrix compared is unchanged, but the head, measured for its row norms, holds an inf: the model differs
    from its base, and the audit fails saying so, as when the head is analysed (`--include head`)."""
    base = llama_like()
    tuned = dict(base)
    tuned["lm_head.weight"] = base["lm_head.weight"].clone()
    tuned["lm_head.weight"][3, 1] = float("inf")
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    for args in ((), ("--include", "head")):
        code, stdout, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--no-cache", *args)
        assert code == 1 and stderr == "", args
        assert "non-finite weights (NaN or Inf) in 1 matrix, first lm_head.weight" in stdout


def test_a_fine_tune_of_the_head_alone_is_not_taken_for_its_base(tmp_path):
    """A linear probe changes the head, measured for its row norms, and no matrix: the warning says so, where it had
    asked whether the model is its base itself; a model equal to its base is still asked."""
    base = llama_like()
    tuned = dict(base)
    tuned["lm_head.weight"] = base["lm_head.weight"] * 1.5
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    code, _, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--no-cache")
    assert code == 0 and stderr == (
        f"ftaudit: WARNING: every matrix compared is identical in {tmp_path / 'tuned'} and {tmp_path / 'base'}; of the "
        "heads and embeddings measured for their row norms, lm_head.weight changed: a fine-tune of those alone "
        "(--include head or --include embedding analyses them as matrices)\n")
    code, _, stderr = run("check", tmp_path / "base", "--base", tmp_path / "base", "--no-cache")
    assert code == 0 and stderr.endswith(": is the model its base itself?\n")


def test_missing_tensors_are_reported_and_can_fail(tmp_path):
    base = llama_like()
    tuned = small_update(base)
    del tuned["model.layers.0.mlp.gate_proj.weight"]
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    out = tmp_path / "r.json"
    code, stdout, _ = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--json", out)
    report = json.loads(out.read_text())
    assert code == 0 and report["tensors"]["missing_in_model"] == ["model.layers.0.mlp.gate_proj.weight"]
    assert "missing in the model" in stdout
    policy = tmp_path / "p.yaml"
    policy.write_text("verdict: {fail_on_missing: true}\n")
    assert run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--policy", policy)[0] == 1


def write_adapter_config(folder: Path) -> Path:
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    return folder


def write_pickle_only(folder: Path) -> Path:
    folder.mkdir()
    torch.save({"w": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    return folder


def link(path: Path, to: Path) -> Path:
    path.symlink_to(to)
    return path


def report_of(model: Path, folder: Path) -> Path:
    assert run("check", model, "--json", folder / "report.json", "--quiet")[0] in (0, 1)
    return folder / "report.json"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, t: ["check", t / "nope"], "no such folder"),
        (lambda p, t: ["check", write_model(t / "m", llama_like())],
         "m: has no card (README.md) and no adapter_config.json to declare its base model"),
        (lambda p, t: ["check", write_model(t / "m", llama_like(), readme=card(["a/b", "c/d"]))], "2 base models"),
        (lambda p, t: ["check", write_model(t / "m", llama_like(), readme=card([]))],
         "m: declares no base model (card base_model or adapter_config.json); pass the base with --base"),
        (lambda p, t: ["check", write_model(t / "m", llama_like(), readme=card("a/b", base_model_relation="quantized"))],
         "quantized"),
        (lambda p, t: ["check", write_model(t / "m", llama_like(hidden=16, ffn=24)), "--base", p["base"]],
         "no matrix of the model matches the base in shape"),
        (lambda p, t: ["check", write_pickle_only(t / "m"), "--base", p["base"]], "pickle"),
        (lambda p, t: ["check", p["full"], "--revision", "main"], "local folder"),
        (lambda p, t: ["check", p["full"], "--base", write_adapter_config(write_model(t / "a", llama_like()))],
         "a PEFT adapter (adapter_config.json), not a base model: pass the model it adapts with --base"),
        (lambda p, t: ["check", write_model(t / "m", llama_like(), readme=card(str(t / "m")))],
         "declares itself as its base model (card: "),
        (lambda p, t: ["check", write_model(t / "m", llama_like(), readme=card(str(t / "." / "m" / "..") + "/m"))],
         "declares itself as its base model (card: "),
        (lambda p, t: ["check", p["full"], "--device", "tpu"], "device 'tpu'"),
        (lambda p, t: ["check", p["full"], "--json", t / "no" / "dir" / "r.json"], "cannot write (no folder"),
        (lambda p, t: ["check", p["full"], "--heatmap", t], "cannot write (a folder is there)"),
        (lambda p, t: ["check", "x" * 300], "x" * 300 + ": no such folder, and not a Hub repository id (org/name)"),
        (lambda p, t: ["check", write_model(t / "m", llama_like(), readme=card("x" * 300))],
         "the card declares base_model '" + "x" * 300 + "', which is neither a Hub repository id nor a folder here"),
        (lambda p, t: ["check", p["full"], "--json", link(t / "loop", t / "loop")],
         "loop: cannot write (Too many levels of symbolic links)"),
        (lambda p, t: ["check", p["full"], "--badge", link(t / "gone", t / "no" / "b.svg")],
         "gone: cannot write (no folder /"),
        (lambda p, t: ["card", "update", link(t / "loop", t / "loop"), "--report", report_of(p["full"], t)],
         "loop: cannot write the card (Too many levels of symbolic links)"),
        (lambda p, t: ["check", "x" * 300, "--push"], "no such folder, and not a Hub repository id (org/name)"),
        (lambda p, t: ["fix", p["lora"], "--out", t / "out", "--base", "x" * 300],
         "no such folder, and not a Hub repository id (org/name)"),
        (lambda p, t: ["check", p["full"], "--json", t / ("x" * 300)], "cannot write (File name too long)"),
        (lambda p, t: ["fix", p["lora"], "--out", t / ("x" * 300)], "cannot write there (File name too long)"),
        (lambda p, t: ["check", p["full"], "--json", t / "r.json", "--card", t / "." / "r.json"],
         "r.json: both --json and --card name this file, which would keep only one of them"),
        (lambda p, t: ["merge", t / "a.json", "--badge", t / "b.svg", "--heatmap", t / "b.svg"],
         "b.svg: both --badge and --heatmap name this file"),
        (lambda p, t: ["fix", p["lora"], "--out", t / "out", "--json", t / "f.md", "--card", t / "f.md"],
         "f.md: both --json and --card name this file"),
        (lambda p, t: ["check", t / "gone", "--device", "cuda:x"], "unknown device 'cuda:x' (use auto, cpu, cuda"),
        (lambda p, t: ["fix", "org/gone", "--out", t / "o", "--device", "mps"], "device 'mps' is not supported"),
        (lambda p, t: ["check", p["full"], "--epsilon", "nan"], "'--epsilon': nan is not a finite number"),
        (lambda p, t: ["check", p["full"], "--cache-size", "inf"], "'--cache-size': inf is not a finite number"),
        (lambda p, t: ["check", p["full"], "--k", "0"], "'--k': 0 is not in the range"),
        (lambda p, t: ["check", p["full"], "--bogus"], "No such option '--bogus'"),
        (lambda p, t: ["check"], "Missing argument 'MODEL'. (see "),
        (lambda p, t: ["chek", p["full"]], "No such command 'chek'"),
        (lambda p, t: ["policy", "extra"], "unexpected extra argument"),
    ],
)
def test_bad_inputs_are_one_line_errors_with_exit_code_2(pair, tmp_path, make, message):
    code, stdout, stderr = run(*make(pair, tmp_path))
    assert code == 2, stdout + stderr
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


@pytest.mark.parametrize(("args", "name"), [(["check", "gone", "--base", "BASE"], "gone"),
                                            (["check", "MODEL", "--base", "org/loop"], "org/loop")])
def test_a_link_to_nothing_is_refused_not_looked_up_on_the_hub(pair, tmp_path, monkeypatch, hub_env, args, name):
    """A model or base named by a link whose target is missing (or a loop of links) is meant to be here."""
    monkeypatch.chdir(tmp_path)
    Path("gone").symlink_to("absent")
    Path("org").mkdir()
    Path("org/loop").symlink_to("loop")
    code, stdout, stderr = run(*[{"MODEL": pair["full"], "BASE": pair["base"]}.get(a, a) for a in args])
    assert (code, stdout) == (2, "")
    assert stderr == f"ftaudit: error: {name}: a link to nothing (its target is missing, or links lead in a loop)\n"


@pytest.mark.parametrize("args", [["check", "", "--base", "."], ["check", ".", "--base", ""]])
def test_an_empty_model_or_base_is_refused_not_read_as_the_current_folder(pair, monkeypatch, args):
    monkeypatch.chdir(pair["base"])  # as a path, "" is this folder: a real model the audit would take
    code, stdout, stderr = run(*args)
    assert (code, stdout) == (2, "")
    assert stderr == "ftaudit: error: a model named by an empty string: pass a folder or a Hub repository id (org/name)\n"


@pytest.mark.parametrize("url", ["https://huggingface.co/org/base", "hf://org/base"])
def test_a_base_declared_as_a_url_is_an_error_that_names_the_card(pair, tmp_path, url):
    model = write_model(tmp_path / "m", small_update(llama_like()), readme=card(url))
    code, stdout, stderr = run("check", model)
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"ftaudit: error: {model}: the card declares base_model {url!r}, which is neither a Hub repository id nor a "
        "folder here: base_model must be a repo id (org/name), or pass the base with --base\n"
    )
    assert run("check", model, "--base", pair["base"])[0] in (0, 1)  # --base overrides the card's URL


def test_console_script_runs_as_a_process(pair):
    proc = subprocess.run(
        [sys.executable, "-m", "ftaudit", "check", str(pair["lora"]), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == ""


def process(*args: object, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python -m ftaudit *args` in a process of its own, its stderr captured; `kwargs` for subprocess.run."""
    return subprocess.run([sys.executable, "-m", "ftaudit", *map(str, args)], stderr=subprocess.PIPE, text=True,
                          timeout=120, **kwargs)


@pytest.mark.parametrize("args", [["check", "FULL"], ["check", "FULL", "--format", "json"], ["policy"]])
def test_a_reader_that_has_gone_leaves_the_exit_code_as_it_is(pair, args):
    """`ftaudit check ... | head -1`, the reader gone before the report is written: the pipe's exit code is still the
    verdict's (click's own handling of a broken pipe exits 1, which says the audit failed)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = process(*[pair["full"] if a == "FULL" else a for a in args], stdout=write)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("args", [["check", "FULL"], ["policy"]])
def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_code_2(pair, args):
    with open("/dev/full", "w") as full:  # every write fails: No space left on device
        proc = process(*[pair["full"] if a == "FULL" else a for a in args], stdout=full)
    assert (proc.returncode, proc.stderr) == (2, "ftaudit: error: cannot write to stdout (No space left on device)\n")


def test_a_closed_stdout_leaves_the_exit_code_as_it_is(pair, tmp_path):
    report = tmp_path / "r.json"
    proc = process("check", pair["lora"], "--json", report, preexec_fn=lambda: os.close(1))
    assert (proc.returncode, proc.stderr) == (1, "") and json.loads(report.read_text())["verdict"]["status"] == "fail"


def sparse_matrix_model(folder: Path, n: int) -> Path:
    """A model of one n × n float32 matrix of zeros, its data a hole in a sparse file: no disk used."""
    header = json.dumps({"model.layers.0.self_attn.q_proj.weight":
                         {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}).encode()
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * n * n)
    return folder


@pytest.mark.parametrize(("n", "gib"), [(100_000, 16), (20_000, 6)])
def test_running_out_of_memory_is_one_line_not_an_internal_error(tmp_path, n, gib):
    """A 40 GB matrix does not fit in 16 GiB of address space (Python's MemoryError); a 1.6 GB one fits, but not its
    float64 copy beside the mapped files within 6 GiB (torch's CPU allocator raises a RuntimeError of its own)."""
    import resource

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (gib * 1024**3, gib * 1024**3))

    tuned, base = (sparse_matrix_model(tmp_path / side, n) for side in ("tuned", "base"))
    proc = subprocess.run([sys.executable, "-m", "ftaudit", "check", str(tuned), "--base", str(base), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, preexec_fn=cap_memory)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("ftaudit: error: out of memory: ftaudit holds a few tensors at a time, each matrix in "
                           "float64, and these do not fit here: run it on a machine with more memory\n")


def test_the_process_flushes_its_output_and_keeps_the_exit_codes(pair, tmp_path):
    in_process = run("check", pair["lora"])
    proc = subprocess.run([sys.executable, "-m", "ftaudit", "check", str(pair["lora"])],
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (in_process[0], in_process[1]) and "intruder" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ftaudit", "check", str(tmp_path / "absent")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("how", ["console script", "python -m ftaudit"])
def test_ctrl_c_while_torch_is_imported_is_one_line_and_exit_code_2(pair, how):
    """Ctrl-C in the second or more that the imports (torch) take, before the command line that turns it into one
    line exists: the interrupt is raised where torch is imported, as Python raises it on SIGINT."""
    import tomllib

    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["ftaudit"].split(":")
    interrupt = ("import sys\nclass Interrupt:\n    def find_spec(self, name, *args):\n"
                 "        if name == 'torch':\n            raise KeyboardInterrupt\n"
                 "sys.meta_path.insert(0, Interrupt())\n")
    start = (f"from {module} import {function}; {function}()" if how == "console script"
             else "import runpy; runpy.run_module('ftaudit', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", interrupt + start, "check", str(pair["lora"])], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "ftaudit: error: interrupted\n")


@pytest.mark.parametrize("how", ["console script", "python -m ftaudit"])
def test_the_collector_does_not_scan_the_imports_objects(pair, how):
    """torch's and the command line's imports leave hundreds of thousands of objects that live as long as the process:
    the garbage collector makes no pass while they are imported (it made hundreds) and none over them afterwards."""
    import tomllib

    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["ftaudit"].split(":")
    count = ("import gc, os, sys\npasses = []\ngc.callbacks.append(lambda phase, info: phase == 'start' and "
             "passes.append(info['generation']))\nexit = os._exit\ndef counted(code):\n"
             "    print(len(passes), max(passes, default=0), gc.get_freeze_count(), file=sys.stderr)\n"
             "    exit(code)\nos._exit = counted\n")
    start = (f"from {module} import {function}; {function}()" if how == "console script"
             else "import runpy; runpy.run_module('ftaudit', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", count + start, "check", str(pair["lora"]), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    passes, deepest, frozen = map(int, proc.stderr.split())
    assert proc.returncode == 1 and passes < 20 and deepest < 2 and frozen > 100_000


def test_same_inputs_give_the_same_report(pair, tmp_path):
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    assert run("check", pair["lora"], "--json", first)[0] == 1
    assert run("check", pair["lora"], "--json", second)[0] == 1
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a.pop("created_at") and b.pop("created_at")
    assert a == b


def test_resized_vocabulary_is_compared_on_the_shared_rows(tmp_path):
    base = llama_like()
    tuned = small_update(base)
    tuned["model.embed_tokens.weight"] = torch.cat([tuned["model.embed_tokens.weight"], torch.randn(3, 32)])
    tuned["lm_head.weight"] = torch.cat([tuned["lm_head.weight"], torch.randn(3, 32)])
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    out = tmp_path / "r.json"
    code, stdout, _ = run("check", tmp_path / "tuned", "--base", tmp_path / "base",
                          "--include", "embedding", "--include", "head", "--json", out)
    report = json.loads(out.read_text())
    assert code == 0 and report["summary"]["matrices_analysed"] == 16
    assert {r["name"]: (r["base_rows"], r["model_rows"]) for r in report["tensors"]["vocab_resized"]} == {
        "model.embed_tokens.weight": (50, 53), "lm_head.weight": (50, 53)}
    head = next(m for m in report["matrices"] if m["name"] == "lm_head.weight")
    assert head["shape"] == [50, 32] and head["intruders"] == 0
    assert "vocabulary resized (50 -> 53 rows)" in stdout


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_base_of_another_architecture_is_warned_about(pair, tmp_path):
    for side in ("full", "base"):
        shutil.copytree(pair[side], tmp_path / side)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "full" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    code, _, stderr = run("check", tmp_path / "full", "--base", tmp_path / "base", "--quiet")
    assert code == 0 and stderr == (f"ftaudit: WARNING: {tmp_path / 'full'} is a mistral model and {tmp_path / 'base'} "
                                    "a llama one (config.json model_type): is it really its base?\n")
    (tmp_path / "full" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert run("check", tmp_path / "full", "--base", tmp_path / "base", "--quiet")[1:] == ("", "")


def test_pickle_weights_load_only_when_allowed_and_never_run_code(pair, tmp_path):
    from safetensors.torch import load_file
    tensors = load_file(pair["lora"] / "model.safetensors")
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(tensors, folder / "pytorch_model.bin")
    code, _, stderr = run("check", folder, "--base", pair["base"])
    assert code == 2 and "--allow-pickle" in stderr
    out, reference_out = tmp_path / "p.json", tmp_path / "s.json"
    assert run("check", folder, "--base", pair["base"], "--allow-pickle", "--json", out)[0] == 1
    assert run("check", pair["lora"], "--json", reference_out)[0] == 1
    assert [m["max_cos"] for m in json.loads(out.read_text())["matrices"]] == [
        m["max_cos"] for m in json.loads(reference_out.read_text())["matrices"]]

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"w": RunsCode(marker)}, hostile / "pytorch_model.bin")
    code, _, stderr = run("check", hostile, "--base", pair["base"], "--allow-pickle")
    assert code == 2 and not marker.exists()
    # one line naming what the file calls, without torch's advice to load it with weights_only=False
    assert stderr.startswith(f"ftaudit: error: {hostile}/pytorch_model.bin: refused by torch.load(weights_only=True): "
                             "Unsupported global: GLOBAL getattr was not an allowed global by default.\n")
    assert "weights_only=False" not in stderr and len(stderr.splitlines()) == 1
    (hostile / "pytorch_model.bin").write_bytes(b"\x80\x04garbage" * 8)  # protocol 4 and then nonsense
    code, _, stderr = run("check", hostile, "--base", pair["base"], "--allow-pickle")
    assert code == 2 and stderr.endswith("refused by torch.load(weights_only=True): Unsupported operand 103\n")
    assert len(stderr.splitlines()) == 1


def test_indicators_recognise_the_kind_of_update(pair, tmp_path):
    out = tmp_path / "r.json"
    run("check", pair["lora"], "--json", out)
    s = json.loads(out.read_text())["summary"]
    assert s["update"]["type"] == "low-rank" and s["update"]["rank"] == 2
    assert s["spectral_spike_max"] > 1 and s["intruder_strength_max"] > 0.5
    assert set(s["by_kind"]) == {"attention", "mlp"} and set(s["by_layer"]) == {"0", "1"}
    assert s["by_kind"]["attention"]["matrices"] == 8 and s["by_layer"]["1"]["matrices"] == 7
    run("check", pair["full"], "--json", out)
    s = json.loads(out.read_text())["summary"]
    assert s["update"]["type"] == "full" and s["intruder_strength_max"] == 0
    assert s["heads"]["lm_head.weight"]["mean_norm_ratio"] == pytest.approx(1.0, abs=1e-3)

    base = llama_like()
    tuned = dict(base)
    tuned["model.layers.0.self_attn.q_proj.weight"] = small_update(base)["model.layers.0.self_attn.q_proj.weight"]
    tuned["lm_head.weight"] = 2 * base["lm_head.weight"]
    write_model(tmp_path / "partial", tuned)
    run("check", tmp_path / "partial", "--base", pair["base"], "--json", out)
    s = json.loads(out.read_text())["summary"]
    assert s["update"]["type"] == "partial" and s["update"]["changed"] == 1
    assert s["head_scale_drift"] == pytest.approx(1.0)
    report = json.loads(out.read_text())
    assert len(report["tensors"]["unchanged"]) == 13 and report["summary"]["matrices_analysed"] == 1
    code, _, stderr = run("check", pair["base"], "--base", pair["base"], "--json", out)
    assert code == 0 and "every matrix compared is identical" in stderr
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["update"]["type"] == "untouched" and s["update"]["total"] == 14 and s["matrices_analysed"] == 0
    assert len(report["tensors"]["unchanged"]) == 14 and report["verdict"]["status"] == "pass"
    assert s["spectral_spike_max"] is None and s["effective_rank_median"] is None


def test_reports_read_back_into_the_same_report(pair, tmp_path):
    from ftaudit.errors import UsageError
    from ftaudit.report import Report
    out = tmp_path / "r.json"
    run("check", pair["lora"], "--json", out)
    report = Report.read(out)
    assert report.to_json() == out.read_text()
    (tmp_path / "bad.json").write_text('{"schema_version": "1", "tool": {}}')
    with pytest.raises(UsageError, match="bad.json: not an ftaudit report"):
        Report.read(tmp_path / "bad.json")
    for text, message in [("[1, 2]", "a JSON list, not an object"), ('{"schema_version": "9"}', "schema version '9'"),
                          ('{"schema_version": "1", "matrices": 5}', "not an ftaudit report"),
                          ('{"schema_version": "1", "kind": "fix", "after": {}}', "the record of `ftaudit fix --json`")]:
        (tmp_path / "bad.json").write_text(text)
        code, _, stderr = run("card", "update", tmp_path / "card.md", "--report", tmp_path / "bad.json")
        assert code == 2 and stderr.startswith(f"ftaudit: error: {tmp_path / 'bad.json'}: ") and message in stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc["summary"].update(intruder_dimensions="35"), 'Summary.intruder_dimensions must be int, not "35"'),
        (lambda doc: doc["matrices"][0].update(max_cos=None), "MatrixResult.max_cos must be list[float], not null"),
        (lambda doc: doc["verdict"].update(reasons="none"), 'Verdict.reasons must be list[str], not "none"'),
        (lambda doc: doc["tool"].pop("version"), "tool must be {'name': 'ftaudit', 'version': ...}"),
        (lambda doc: doc["matrices"][0]["max_cos"].insert(0, "0.9"), 'MatrixResult.max_cos must be list[float], '
         'not ["0.9", '),
        (lambda doc: doc["summary"]["intruder_curve"].update({"0.5": None}), "Summary.intruder_curve must be "
         "dict[str, int], not {"),
        (lambda doc: doc["tensors"].update(shape_mismatch=[3]), "TensorIssues.shape_mismatch must be "
         "list[dict[str, object]], not [3]"),
        (lambda doc: doc["settings"].update(exclude=[None]), "Settings.exclude must be list[str], not [null]"),
        (lambda doc: doc["verdict"].update(status="maybe"), 'Verdict.status must be one of pass, warn, fail, '
         'not "maybe"'),
        (lambda doc: doc["summary"].update(risk="extreme"), 'Summary.risk must be one of low, medium, high, '
         'not "extreme"'),
        (lambda doc: doc.update(created_at=1718000000), "created_at must be str (an ISO 8601 timestamp), "
         "not 1718000000"),
        (lambda doc: doc.update(created_at=None), "created_at must be str (an ISO 8601 timestamp), not null"),
    ],
)
def test_a_report_edited_into_wrong_types_is_not_an_ftaudit_report(pair, tmp_path, edit, message):
    out, edited = tmp_path / "r.json", tmp_path / "edited.json"
    run("check", pair["lora"], "--json", out, "--quiet")
    doc = json.loads(out.read_text())
    edit(doc)
    edited.write_text(json.dumps(doc))
    code, stdout, stderr = run("card", "update", tmp_path / "README.md", "--report", edited)
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"ftaudit: error: {edited}: not an ftaudit report (TypeError: {message}")
    assert not (tmp_path / "README.md").exists()


def test_a_report_with_nan_is_not_json_and_a_loose_update_count_is_left_out(pair, tmp_path):
    """ftaudit writes no NaN (a number the card would show), and the update's free-form object is shown only as far
    as it makes sense."""
    out, edited, card = tmp_path / "r.json", tmp_path / "edited.json", tmp_path / "README.md"
    run("check", pair["lora"], "--json", out, "--quiet")
    doc = json.loads(out.read_text())
    doc["matrices"][0]["max_cos"][0] = float("nan")
    edited.write_text(json.dumps(doc))
    assert run("card", "update", card, "--report", edited) == (2, "", f"ftaudit: error: {edited}: not valid JSON\n")
    doc = json.loads(out.read_text())
    doc["summary"]["update"]["total"] = "many"
    edited.write_text(json.dumps(doc))
    code, _, stderr = run("card", "update", card, "--report", edited)
    assert code == 0 and "low-rank (rank 2)" in card.read_text() and "of many" not in card.read_text(), stderr


def test_a_report_with_fields_added_within_the_schema_version_updates_a_card(pair, tmp_path):
    out, later, card = tmp_path / "r.json", tmp_path / "later.json", tmp_path / "README.md"
    run("check", pair["lora"], "--json", out, "--quiet")
    doc = json.loads(out.read_text())
    for part in (doc, doc["model"], doc["base"], doc["settings"], doc["summary"], doc["tensors"], doc["verdict"],
                 *doc["matrices"]):
        part["added_by_a_later_ftaudit"] = {"x": 1}  # "fields are only ever added within a version"
    later.write_text(json.dumps(doc))
    code, _, stderr = run("card", "update", card, "--report", later)
    assert code == 0, stderr
    expected = tmp_path / "EXPECTED.md"
    assert run("card", "update", expected, "--report", out)[0] == 0
    assert card.read_text() == expected.read_text()


@pytest.mark.parametrize("lead", ["\ufeff", "\n"])
def test_the_base_is_read_from_a_card_with_a_bom_or_a_blank_first_line(pair, tmp_path, lead):
    tuned = tmp_path / "tuned"
    shutil.copytree(pair["full"], tuned)
    (tuned / "README.md").write_bytes((lead + card(str(pair["base"]))).replace("\n", "\r\n").encode())
    out = tmp_path / "r.json"
    code, _, stderr = run("check", tuned, "--json", out, "--quiet")
    assert code == 0, stderr
    base = json.loads(out.read_text())["base"]
    assert base == {"id": str(pair["base"]), "revision": None, "declared_by": "card", "fingerprint": base["fingerprint"],
                    "quantization": None}


def test_card_badge_heatmap_and_formats(pair, tmp_path):
    import xml.etree.ElementTree as ET
    paths = {opt: tmp_path / name for opt, name in
             [("--card", "card.md"), ("--badge", "badge.svg"), ("--heatmap", "heat.svg"), ("--badge-json", "b.json"),
              ("--json", "r.json")]}
    code, stdout, _ = run("check", pair["lora"], *[x for kv in paths.items() for x in map(str, kv)], "--format", "json")
    report = json.loads(paths["--json"].read_text())
    assert code == 1 and json.loads(stdout) == report
    n = str(report["summary"]["intruder_dimensions"])
    assert "fail" in paths["--card"].read_text().lower() and n in paths["--card"].read_text()
    for svg in (paths["--badge"], paths["--heatmap"]):
        assert ET.fromstring(svg.read_text()).tag.endswith("svg")
    endpoint = json.loads(paths["--badge-json"].read_text())
    assert endpoint["schemaVersion"] == 1 and "fail" in endpoint["message"] and n in endpoint["message"]
    assert n in run("check", pair["lora"], "--format", "markdown")[1]
    assert run("check", pair["lora"], "--format", "github")[1].startswith("::error")

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n# Model\n")
    for _ in range(2):
        result = CliRunner().invoke(main, ["card", "update", str(card), "--report", str(paths["--json"])])
        assert result.exit_code == 0, result.stderr
    text = card.read_text()
    assert text.startswith("---\nlicense: mit\nftaudit:\n") and text.count("<!-- ftaudit:begin -->") == 1
    assert "# Model\n" in text
    bad = CliRunner().invoke(main, ["card", "update", str(card), "--report", str(tmp_path / "missing.json")])
    assert bad.exit_code == 2 and "cannot read the report" in bad.stderr


DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "x: " + "[" * 100_000 + "]" * 100_000 + "\n"
"""Nested deeper than Python's parsers recurse: malformed input (from a Hub repo, say), not an internal error."""


def sharded_only(folder: Path) -> Path:
    """`folder` without its model.safetensors, which transformers (and ftaudit) would load before a shard index."""
    (folder / "model.safetensors").unlink()
    return folder


def copy_with(folder: Path, to: Path, name: str, text: str) -> Path:
    shutil.copytree(folder, to)
    (to / name).write_text(text)
    return to


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, t: ["check", copy_with(p["full"], t / "m", "adapter_config.json", DEEP_JSON), "--base", p["base"]],
         "m/adapter_config.json: not valid JSON"),
        (lambda p, t: ["check", sharded_only(copy_with(p["full"], t / "m", "model.safetensors.index.json", DEEP_JSON))],
         "m/model.safetensors.index.json: not valid JSON"),
        (lambda p, t: ["check", copy_with(p["full"], t / "m", "README.md", f"---\n{DEEP_YAML}---\n")],
         "m: the card's front matter is not valid YAML (nested too deeply)"),
        (lambda p, t: ["check", p["full"], "--policy", copy_with(p["base"], t / "p", "p.yaml", DEEP_YAML) / "p.yaml"],
         "p.yaml: not valid YAML (nested too deeply)"),
        (lambda p, t: ["card", "update", t / "README.md", "--report", copy_with(p["base"], t / "r", "r.json", DEEP_JSON)
                       / "r.json"], "r.json: not valid JSON"),
        (lambda p, t: ["merge", copy_with(p["base"], t / "r", "r.json", DEEP_JSON) / "r.json"], "r.json: not valid JSON"),
    ],
)
def test_files_nested_too_deeply_are_one_line_errors(pair, tmp_path, make, message):
    code, stdout, stderr = run(*make(pair, tmp_path))
    assert (code, stdout) == (2, "")
    assert message in stderr and len(stderr.splitlines()) == 1 and "internal error" not in stderr


def test_a_card_with_front_matter_nested_too_deeply_is_left_as_it_is(pair, tmp_path):
    report, card = tmp_path / "r.json", tmp_path / "README.md"
    assert run("check", pair["full"], "--json", report, "--quiet")[0] == 0
    card.write_text(f"---\n{DEEP_YAML}---\n# Model\n")
    code, _, stderr = run("card", "update", card, "--report", report)
    assert code == 2 and stderr == ("ftaudit: error: the card's front matter is not valid YAML (nested too deeply): "
                                    "fix it first\n")
    assert card.read_text() == f"---\n{DEEP_YAML}---\n# Model\n"


def test_a_config_json_nested_too_deeply_is_ignored_as_an_invalid_one(pair, tmp_path):
    model = copy_with(pair["full"], tmp_path / "m", "config.json", DEEP_JSON)
    code, _, stderr = run("check", model, "--base", pair["base"], "--quiet")
    assert (code, stderr) == (0, "")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (lambda m, b, t: ["check", m, "--card", m / "README.md"], ("README.md", "--card", "MODEL")),
        (lambda m, b, t: ["check", m, "--base", b, "--json", b / "config.json"], ("config.json", "--json", "--base")),
        (lambda m, b, t: ["check", m, "--heatmap", m / "model-00001-of-00002.safetensors"],  # not there yet
         ("model-00001-of-00002.safetensors", "--heatmap", "MODEL")),
        (lambda m, b, t: ["check", m, "--badge", link(t / "b.svg", m / "model.safetensors")],
         ("model.safetensors", "--badge", "MODEL")),
        (lambda m, b, t: ["fix", m, "--base", b, "--out", t / "out", "--json", b / "model.safetensors"],
         ("model.safetensors", "--json", "--base")),
    ],
)
def test_an_output_naming_a_file_the_audit_reads_is_refused(pair, tmp_path, args, named):
    """`ftaudit check . --card README.md` in the model's folder would replace its card after the audit."""
    model, base = shutil.copytree(pair["full"], tmp_path / "m"), shutil.copytree(pair["base"], tmp_path / "b")
    (model / "README.md").write_text(card(str(base)))
    before = {p: p.read_bytes() for p in [*model.iterdir(), *base.iterdir()]}
    code, stdout, stderr = run(*args(model, base, tmp_path))
    name, option, folder = named
    assert (code, stdout) == (2, "")
    assert stderr.startswith("ftaudit: error: ") and stderr.endswith(
        f": {option} names {name} of the folder given as {folder}, which the audit reads and the output would "
        f"replace; choose another file for {option}\n")
    assert {p: p.read_bytes() for p in [*model.iterdir(), *base.iterdir()]} == before  # nothing written
    assert not (tmp_path / "out").exists()


def test_an_output_beside_the_models_files_is_written(pair, tmp_path):
    model = shutil.copytree(pair["full"], tmp_path / "m")
    (model / "ftaudit-badge.svg").write_text("an earlier badge")
    code, _, stderr = run("check", model, "--badge", model / "ftaudit-badge.svg", "--json", model / "report.json")
    assert (code, stderr) == (0, "")
    assert (model / "ftaudit-badge.svg").read_text().startswith("<svg") and (model / "report.json").is_file()


def test_an_output_that_is_a_pipe_is_written_into(pair):
    """`--json /dev/stdout` or bash's `--json >(jq .)` name a pipe by a link in /dev/fd: the report goes into it."""
    read, write = os.pipe()
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.extend(iter(lambda: os.read(read, 1 << 16), b"")))
    reader.start()
    try:
        code, stdout, stderr = run("check", pair["full"], "--json", f"/dev/fd/{write}", "--format", "json")
    finally:
        os.close(write)
        reader.join()
        os.close(read)
    assert (code, stderr) == (0, "")
    assert json.loads(b"".join(received)) == json.loads(stdout)


def test_an_output_that_is_a_fifo_stays_one(pair, tmp_path):
    fifo = tmp_path / "badge.svg"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waiting, so that writing it does not block
    try:
        code, _, stderr = run("check", pair["full"], "--badge", fifo)
        assert (code, stderr) == (0, "")
        assert stat.S_ISFIFO(fifo.stat().st_mode)  # not replaced by a file that nobody reads
        assert os.read(reader, 1 << 16).startswith(b"<svg")
    finally:
        os.close(reader)


def test_half_pushed_sharded_checkpoint_is_refused(tmp_path):
    base = llama_like()
    write_model(tmp_path / "base", base)
    tuned = write_model(tmp_path / "tuned", small_update(base), shards=3)
    (tuned / "model-00002-of-00003.safetensors").unlink()
    code, _, stderr = run("check", tuned, "--base", tmp_path / "base")
    assert code == 2 and "names shard model-00002-of-00003.safetensors, which is not in the snapshot" in stderr


def test_a_single_file_is_audited_before_a_shard_index_beside_it_as_transformers_loads_it(tmp_path):
    """A model saved whole over its earlier shards keeps the shards' index (save_pretrained leaves it), maybe the
    shards too: transformers loads model.safetensors."""
    base = llama_like()
    write_model(tmp_path / "base", base)
    earlier = write_model(tmp_path / "earlier", small_update(base, scale=0.5), shards=3)
    tuned = write_model(tmp_path / "tuned", small_update(base))
    expected = json_report("check", tuned, "--base", tmp_path / "base", "--format", "json")
    shutil.copy(earlier / "model.safetensors.index.json", tuned)
    stale = json_report("check", tuned, "--base", tmp_path / "base", "--format", "json")  # the shards gone
    for shard in earlier.glob("model-*.safetensors"):
        shutil.copy(shard, tuned)
    beside = json_report("check", tuned, "--base", tmp_path / "base", "--format", "json")  # other values in them
    for report in (expected, stale, beside):
        report.pop("created_at")
    assert stale == beside == expected


def test_weights_in_subfolders_are_said_to_be_left_unaudited(pair, tmp_path):
    """A sentence-transformers model's Dense layer (`2_Dense/`) is part of the model that the audit does not read;
    a Trainer's checkpoint folder is an earlier state of the run, not said."""
    model = shutil.copytree(pair["full"], tmp_path / "m")
    for folder in ("2_Dense", "checkpoint-500"):
        (model / folder).mkdir()
        save_file({"linear.weight": torch.ones(4, 4)}, model / folder / "model.safetensors")
    (model / "checkpoint-500" / "trainer_state.json").write_text("{}")
    code, _, stderr = run("check", model, "--quiet")
    assert code == 0 and stderr == (f"ftaudit: WARNING: {model}: weights in subfolders are not audited (the audit reads "
                                    "the top-level weights only): 2_Dense/model.safetensors\n")
    assert run("check", pair["full"], "--quiet")[2] == ""


def test_a_failure_with_a_message_of_several_lines_is_still_one_line(pair, monkeypatch):
    import ftaudit.cli as cli

    def refused(*args, **kwargs):
        raise ValueError("Invalid metadata in README.md.\n- \"license\" must be one of [...]\n")

    monkeypatch.setattr(cli, "check", refused)
    code, stdout, stderr = run("check", pair["lora"], "--base", pair["base"])
    assert (code, stdout) == (2, "")
    assert stderr == ('ftaudit: error: internal error (ValueError: Invalid metadata in README.md. - "license" must be '
                      "one of [...]); rerun with --debug and report it\n")
