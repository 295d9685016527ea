"""The redactor masks every token ftaudit could hold, and a local audit does not load the Hub client to find them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import huggingface_hub.utils
import pytest

from ftaudit.secrets import MASK, Redactor
from tests.models import llama_like, low_rank_update, write_model

ROOT = Path(__file__).resolve().parent.parent
LOGIN = "hf_SavedLoginTokenAbcdefghijklmnop"
LATER = "hf_ResolvedLaterAbcdefghijklmnopq"


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
