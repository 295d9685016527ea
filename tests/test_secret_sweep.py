"""The token never leaks: every failing path of `ftaudit check` through the fake Hub, and runs with every output,
for each place the token comes from (--token, HF_TOKEN, the saved login), with and without --debug."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from click.testing import CliRunner

from ftaudit.cli import main
from tests.hubserver import HubServer
from tests.models import card, folder_files, llama_like, low_rank_update, write_model

TOKEN = "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"
BASE = llama_like(layers=1)
OUTPUTS = {"--json": "report.json", "--card": "card.md", "--badge": "badge.svg", "--badge-json": "badge.json",
           "--heatmap": "heatmap.svg"}


def encodings(secret: str) -> set[bytes]:
    """The secret as it could be written: as is, URL-encoded, and in base64 (standard and URL-safe) at each of the
    three byte alignments it could have inside a longer encoded text."""
    raw = secret.encode()
    forms = {raw, quote(secret, safe="").encode()}
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(b"\0" * pad + raw)[4:-4])
    return forms


FORMS = encodings(TOKEN)


def publish(hub: HubServer, tmp_path: Path, *, tuned: dict[str, torch.Tensor] | None = None,
            readme: str = card("org/base"), shards: int = 1, edit: Callable[[dict[str, bytes]], None] | None = None,
            registered: bool = True, grant: tuple[str, ...] = ("org/tuned", "org/base"), **flags: bool) -> None:
    """Put org/base and org/tuned (made private or gated by `flags`, its files changed by `edit`) on the Hub, and
    make TOKEN valid there (unless not `registered`), able to read the `grant`ed repos."""
    hub.add_repo("org/base", folder_files(write_model(tmp_path / "base", BASE)))
    model = tuned if tuned is not None else low_rank_update(BASE)
    files = folder_files(write_model(tmp_path / "tuned", model, readme=readme, shards=shards))
    if edit is not None:
        edit(files)
    hub.add_repo("org/tuned", files, **flags)
    if registered:
        hub.add_token(TOKEN, grant)


def truncate(files: dict[str, bytes]) -> None:
    files["model.safetensors"] = files["model.safetensors"][:-100]


def corrupt_header(files: dict[str, bytes]) -> None:
    files["model.safetensors"] = b"\xff" * 8 + files["model.safetensors"][8:]


def drop_a_shard(files: dict[str, bytes]) -> None:
    del files["model-00002-of-00002.safetensors"]


def pickle_only(files: dict[str, bytes]) -> None:
    buffer = io.BytesIO()
    torch.save(low_rank_update(BASE), buffer)
    files["pytorch_model.bin"] = buffer.getvalue()
    del files["model.safetensors"]


Arrange = Callable[[HubServer, Path, pytest.MonkeyPatch], list[str]]


def published(*args: str, fault: Callable[[HubServer], object] | None = None, env: dict[str, str] | None = None,
              **options: object) -> Arrange:
    """Publish the models with `options`, then inject `fault` into the Hub and set `env`; `args` go on the
    command line."""

    def arrange(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        publish(hub, tmp_path, **options)  # type: ignore[arg-type]
        if fault is not None:
            fault(hub)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        return list(args)

    return arrange


RETRIES = 2
CASES: dict[str, tuple[Arrange, int, str]] = {
    "repo not found": (published("--base", "org/missing"), 2, "org/missing: no such model repository"),
    "revision not found": (published("--revision", "v9"), 2, "revision v9 not found"),
    "token rejected (401)": (published(registered=False), 2, "rejected the token (HTTP 401)"),
    "private, no access": (published(private=True, grant=("org/base",)), 2, "or the token cannot read it"),
    "gated, no access (403)": (published(gated=True, grant=("org/base",)), 2, "gated repository"),
    "forbidden (403)": (published(fault=lambda hub: hub.fail_next(1000, 403, "/api/models/org/tuned")), 2,
                        "may not read this repository (HTTP 403)"),
    "no declared base": (published(readme=card()), 2, "declares no base model"),
    "several bases": (published(readme=card(["org/base", "org/other"])), 2, "declares 2 base models"),
    "itself as base": (published(readme=card("Org/Tuned")), 2, "declares itself as its base model (card: Org/Tuned)"),
    "quantized": (published(readme=card("org/base", base_model_relation="quantized")), 2, "quantized model"),
    "architecture mismatch": (published(tuned=llama_like(layers=1, hidden=16, ffn=24)), 2, "matches the base in shape"),
    "corrupt header": (published(edit=corrupt_header), 2, "implausible safetensors header length"),
    "truncated file": (published(edit=truncate), 2, "truncated safetensors file"),
    "missing shard": (published(shards=2, edit=drop_a_shard), 2, "which is not in the snapshot"),
    "pickle only": (published(edit=pickle_only), 2, "pass --allow-pickle"),
    "connection drops": (published(fault=lambda hub: hub.drop_next(1000, ".safetensors")), 2,
                         f"still failing after {RETRIES} attempts"),
    "timeout": (published(fault=lambda hub: setattr(hub, "delay", 0.5), env={"FTAUDIT_HTTP_TIMEOUT": "0.2"}), 2,
                f"still failing after {RETRIES} attempts (ReadTimeout)"),
    **{f"HTTP {status}": (published(fault=lambda hub, status=status: hub.fail_next(1000, status, ".safetensors")), 2,
                          f"still failing after {RETRIES} attempts (HTTP {status})") for status in (429, 500)},
    "Range ignored": (published(fault=lambda hub: setattr(hub, "ignore_range", True)), 1, "ignores HTTP Range"),
    "push, read-only": (published("--push", private=True), 2, "--push needs a token with WRITE access"),
    **{f"--format {fmt}": (published("--format", fmt, private=True), 1, "") for fmt in
       ("text", "json", "markdown", "github")},
}


def give_token(source: str, login: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make TOKEN the one ftaudit uses, from `source`; return the command-line arguments that carry it."""
    if source == "--token":
        return ["--token", TOKEN]
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:  # the saved login file, HF_HOME/token, where `hf auth login` writes it
        login.parent.mkdir(parents=True, exist_ok=True)
        login.write_text(TOKEN)
        monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(login))
    return []


@pytest.mark.parametrize("source", ["--token", "HF_TOKEN", "login"])
@pytest.mark.parametrize("case", CASES)
def test_the_token_appears_in_no_output_of_any_path(hub_env, tmp_path, monkeypatch, case, source):
    arrange, expected_code, message = CASES[case]
    monkeypatch.chdir(tmp_path)  # anything written to the working directory is swept too
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", str(RETRIES))
    monkeypatch.setenv("GITHUB_OUTPUT", str(tmp_path / "github-output"))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "github-summary"))
    login = Path(os.environ["HF_HOME"]) / "token"
    args = ["check", "org/tuned", *arrange(hub_env, tmp_path, monkeypatch), *give_token(source, login, monkeypatch)]
    args += [str(x) for option, name in OUTPUTS.items() for x in (option, tmp_path / name)]
    for debug in (False, True):
        result = CliRunner().invoke(main, args + ["--debug"] * debug)
        code, stderr, lines = result.exit_code, result.stderr, result.stderr.splitlines()
        assert code == expected_code and message in stderr, stderr
        assert ("Traceback" in stderr) == (debug and code == 2), stderr
        if code == 2:
            assert lines[-1].startswith("ftaudit: error: ") and message in lines[-1] and (debug or len(lines) == 1)
        written = [p for root in (tmp_path, Path(os.environ["FTAUDIT_CACHE"])) for p in root.rglob("*")
                   if p.is_file() and p != login]
        outputs = {"stdout": result.stdout.encode(), "stderr": stderr.encode()} | {
            str(p): p.read_bytes() for p in written}
        assert not [where for where, data in outputs.items() for form in FORMS if form in data]
    if case.startswith("--format"):
        assert all((tmp_path / name).exists() for name in OUTPUTS.values())
        assert (tmp_path / "github-output").exists() == (case == "--format github")
