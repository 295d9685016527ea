"""The GitHub Action and the example workflows: their shell steps run here as the runner would run them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.hubserver import HubServer
from tests.models import card, folder_files, llama_like, low_rank_update, write_model

ROOT = Path(__file__).resolve().parent.parent
ACTION_DIR = ROOT / ".github" / "actions" / "ftaudit"
WORKFLOWS = ROOT / ".github" / "workflows"
EXAMPLES = ("audit-on-push.yml", "audit-on-dispatch.yml", "audit-manual.yml")
TOKEN = "hf_AcTiOnToKeN1234567890abcdef"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


ACTION = load(ACTION_DIR / "action.yml")


def step(steps: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The step with this id or name."""
    return next(s for s in steps if key in (s.get("id"), s.get("name")))


def evaluate(value: str, context: dict[str, str]) -> str:
    """`${{ expr }}` replaced as the runner would, for the plain context lookups the action uses."""
    return EXPRESSION.sub(lambda m: context[m[1]], value)


def action_context(inputs: dict[str, str], runner_temp: Path, outputs: dict[str, str] | None = None) -> dict[str, str]:
    context = {f"inputs.{name}": str(spec.get("default", "")) for name, spec in ACTION["inputs"].items()}
    context |= {f"inputs.{name}": value for name, value in inputs.items()}
    context |= {"github.action_path": str(ACTION_DIR), "runner.temp": str(runner_temp), "runner.os": "Linux"}
    context |= {f"steps.audit.outputs.{name}": value for name, value in (outputs or {}).items()}
    return context


def run_step(spec: dict[str, Any], context: dict[str, str], tmp: Path, extra_env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    """Run a `run:` step with `shell: bash` the way the runner does: a script file, `bash -eo pipefail`."""
    assert spec.get("shell", "bash") == "bash" and "${{" not in spec["run"]  # inputs only through env: no injection
    script = tmp / f"step-{time.monotonic_ns()}.sh"
    script.write_text(spec["run"])
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp)),
        "RUNNER_TEMP": context["runner.temp"],
        "GITHUB_OUTPUT": str(tmp / "github_output"),
        "GITHUB_STEP_SUMMARY": str(tmp / "step_summary"),
        "FTAUDIT_CACHE": os.environ["FTAUDIT_CACHE"],
        **{name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ},  # the checkout under test
        **{name: evaluate(str(value), context) for name, value in (spec.get("env") or {}).items()},
        **(extra_env or {}),
    }
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def parse_outputs(path: Path) -> dict[str, str]:
    """A $GITHUB_OUTPUT file: `name=value` lines and `name<<DELIMITER` blocks."""
    outputs, lines = {}, iter(path.read_text().splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            outputs[name] = "\n".join(iter(lambda: next(lines), delimiter))
        else:
            name, value = line.split("=", 1)
            outputs[name] = value
    return outputs


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """A local base folder and a tuned folder with strong low-rank updates (a failing audit)."""
    base = llama_like()
    return write_model(tmp_path / "base", base), write_model(tmp_path / "tuned", low_rank_update(base), readme=card())


def test_audit_step_writes_outputs_summary_and_report_then_fail_on_decides(models, tmp_path):
    base, tuned = models
    work = tmp_path / "work"
    work.mkdir()
    inputs = {"model": str(tuned), "base": str(base), "hf-token": TOKEN}
    audit = run_step(step(ACTION["runs"]["steps"], "audit"), action_context(inputs, tmp_path), work)
    assert audit.returncode == 0, audit.stderr  # a fail verdict is left to the fail-on step

    outputs = parse_outputs(work / "github_output")
    report_path = tmp_path / "ftaudit-report.json"
    report = json.loads(report_path.read_text())
    assert outputs == {
        "status": "fail",
        "risk": report["summary"]["risk"],
        "intruders": str(report["summary"]["intruder_dimensions"]),
        "report": str(report_path),
    }
    assert report["verdict"]["status"] == "fail" and report["settings"]["device"] == "cpu"
    assert int(outputs["intruders"]) > 0 and report["base"]["declared_by"] == "cli"
    summary = (work / "step_summary").read_text()
    assert "ftaudit: FAIL" in summary and f"**{outputs['intruders']}**" in summary and str(tuned) in summary
    assert any(line.startswith("::error") for line in audit.stdout.splitlines())  # annotations
    logged = audit.stdout + audit.stderr
    assert [line for line in logged.splitlines() if TOKEN in line] == [f"::add-mask::{TOKEN}"]

    fail_on = step(ACTION["runs"]["steps"], "Apply fail-on")
    for choice, code in (("fail", 1), ("warn", 1), ("never", 0)):
        result = run_step(fail_on, action_context({"fail-on": choice}, tmp_path, outputs), work)
        assert result.returncode == code, result.stdout
    assert "::error::ftaudit verdict: fail (fail-on: fail)" in run_step(
        fail_on, action_context({}, tmp_path, outputs), work
    ).stdout


def test_a_token_on_several_lines_is_masked_line_by_line(models, tmp_path):
    """The Hub client drops a token's line breaks and sends the rest (a token pasted wrapped still works): each line
    is part of the token, and a mask of the whole would leave the lines after the first in the log."""
    base, tuned = models
    first, second = TOKEN[:14], TOKEN[14:]
    inputs = {"model": str(tuned), "base": str(base), "hf-token": f"{first}\r\n{second}\n"}
    audit = run_step(step(ACTION["runs"]["steps"], "audit"), action_context(inputs, tmp_path), tmp_path)
    assert audit.returncode == 0, audit.stderr
    logged = (audit.stdout + audit.stderr).splitlines()
    masks = {line.removeprefix("::add-mask::") for line in logged if line.startswith("::add-mask::")}
    assert {TOKEN, first, second} <= masks
    assert all(line.startswith("::add-mask::") for line in logged if first in line or second in line)


def test_could_not_audit_fails_the_audit_step(hub, models, tmp_path):
    _, tuned = models
    context = action_context({"model": str(tuned), "base": "org/missing-base"}, tmp_path)
    result = run_step(step(ACTION["runs"]["steps"], "audit"), context, tmp_path, {"HF_ENDPOINT": hub.url})
    assert result.returncode == 2 and "org/missing-base" in result.stderr
    assert not (tmp_path / "github_output").exists()
    context = action_context({"model": str(tuned), "fail-on": "often"}, tmp_path)
    bad = run_step(step(ACTION["runs"]["steps"], "audit"), context, tmp_path)
    assert bad.returncode == 2 and "fail-on must be fail, warn or never" in bad.stdout


def test_shard_jobs_then_a_merge_job_give_the_whole_audit(models, tmp_path):
    """A job matrix audits the shards (each uploads its report); a last job downloads them and merges them."""
    base, tuned = models
    audit_step = step(ACTION["runs"]["steps"], "audit")
    whole = run_step(audit_step, action_context({"model": str(tuned), "base": str(base)}, tmp_path), tmp_path)
    assert whole.returncode == 0, whole.stderr
    expected = json.loads((tmp_path / "ftaudit-report.json").read_text())
    downloaded = tmp_path / "shards"
    for index in (1, 2, 3):
        work = tmp_path / f"job-{index}"
        work.mkdir()
        inputs = {"model": str(tuned), "base": str(base), "shard": f"{index}/3"}
        result = run_step(audit_step, action_context(inputs, work), work)
        assert result.returncode == 0, result.stderr
        assert "Shard" in (work / "step_summary").read_text()
        (downloaded / f"ftaudit-shard-{index}").mkdir(parents=True)
        (work / "ftaudit-report.json").rename(downloaded / f"ftaudit-shard-{index}" / "ftaudit-report.json")
    merge_job = tmp_path / "merge-job"
    merge_job.mkdir()
    context = action_context({"merge": f"{downloaded}/*/ftaudit-report.json"}, merge_job)
    merged = run_step(audit_step, context, merge_job)
    assert merged.returncode == 0, merged.stderr
    report = json.loads((merge_job / "ftaudit-report.json").read_text())
    assert {k: v for k, v in report.items() if k != "created_at"} == {
        k: v for k, v in expected.items() if k != "created_at"}
    assert parse_outputs(merge_job / "github_output")["status"] == "fail"
    assert "ftaudit: FAIL" in (merge_job / "step_summary").read_text()

    # A YAML block (`merge: |`) lists the reports one a line, as it would list globs.
    listed = merge_job / "listed"
    listed.mkdir()
    block = "".join(f"{downloaded}/ftaudit-shard-{index}/ftaudit-report.json\n" for index in (1, 2, 3))
    merged = run_step(audit_step, action_context({"merge": block}, listed), listed)
    assert merged.returncode == 0, merged.stderr
    report = json.loads((listed / "ftaudit-report.json").read_text())
    assert report["summary"] == expected["summary"] and report["verdict"] == expected["verdict"]

    cases = {
        "nothing": ({"merge": f"{downloaded}/none-*.json"}, "merge: no report matches"),
        "nothing listed": ({"merge": f"{downloaded}/none-1-*.json\n{downloaded}/none-2-*.json\n"},
                           f"::error::merge: no report matches '{downloaded}/none-1-*.json "
                           f"{downloaded}/none-2-*.json'\n"),  # one line: a workflow command spans one
        "both": ({"merge": f"{downloaded}/*/ftaudit-report.json", "shard": "1/3"}, "give shard or merge, not both"),
        "no model": ({}, "model is required, unless merge is given"),
    }
    for inputs, message in cases.values():
        bad = run_step(audit_step, action_context(inputs, merge_job), merge_job)
        assert bad.returncode == 2 and message in bad.stdout


@pytest.mark.parametrize("name", ["-tuned", "--help"])
def test_a_model_folder_named_like_an_option_is_audited(tmp_path, name):
    base = llama_like()
    write_model(tmp_path / "base", base)
    write_model(tmp_path / name, low_rank_update(base), readme=card())
    inputs = {"model": name, "base": "base"}  # folders of the workspace, as a workflow gives them
    result = run_step(step(ACTION["runs"]["steps"], "audit"), action_context(inputs, tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ftaudit-report.json").read_text())["model"]["id"] == name


def test_weights_checked_out_without_lfs_say_so(models, tmp_path):
    base, tuned = models
    weights = tuned / "model.safetensors"
    data = weights.read_bytes()
    # What actions/checkout leaves without `lfs: true`: the pointer git stores, not the file.
    weights.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
                       f"size {len(data)}\n")
    context = action_context({"model": str(tuned), "base": str(base)}, tmp_path)
    result = run_step(step(ACTION["runs"]["steps"], "audit"), context, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"::error title=ftaudit::{weights}: a Git LFS pointer, not the file: fetch the LFS files "
        "(git lfs pull; in GitHub Actions, actions/checkout with lfs: true)"
    )


def test_the_cache_is_kept_between_runs_under_a_key_named_by_its_entries(models, tmp_path):
    base, tuned = models
    audit, name = step(ACTION["runs"]["steps"], "audit"), step(ACTION["runs"]["steps"], "spectra")
    prefix = step(ACTION["runs"]["steps"], "spectra-prefix")

    def run_on_runner(runner: str, inputs: dict[str, str], restored: Path | None = None) -> tuple[Path, str | None]:
        """The audit and the key step on a fresh runner, after restoring `restored` as actions/cache would."""
        temp, work = tmp_path / runner, tmp_path / runner / "work"
        work.mkdir(parents=True)
        spectra = temp / "ftaudit-spectra"
        if restored is not None:
            shutil.copytree(restored, spectra)
            for entry in spectra.rglob("*.safetensors"):
                os.utime(entry, (1, 1))
        context = action_context({"model": str(tuned), "base": str(base), **inputs}, temp)
        assert run_step(prefix, context, work).returncode == 0
        context["steps.spectra-prefix.outputs.prefix"] = parse_outputs(work / "github_output")["prefix"]
        assert run_step(audit, context, work).returncode == 0
        assert run_step(name, context, work).returncode == 0
        return spectra, parse_outputs(work / "github_output").get("key")

    cold, key = run_on_runner("first", {})
    entries = sorted(p.relative_to(cold) for p in cold.rglob("*.safetensors"))
    assert len(entries) == 14 and key is not None and re.fullmatch(r"ftaudit-spectra-Linux-[0-9a-f]{16}", key)
    warm, warm_key = run_on_runner("second", {}, restored=cold)
    assert warm_key == key  # nothing new: the save step is skipped, the restored key being this one
    assert sorted(p.relative_to(warm) for p in warm.rglob("*.safetensors")) == entries
    assert all(p.stat().st_mtime > 1 for p in warm.rglob("*.safetensors"))  # every entry was read

    other = write_model(tmp_path / "other-base", llama_like(seed=7))
    grown, grown_key = run_on_runner("third", {"base": str(other)}, restored=cold)
    assert len(list(grown.rglob("*.safetensors"))) == 28 and grown_key not in (None, key)

    unused, no_key = run_on_runner("fourth", {"cache": "false"})
    assert not unused.exists() and no_key is None


class Caches:
    """GitHub's caches of a repository, as actions/cache/restore and save use them: a key is saved once; a restore
    takes the key, else the newest cache whose key starts with the first of the restore-keys that one does."""

    def __init__(self, root: Path) -> None:
        self.root, self.saved = root, []  # keys, oldest first

    def restore(self, spec: dict[str, Any], context: dict[str, str]) -> str:
        key, prefixes = (evaluate(spec["with"][name], context) for name in ("key", "restore-keys"))
        for prefix in [key, *prefixes.splitlines()]:
            found = [k for k in self.saved if k == key or (prefix != key and k.startswith(prefix))]
            if found:
                shutil.copytree(self.root / found[-1], evaluate(spec["with"]["path"], context))
                return found[-1]
        return ""

    def save(self, spec: dict[str, Any], context: dict[str, str]) -> None:
        key = evaluate(spec["with"]["key"], context)
        if key not in self.saved:
            shutil.copytree(evaluate(spec["with"]["path"], context), self.root / key)
            self.saved.append(key)


def test_each_shard_job_restores_the_cache_of_its_own_part(models, tmp_path):
    """Shard jobs save the spectra of their parts of the base; the next run's job of a shard finds its own part, not
    that of the shard saved last."""
    base, tuned = models
    steps = ACTION["runs"]["steps"]
    restore_at = next(i for i, s in enumerate(steps) if s.get("id") == "restore-spectra")
    caches = Caches(tmp_path / "caches")

    def shard_job(run: int, shard: str) -> tuple[str, str]:
        """The job's steps up to the cache's save; the key it restored and the key its entries name."""
        temp = tmp_path / f"run-{run}-shard-{shard.replace('/', 'of')}"
        work = temp / "work"
        work.mkdir(parents=True)
        context = action_context({"model": str(tuned), "base": str(base), "shard": shard}, temp)
        context |= {"github.run_id": str(run), "github.run_attempt": "1"}
        for spec in steps[:restore_at]:  # what names the cache before its restore
            if "run" in spec and spec.get("id"):
                assert run_step(spec, context, work).returncode == 0
                outputs = parse_outputs(work / "github_output")
                context |= {f"steps.{spec['id']}.outputs.{name}": value for name, value in outputs.items()}
        restored = caches.restore(steps[restore_at], context)
        assert run_step(step(steps, "audit"), context, work).returncode == 0
        assert run_step(step(steps, "spectra"), context, work).returncode == 0
        key = parse_outputs(work / "github_output")["key"]
        context["steps.spectra.outputs.key"] = key
        if key != restored:
            caches.save(step(steps, "Save the base-spectrum cache"), context)
        return restored, key

    first = {shard: shard_job(1, shard) for shard in ("1/2", "2/2")}
    assert first["1/2"][1].startswith("ftaudit-spectra-Linux-shard-1of2-") and first["1/2"][1] != first["2/2"][1]
    for shard in ("1/2", "2/2"):
        assert shard_job(2, shard) == (first[shard][1], first[shard][1])  # its own part, and nothing new to save


@pytest.mark.parametrize("name", ["cache", "push-card"])
def test_true_false_inputs_are_checked(models, tmp_path, name):
    # "yes" would otherwise read as false: push-card: yes would audit, push nothing, and pass.
    context = action_context({"model": str(models[1]), "base": str(models[0]), name: "yes"}, tmp_path)
    bad = run_step(step(ACTION["runs"]["steps"], "audit"), context, tmp_path)
    assert bad.returncode == 2 and f"::error::{name} must be true or false, not 'yes'" in bad.stdout
    assert not (tmp_path / "ftaudit-report.json").exists()


@pytest.mark.parametrize("size", ["8GiB", "0", "-1", "0.0"])
def test_a_cache_size_that_is_no_size_is_an_error_on_the_run_page(models, tmp_path, size):
    context = action_context({"model": str(models[1]), "base": str(models[0]), "cache-size": size}, tmp_path)
    bad = run_step(step(ACTION["runs"]["steps"], "audit"), context, tmp_path)
    assert (bad.returncode, bad.stderr) == (2, "")
    assert bad.stdout == f"::error::cache-size must be a number of GiB above 0, such as 8 or 0.5, not '{size}'\n"


def test_an_input_in_an_error_cannot_end_the_workflow_command_or_start_another(models, tmp_path):
    forged = "yes\n::add-mask::everything\r\n100%"
    context = action_context({"model": str(models[1]), "base": str(models[0]), "cache": forged}, tmp_path)
    bad = run_step(step(ACTION["runs"]["steps"], "audit"), context, tmp_path)
    assert bad.returncode == 2
    assert bad.stdout == "::error::cache must be true or false, not 'yes%0A::add-mask::everything%0D%0A100%25'\n"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_torch_without_cuda_says_why_before_the_audit(models, tmp_path, device):
    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        pytest.skip(f"torch {torch.__version__} here is a CUDA build: the action's check lets it through")
    inputs = {"model": str(models[1]), "base": str(models[0]), "device": device, "python-version": "3.11"}
    bad = run_step(step(ACTION["runs"]["steps"], "audit"), action_context(inputs, tmp_path), tmp_path)
    assert (bad.returncode, bad.stderr) == (2, "")
    assert bad.stdout == (
        f"::error::device: {device} needs a CUDA build of torch, but the torch here is {torch.__version__}, a build "
        "without CUDA that Python 3.11 had before the action (which keeps it): install a CUDA build of torch in that "
        "Python, or use device: cpu\n"
    )
    assert not (tmp_path / "ftaudit-report.json").exists()
    inputs["device"] = "auto"  # falls back to the CPU: the same torch audits
    ok = run_step(step(ACTION["runs"]["steps"], "audit"), action_context(inputs, tmp_path), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "ftaudit-report.json").read_text())["settings"]["device"] == "cpu"


@pytest.mark.parametrize(("device", "index"), [
    ("cpu", ["--index-url", "https://download.pytorch.org/whl/cpu"]),
    ("auto", ["--index-url", "https://download.pytorch.org/whl/cpu"]),
    ("cuda", []),
    ("cuda:1", []),
])
def test_the_install_step_takes_a_cuda_build_of_torch_only_for_cuda(tmp_path, device, index):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "python"  # records what the step asks pip for, installs nothing
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n')
    fake.chmod(0o755)
    context = action_context({"device": device}, tmp_path)
    done = run_step(step(ACTION["runs"]["steps"], "Install ftaudit"), context, tmp_path,
                    {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    torch_line, package_line = calls.read_text().splitlines()
    assert torch_line.split() == ["-m", "pip", "install", "--disable-pip-version-check", "--quiet", "torch", *index]
    assert Path(package_line.split()[-1]).resolve() == ROOT


@pytest.mark.parametrize(
    ("status", "fail_on", "code"),
    [("pass", "fail", 0), ("warn", "fail", 0), ("fail", "fail", 1), ("pass", "warn", 0), ("warn", "warn", 1),
     ("fail", "warn", 1), ("pass", "never", 0), ("warn", "never", 0), ("fail", "never", 0), ("", "never", 2)],
)
def test_fail_on(tmp_path, status, fail_on, code):
    context = action_context({"fail-on": fail_on}, tmp_path, {"status": status})
    assert run_step(step(ACTION["runs"]["steps"], "Apply fail-on"), context, tmp_path).returncode == code


def test_action_definition():
    assert ACTION["runs"]["using"] == "composite"
    assert "required" not in ACTION["inputs"]["model"]  # not with merge; the audit step asks for it otherwise
    defaults = {name: spec.get("default") for name, spec in ACTION["inputs"].items()}
    assert defaults["device"] == "cpu" and defaults["push-card"] == "false" and defaults["fail-on"] == "fail"
    assert {"base", "revision", "policy", "hf-token", "python-version"} <= set(defaults)
    steps = ACTION["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    assert steps[0]["with"]["python-version"] == "${{ inputs.python-version }}"
    for name in ("status", "risk", "intruders", "report"):
        assert ACTION["outputs"][name]["value"] == f"${{{{ steps.audit.outputs.{name} }}}}"

    install = step(steps, "Install ftaudit")
    source = Path(evaluate(install["env"]["FTAUDIT_SRC"], {"github.action_path": str(ACTION_DIR)}))
    assert source.resolve() == ROOT and (source / "pyproject.toml").is_file()
    assert "https://download.pytorch.org/whl/cpu" in install["run"] and '"$FTAUDIT_SRC"' in install["run"]

    audit = step(steps, "audit")["run"]
    assert '--json "$RUNNER_TEMP/ftaudit-report.json" --format github' in audit and "(--push)" in audit
    upload = step(steps, "Upload the report")
    assert upload["uses"] == "actions/upload-artifact@v4" and upload["if"] == "always()"
    assert upload["with"]["path"] == "${{ runner.temp }}/ftaudit-report.json"
    assert steps[-1]["name"] == "Apply fail-on"

    # The cache: restored before the audit (the newest with the prefix), saved after it under a key
    # named by its entries unless that is the key restored, before fail-on can fail the job.
    assert defaults["cache"] == "true" and defaults["cache-size"] == "8"
    restore, save = step(steps, "restore-spectra"), step(steps, "Save the base-spectrum cache")
    names = [s.get("id") or s.get("name") for s in steps]
    assert names.index("restore-spectra") < names.index("audit") < names.index("spectra") < names.index(save["name"])
    assert restore["uses"] == "actions/cache/restore@v4" and save["uses"] == "actions/cache/save@v4"
    path = "${{ runner.temp }}/ftaudit-spectra"
    assert restore["with"]["path"] == save["with"]["path"] == path
    assert step(steps, "audit")["env"]["FTAUDIT_CACHE"] == step(steps, "spectra")["env"]["FTAUDIT_CACHE"] == path
    prefix = "${{ steps.spectra-prefix.outputs.prefix }}"
    assert restore["with"]["restore-keys"] == step(steps, "spectra")["env"]["PREFIX"] == prefix
    assert names.index("spectra-prefix") < names.index("restore-spectra")
    assert restore["if"] == step(steps, "spectra-prefix")["if"] == "inputs.cache == 'true' && inputs.merge == ''"
    # saved after a failed audit step too (a push that failed after the audit), not after a cancelled job
    assert step(steps, "spectra")["if"] == "${{ !cancelled() && inputs.cache == 'true' && inputs.merge == '' }}"
    assert save["with"]["key"] == "${{ steps.spectra.outputs.key }}"
    assert save["if"].startswith("${{ !cancelled() && ") and save["if"].endswith(" }}")
    assert "steps.spectra.outputs.key != steps.restore-spectra.outputs.cache-matched-key" in save["if"]


def test_the_docs_list_every_input_with_its_default_and_every_output():
    docs = (ROOT / "docs" / "github-action.md").read_text(encoding="utf-8")

    def table(heading: str) -> dict[str, str]:
        """The first two columns of the table under `heading`, its names without backticks."""
        section = docs.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
        return dict(re.findall(r"^\| `([\w-]+)` \| ([^|]*?) \|", section, re.M))

    inputs = table("Inputs")
    assert set(inputs) == set(ACTION["inputs"]) and set(table("Outputs")) == set(ACTION["outputs"])
    for name, spec in ACTION["inputs"].items():
        if spec["default"]:
            assert inputs[name] == f"`{spec['default']}`", name


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.yml")))
def test_workflows_parse_and_use_the_action_as_it_is_defined(name):
    workflow = load(WORKFLOWS / name)
    assert workflow.get(True) or workflow.get("on")  # YAML 1.1 reads the key `on` as True
    for job in workflow["jobs"].values():
        steps = job["steps"]
        for i, spec in enumerate(steps):
            if spec.get("uses") != "./.github/actions/ftaudit":
                assert "${{" not in spec.get("run", "")  # expressions go through env
                continue
            assert any(s.get("uses", "").startswith("actions/checkout@") for s in steps[:i])
            given = spec.get("with", {})
            assert set(given) <= set(ACTION["inputs"]) and ("model" in given) != ("merge" in given)
            for value in given.values():
                for expression in EXPRESSION.findall(str(value)):
                    assert expression.split(".")[0] in {"inputs", "env", "secrets", "github", "matrix"}, expression


def test_example_workflow_triggers():
    on = {name: load(WORKFLOWS / name)[True] for name in EXAMPLES}
    paths = {"**/*.safetensors", "**/*.safetensors.index.json", "**/config.json", "**/adapter_config.json",
             "**/README.md"}
    assert set(on["audit-on-push.yml"]["push"]["paths"]) == paths
    assert on["audit-on-dispatch.yml"]["repository_dispatch"]["types"] == ["hf-model-updated"]
    manual = on["audit-manual.yml"]["workflow_dispatch"]["inputs"]
    assert set(manual) == {"model", "base", "revision"} and manual["model"]["required"] is True

    # GitHub applies no path filter to a tag's push: without a branch filter, every tag pushed would start an audit.
    assert on["audit-on-push.yml"]["push"]["branches"] == ["**"] and "tags" not in on["audit-on-push.yml"]["push"]

    dispatch = load(WORKFLOWS / "audit-on-dispatch.yml")["jobs"]["audit"]["steps"]
    audit = next(s for s in dispatch if s.get("uses") == "./.github/actions/ftaudit")["with"]
    assert audit["model"] == "${{ github.event.client_payload.repo }}"
    assert audit["revision"] == "${{ github.event.client_payload.revision }}"
    assert audit["push-card"] == "true"


def test_dispatch_guard_skips_commits_that_changed_only_the_card(hub: HubServer, tmp_path):
    """The guard compares the commit to the one the card's audit is of: only a commit whose files, the card's aside,
    were audited is skipped."""
    base = llama_like()
    weights = folder_files(write_model(tmp_path / "m", base, readme=card("org/base")))
    first = hub.add_repo("org/tuned", weights)
    edits = iter(range(1000))

    def commit(files: dict[str, bytes], audited: object = None, base_model: str = "org/base") -> str:
        """A commit of `files` whose card says its audit is of `audited` (no such key: None)."""
        key = {} if audited is None else {"ftaudit": {"status": "fail", "revision": audited}}
        readme = card(base_model, **key) + f"Edit {next(edits)}.\n"
        return hub.add_repo("org/tuned", files | {"README.md": readme.encode(), "ftaudit/badge.svg": b"<svg/>"})

    tuned = folder_files(write_model(tmp_path / "m2", low_rank_update(base), readme=card("org/base")))
    guard = step(load(WORKFLOWS / "audit-on-dispatch.yml")["jobs"]["audit"]["steps"], "guard")

    def skipped(after: str, before: str) -> bool:
        (tmp_path / "github_output").unlink(missing_ok=True)
        context = {"github.event.client_payload.repo": "org/tuned", "github.event.client_payload.revision": after,
                   "secrets.HF_TOKEN": "", "runner.temp": str(tmp_path),
                   "github.event.client_payload.before": before}  # the previous head, which relays sent before
        result = run_step(guard, context, tmp_path, {"HF_ENDPOINT": hub.url})
        assert result.returncode == 0, result.stderr
        output = tmp_path / "github_output"
        return output.exists() and parse_outputs(output) == {"skip": "true"}

    carded = commit(weights, first)  # ftaudit's card pull request for `first`, merged
    assert skipped(carded, first)
    assert skipped(commit(weights, first), carded)  # the card edited again
    retuned = commit(tuned, first)  # new weights
    assert not skipped(retuned, carded)
    # The card edited while the audit of `retuned` ran, which the new run cancelled: `retuned` was never audited.
    assert not skipped(commit(tuned, first), retuned)
    assert not skipped(commit(weights, first, base_model="org/other"), carded)  # a new declared base
    assert not skipped(commit(weights), carded)  # no audit on the card
    for unknown in ("0" * 40, "main", f"../../../models/org/tuned/revision/{first}"):  # only a commit names an audit
        assert not skipped(commit(weights, unknown), first)


# --- the webhook relay of docs/github-action.md ---------------------------------------------------

class _GitHub(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[str, list[tuple[str, dict[str, str], dict[str, Any]]]]]:
    """The relay from the docs, run as a process in front of a fake GitHub API."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "github-action.md").read_text(), re.S)
    source = next(b for b in blocks if "X-Webhook-Secret" in b)
    (tmp_path / "relay.py").write_text(source)
    github = HTTPServer(("127.0.0.1", 0), _GitHub)
    _GitHub.received = []
    threading.Thread(target=github.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WEBHOOK_SECRET": "s3cret", "GITHUB_TOKEN": "ghp_token", "GITHUB_REPOSITORY": "me/models",
           "GITHUB_API": f"http://127.0.0.1:{github.server_port}", "PORT": str(port)}
    process = subprocess.Popen([sys.executable, str(tmp_path / "relay.py")], env=env)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield url, _GitHub.received
    finally:
        process.terminate()
        process.wait(timeout=10)
        github.shutdown()
        github.server_close()


def hub_event(ref: str = "refs/heads/main", scope: str = "repo.content") -> dict[str, Any]:
    """A Hub webhook payload (version 3) for a push to `ref`."""
    return {
        "event": {"action": "update", "scope": scope},
        "repo": {"type": "model", "name": "org/tuned", "id": "1", "private": False, "headSha": "b" * 40},
        "updatedRefs": [{"ref": ref, "oldSha": "a" * 40, "newSha": "b" * 40}],
        "webhook": {"id": "w", "version": 3},
    }


def post(url: str, payload: dict[str, Any], secret: str) -> int:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Webhook-Secret": secret})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_relay_forwards_new_commits_on_main_to_repository_dispatch(relay):
    url, received = relay
    assert post(url, hub_event(), "wrong") == 403
    assert post(url, hub_event("refs/pr/1"), "s3cret") == 204  # ftaudit's own card pull request
    assert post(url, hub_event(scope="repo"), "s3cret") == 204
    assert received == []
    assert post(url, hub_event(), "s3cret") == 202
    [(path, headers, body)] = received
    assert path == "/repos/me/models/dispatches" and headers["Authorization"] == "Bearer ghp_token"
    assert body == {"event_type": "hf-model-updated", "client_payload": {"repo": "org/tuned", "revision": "b" * 40}}


def test_the_sharded_workflow_merges_what_its_shard_jobs_upload():
    import fnmatch

    jobs = load(WORKFLOWS / "audit-sharded.yml")["jobs"]
    shards = jobs["shard"]["strategy"]["matrix"]["shard"]
    action = next(s for s in jobs["shard"]["steps"] if s.get("uses") == "./.github/actions/ftaudit")["with"]
    assert shards == list(range(1, len(shards) + 1)) and action["shard"] == f"${{{{ matrix.shard }}}}/{len(shards)}"
    assert float(action["cache-size"]) * len(shards) <= 10e9 / 2**30  # the shards' caches fit in GitHub's 10 GB
    uploaded = [evaluate(action["artifact-name"], {"matrix.shard": str(i)}) for i in shards]
    download = next(s for s in jobs["merge"]["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    assert jobs["merge"]["needs"] == "shard"
    assert all(fnmatch.fnmatch(name, download["with"]["pattern"]) for name in uploaded)
    merge = next(s for s in jobs["merge"]["steps"] if s.get("uses") == "./.github/actions/ftaudit")["with"]["merge"]
    report = Path(evaluate(step(ACTION["runs"]["steps"], "Upload the report")["with"]["path"], {"runner.temp": "."}))
    assert all(fnmatch.fnmatch(f"{download['with']['path']}/{name}/{report.name}", merge) for name in uploaded)
