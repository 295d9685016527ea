"""What every source of model files provides: a listing and byte-range reads."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

MAX_TEXT_BYTES = 16_000_000
"""Small files (cards, configs, indexes) larger than this are refused."""


class Storage(Protocol):
    """The files of one model snapshot, readable by byte range."""

    label: str
    """How the snapshot is named in messages: a path, or repo@revision."""

    def files(self) -> list[str]:
        """Relative POSIX paths of every file in the snapshot."""
        ...

    def size(self, name: str) -> int:
        """Size of a file in bytes."""
        ...

    def read(self, name: str, start: int, length: int) -> bytes | bytearray:
        """Exactly `length` bytes from offset `start`, or an ftaudit error; a bytearray where the
        bytes could be read straight into one, so that a tensor can use them without a copy."""
        ...

    def read_text(self, name: str) -> str | None:
        """A small UTF-8 file, or None when the snapshot has no such file."""
        ...

    def local_path(self, name: str) -> Path:
        """The file on local disk, downloaded first if need be (only for formats that need it)."""
        ...
