"""Writing output files: atomically, with one clear error when a file cannot be written."""

from __future__ import annotations

from pathlib import Path

from ftaudit.errors import UsageError


def write_text(path: Path, content: str) -> None:
    """Write `content` to `path` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror})") from None
