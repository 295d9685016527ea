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


def check_writable(path: Path) -> None:
    """Fail now, before any work, where `path` could not be written afterwards: no folder for it, or a folder there."""
    if path.is_dir():
        raise UsageError(f"{path}: cannot write (a folder is there)")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: cannot write (no folder {path.parent})")
