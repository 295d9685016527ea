"""The YAML front matter of a model card (README.md)."""

from __future__ import annotations

import re

from ftaudit import yamltext

FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)^---[ \t]*(\r?\n|\Z)", re.S | re.M)
"""As the Hub reads it (huggingface_hub.repocard.REGEX_YAML_BLOCK): blank lines may come before the opening `---`."""


def read(card: str) -> dict[str, object]:
    """The card's front matter as a mapping; empty when it has none or it is not a YAML mapping."""
    try:
        data = _load(card)
    except yamltext.InvalidYAML:
        return {}
    return data if isinstance(data, dict) else {}


def problem(card: str) -> str | None:
    """Why the card's front matter is not valid YAML (the parser's first line), or None when it is, or there is none."""
    try:
        _load(card)
    except yamltext.InvalidYAML as e:
        return str(e)
    return None


def _load(card: str) -> object:
    match = FRONT_MATTER.match(card.removeprefix("\ufeff"))  # a BOM, as ftaudit.cardfile reads it
    return yamltext.load(match[1]) if match else None
