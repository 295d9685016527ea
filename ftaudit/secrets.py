"""Keeping tokens out of everything ftaudit prints or writes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from huggingface_hub.utils import get_token

MASK = "***"


@dataclass(frozen=True)
class Redactor:
    """Replaces every known secret in a text by a mask."""

    secrets: tuple[str, ...]

    @classmethod
    def for_token(cls, token: str | None) -> Redactor:
        """The explicit token, HF_TOKEN and the saved login, whichever exist."""
        found = {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), get_token()}
        return cls(tuple(sorted((s for s in found if s and len(s) >= 4), key=len, reverse=True)))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def log_filter(self, record: logging.LogRecord) -> bool:
        """A logging filter that redacts the record's final message in place."""
        record.msg = self(record.getMessage())
        record.args = None
        return True
