"""Model files in a local folder."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ftaudit.errors import AccessError, InvalidWeightsError, NotFoundError
from ftaudit.sources.storage import MAX_TEXT_BYTES

NOT_MODEL_FILES = (".git", ".cache")
"""Folders that are not the model's files (git's own; huggingface_hub's download records), which a Hub repository
cannot hold; a worktree's `.git` may be a file."""


class LocalStorage:
    """A folder on disk, read by slices. Its files may be links to elsewhere, as in the Hugging Face cache."""

    def __init__(self, root: Path, label: str | None = None) -> None:
        if not root.is_dir():
            raise NotFoundError(f"{root}: not a folder")
        self.root = root
        self.label = label or str(root)

    def files(self) -> list[str]:
        try:
            os.scandir(self.root).close()  # rglob takes a folder it may not list for an empty one
        except OSError as e:
            raise cannot_read(self.label, e) from None
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if _listed(p) and not any(part in NOT_MODEL_FILES for part in p.relative_to(self.root).parts)
        )

    def _path(self, name: str) -> Path:
        return self.root / inside(name, self.label)

    def local_path(self, name: str) -> Path:
        return self._path(name)

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise NotFoundError(f"{self.label}: no file {name}") from None
        except OSError as e:
            raise cannot_read(f"{self.label}/{name}", e) from None

    def read(self, name: str, start: int, length: int) -> bytearray:
        return read_range(self._path(name), start, length, f"{self.label}/{name}")

    def read_text(self, name: str) -> str | None:
        path, label = self._path(name), f"{self.label}/{name}"
        try:
            exists = path.is_file()
        except OSError as e:
            raise cannot_read(label, e) from None
        return read_small_text(path, label) if exists else None


def _listed(path: Path) -> bool:
    """Whether `path` is one of the folder's files: a file, or a link into a folder that may not be searched, which
    reading says it cannot read (so a copy of the folder does not leave it out)."""
    try:
        return path.is_file()
    except PermissionError:
        return True


def inside(name: str, label: str) -> PurePosixPath:
    """A file name read from a snapshot (its listing, an index's weight map) as a path that stays inside it."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise InvalidWeightsError(f"{label}: file name {name!r} points outside the snapshot")
    return relative


def read_range(path: Path, start: int, length: int, label: str) -> bytearray:
    """Exactly `length` bytes of a file from offset `start`, read straight into a bytearray (a file shorter than that
    has shrunk since its validated header was read)."""
    data = bytearray(length)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(data)
    except OSError as e:
        raise cannot_read(label, e) from None
    if got != length:
        raise InvalidWeightsError(f"{label}: file ends before byte {start + length}: it has changed since its header "
                                  "was read; run again once nothing writes it")
    return data


def read_small_text(path: Path, label: str) -> str:
    """A metadata file (a card, a config, an index): UTF-8 text of at most MAX_TEXT_BYTES."""
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise InvalidWeightsError(f"{label}: too large for a metadata file")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidWeightsError(f"{label}: not UTF-8 text") from None
    except OSError as e:
        raise cannot_read(label, e) from None


def cannot_read(label: str, error: OSError) -> AccessError:
    """A file on disk that the operating system will not read (permissions, a vanished file, an I/O error)."""
    return AccessError(f"{label}: cannot read ({error.strerror or type(error).__name__})")
