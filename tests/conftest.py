"""Shared pytest fixtures."""

from collections.abc import Iterator

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
