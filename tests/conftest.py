"""Shared pytest fixtures."""

from collections.abc import Iterator

import pytest

from tests.hubserver import HubServer


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A fake Hugging Face Hub on 127.0.0.1, fresh for each test."""
    with HubServer() as server:
        yield server
