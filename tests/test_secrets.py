"""The redactor masks every token ftaudit could hold, and a local audit does not load the Hub client to find them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.utils
import pytest
import yaml
from click.testing import CliRunner

from examples import minilm_finetunes as ft
from ftaudit.cli import main
from ftaudit.secrets import MASK, Redactor
from tests.models import llama_like, low_rank_update, write_model

ROOT = Path(__file__).resolve().parent.parent
LOGIN = "hf_SavedLoginTokenAbcdefghijklmnop"
LATER = "oidc-ResolvedLater.Abcdefghijklmnopq"  # a token of another shape: masked only once it is known
UNKNOWN = "hf_ZyXwVuTsRqPoNmLkJiHgFeDcBa98765432"  # no one's here: neither given, in the environment nor saved


@pytest.fixture
def login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "token"
    path.write_text(LOGIN + "\n")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(path))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return path


def test_every_source_is_masked(login, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FromTheEnvironmentAbcdefghijkl")
    redact = Redactor.for_token("hf_GivenOnTheCommandLineAbcdefgh")
    text = f"a {LOGIN} b hf_FromTheEnvironmentAbcdefghijkl c hf_GivenOnTheCommandLineAbcdefgh d"
    assert redact(text) == f"a {MASK} b {MASK} c {MASK} d"


def test_a_password_in_the_endpoint_url_is_masked(login, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror:s3cr3t-Passw0rd@hub.example.org")
    assert Redactor.for_token(None)("on https://mirror:s3cr3t-Passw0rd@hub.example.org") == \
        f"on https://mirror:{MASK}@hub.example.org"


def test_the_saved_login_is_masked_without_the_hub_client(login, monkeypatch):
    monkeypatch.delitem(sys.modules, "huggingface_hub.utils")
    assert Redactor.for_token(None)(f"token={LOGIN}") == f"token={MASK}"


def test_a_token_the_hub_client_resolves_later_is_masked(login, monkeypatch):
    redact = Redactor.for_token(None)
    assert redact(LATER) == LATER  # not a secret yet
    monkeypatch.setattr(huggingface_hub.utils, "get_token", lambda: LATER)  # e.g. an OIDC exchange, once a request ran
    assert redact(f"{LATER} {LOGIN}") == f"{MASK} {MASK}"


def test_a_hub_token_that_cannot_be_resolved_leaves_the_others_masked(login, monkeypatch):
    def failing() -> str:
        raise RuntimeError("OIDC exchange failed")

    monkeypatch.setattr(huggingface_hub.utils, "get_token", failing)
    assert Redactor.for_token(None)(LOGIN) == MASK


def test_a_local_audit_does_not_load_the_hub_client(tmp_path):
    base = llama_like(layers=1)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", low_rank_update(base))
    script = (
        "import sys\nfrom ftaudit.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print(any(m.startswith('httpx') for m in sys.modules), 'huggingface_hub.utils' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, "check", str(tmp_path / "tuned"), "--base",
                          str(tmp_path / "base"), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stdout.splitlines()[0] in ("exit 0", "exit 1"), run.stderr
    assert run.stdout.splitlines()[1:] == ["False False"], run.stdout


def test_anything_shaped_like_a_token_or_a_url_password_is_masked(login):
    redact = Redactor.for_token(None)
    assert redact(f"{UNKNOWN}, https://user:{UNKNOWN}@hub.example.org/x and ftp://me:p4ss@host") == \
        f"{MASK}, https://user:{MASK}@hub.example.org/x and ftp://me:{MASK}@host"
    ordinary = "hf_transformer.layers.0.hf_proj, https://hub.example.org:8080/org/model@main, user@host"
    assert redact(ordinary) == ordinary


def minilm_adapter(tmp_path: Path, declared_base: str) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(ROOT / "examples" / "minilm-lora-r8", folder)
    (folder / "README.md").unlink()  # the base is then the one adapter_config.json declares
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": declared_base}))
    return folder


def test_a_token_in_an_adapters_base_url_stays_out_of_the_error(login, tmp_path):
    folder = minilm_adapter(tmp_path, f"https://user:{UNKNOWN}@hub.example.org/org/base")
    result = CliRunner().invoke(main, ["check", str(folder), "--debug"])
    assert result.exit_code == 2 and f"'https://user:{MASK}@hub.example.org/org/base', which is neither" in \
        result.stderr.splitlines()[-1], result.stderr
    assert UNKNOWN not in result.stderr


def test_a_token_an_input_holds_stays_out_of_the_files_written(login, tmp_path):
    """An exclude glob is quoted by the report and its card section, and a report's base by the card's front matter."""
    folder = minilm_adapter(tmp_path, "sentence-transformers/all-MiniLM-L6-v2")
    outputs = {option: tmp_path / name for option, name in
               {"--json": "report.json", "--card": "section.md", "--badge": "badge.svg", "--heatmap": "map.svg"}.items()}
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(ft.base_model_dir()), "--exclude",
                                       f"*.{UNKNOWN}.*", *[str(x) for o in outputs.items() for x in o]])
    assert result.exit_code in (0, 1) and UNKNOWN not in result.output + result.stderr, result.stderr
    assert not [path for path in outputs.values() if UNKNOWN in path.read_text()]
    report = json.loads(outputs["--json"].read_text())
    assert report["settings"]["exclude"] == [f"*.{MASK}.*"]
    report["base"]["id"] = UNKNOWN  # hand-edited, or written by an ftaudit that did not mask it
    outputs["--json"].write_text(json.dumps(report))
    card = tmp_path / "README.md"
    result = CliRunner().invoke(main, ["card", "update", str(card), "--report", str(outputs["--json"])])
    assert result.exit_code == 0 and UNKNOWN not in card.read_text(), result.stderr
    assert yaml.safe_load(card.read_text().split("---")[1])["ftaudit"]["base_model"] == MASK
