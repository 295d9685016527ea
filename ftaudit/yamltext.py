"""YAML text as ftaudit reads it (cards' front matter, policies): what is wrong with it in a few words."""

from __future__ import annotations

import yaml


class InvalidYAML(ValueError):
    """Text that is not valid YAML; its message says why, in one line."""


def load(text: str) -> object:
    """`text` parsed as safe YAML; InvalidYAML when it cannot be."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidYAML(str(e).splitlines()[0]) from None
    except RecursionError:
        raise InvalidYAML("nested too deeply") from None
    except ValueError as e:  # a timestamp that is no date, such as 2024-13-45
        raise InvalidYAML(f"not a date: {e}") from None
