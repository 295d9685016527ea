"""Keeping tokens out of everything ftaudit prints or writes."""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import constants  # the paths only: the Hub client loads slowly, and a local audit never needs it

MASK = "***"
HUB_TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}")
"""Anything shaped like a Hugging Face token (`hf_` and, today, 34 letters), known to be one here or not."""
URL_PASSWORD = re.compile(r"(?<=://)([^\s/?#@:]*:)[^\s/?#@]+(?=@)")
"""The password of a URL's userinfo (scheme://user:password@host), after the user and its colon."""


def mask_shapes(text: str) -> str:
    """`text` with whatever looks like a secret masked: Hugging Face tokens and URLs' passwords, whoever's they are
    (a token in an adapter_config.json's URL is not the user's, and no list of known tokens holds it)."""
    return HUB_TOKEN.sub(MASK, URL_PASSWORD.sub(rf"\1{MASK}", text))


def clean_token(token: str) -> str:
    """`token` as huggingface_hub cleans one from HF_TOKEN or the saved login: line breaks and surrounding spaces
    dropped."""
    return token.replace("\r", "").replace("\n", "").strip()


def header_safe(token: str) -> bool:
    """Whether an HTTP header can carry `token`: printable ASCII only."""
    return all(c.isascii() and c.isprintable() for c in token)


def saved_login() -> str | None:
    """The token `hf auth login` saved, read from where huggingface_hub keeps it."""
    try:
        return Path(constants.HF_TOKEN_PATH).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _resolved_by_hub() -> str | None:
    """The token the Hub client resolves (a Colab secret, an OIDC exchange, a refreshed login), once it is loaded:
    until then none of these can have been fetched."""
    hub_utils = sys.modules.get("huggingface_hub.utils")
    get_token = getattr(hub_utils, "get_token", None)
    if get_token is None:
        return None
    try:
        return get_token()
    except Exception:  # noqa: BLE001 - a token that could not be obtained was never used
        return None


def _endpoint_password() -> str | None:
    """The password of a mirror's URL given as https://user:password@host in HF_ENDPOINT."""
    try:
        return urlsplit(os.environ.get("HF_ENDPOINT", "")).password
    except ValueError:  # a malformed URL, refused with its own error when the Hub is used
        return None


@dataclass(frozen=True)
class Redactor:
    """Replaces every known secret in a text, and whatever is shaped like one (`mask_shapes`), by a mask."""

    known: frozenset[str]

    @classmethod
    def for_token(cls, token: str | None) -> Redactor:
        """The explicit token, HF_TOKEN, the saved login and a password in HF_ENDPOINT, whichever exist, and whatever
        the Hub client resolves."""
        found = {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), saved_login(),
                 _endpoint_password()}
        return cls(frozenset(s for s in found if s))

    def secrets(self) -> list[str]:
        """Every secret, longest first (so that one holding another is masked whole)."""
        found = self.known | {_resolved_by_hub()}
        return sorted((s for s in found if s and len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets():
            text = text.replace(secret, MASK)
        return mask_shapes(text)

    def log_filter(self, record: logging.LogRecord) -> bool:
        """A logging filter that redacts the record's final message in place."""
        record.msg = self(record.getMessage())
        record.args = None
        return True
