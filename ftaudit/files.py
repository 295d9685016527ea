"""Writing output files: atomically, with one clear error when a file cannot be written."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from ftaudit.errors import UsageError
from ftaudit.secrets import mask_shapes


def write_text(path: Path, content: str) -> None:
    """Write `content` to `path` as UTF-8, atomically (see `write_bytes`), whatever is shaped like a secret in it
    masked (a token in an input's URL, say, that a report or card section quotes)."""
    write_bytes(path, mask_shapes(content).encode("utf-8"))


def write_bytes(path: Path, data: bytes, what: str = "") -> None:
    """Write `data` to `path` through a temporary file beside it, so a reader never sees half of it.

    A link is written through (its target is replaced, the link stays), a file's permissions are
    kept, and a failed write leaves neither the temporary file nor a changed `path`. `what` names the
    file in the error (`cannot write the card`). What is neither a file nor a folder (`/dev/null`, a
    pipe such as `/dev/stdout` or bash's `>(...)`, a FIFO) is written into, never replaced.
    """
    cannot = f"{path}: cannot write{' ' + what if what else ''}"
    if is_stream(path):
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise UsageError(f"{cannot} ({e.strerror})") from None
        return
    try:
        target = _followed(path)
    except OSError as e:  # a loop of links
        raise UsageError(f"{cannot} ({e.strerror})") from None
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_bytes(data)
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        tmp.replace(target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"{cannot} ({e.strerror})") from None


def check_writable(path: Path, what: str = "") -> None:
    """Fail now, before any work, where `path` could not be written afterwards: no folder for it, or a folder there
    (where its links lead). `what` names the file in the error, as in `write_bytes`."""
    cannot = f"{path}: cannot write{' ' + what if what else ''}"
    try:
        target = _followed(path)
        folder_there, folder_for_it = target.is_dir(), target.parent.is_dir()
    except OSError as e:  # a loop of links, a folder on the way that may not be searched, a name too long
        raise UsageError(f"{cannot} ({e.strerror})") from None
    if folder_there:
        raise UsageError(f"{cannot} (a folder is there)")
    if not folder_for_it:
        raise UsageError(f"{cannot} (no folder {target.parent})")


def _followed(path: Path) -> Path:
    """The file that writing `path` writes: `path`, or the one its links lead to (for a link to nothing, the file
    it names, which writing makes); OSError for a loop of links."""
    if not os.path.islink(path):
        return path
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(path))


def is_stream(path: Path) -> bool:
    """Whether `path`, its links followed, is there but neither a file nor a folder: a device or a pipe."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
