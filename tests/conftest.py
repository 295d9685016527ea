"""Shared pytest fixtures."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubserver import HubServer


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own base-spectrum cache, never the user's."""
    monkeypatch.setenv("FTAUDIT_CACHE", str(tmp_path_factory.mktemp("spectra")))


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A fake Hugging Face Hub on 127.0.0.1, fresh for each test."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    """Point ftaudit at the fake Hub, with no token or cache from the machine and fast retries."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("FTAUDIT_HTTP_BACKOFF", "0")
    return hub
