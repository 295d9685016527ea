"""The YAML front matter of a model card (README.md)."""

from __future__ import annotations

import re

import yaml

FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)^---[ \t]*(\r?\n|\Z)", re.S | re.M)
"""As the Hub reads it (huggingface_hub.repocard.REGEX_YAML_BLOCK): blank lines may come before the opening `---`."""


def read(card: str) -> dict[str, object]:
    """The card's front matter as a mapping; empty when it has none or it is not a YAML mapping."""
    match = FRONT_MATTER.match(card.removeprefix("\ufeff"))  # a BOM, as ftaudit.cardfile reads it
    if not match:
        return {}
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
