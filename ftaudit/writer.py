"""Writing a model folder: streamed, and atomic as a whole.

Everything goes into a temporary sibling of the destination (`.NAME.ftaudit-partial-*`), which is
renamed to the destination only once every file is complete; a failure removes it. A safetensors
file is written tensor by tensor in data order: a tensor that is not replaced is copied as raw
bytes, in bounded chunks; a replaced one must keep its dtype and shape, so the header's bytes are
copied unchanged, unless tensors are added after the file's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from ftaudit.errors import InvalidWeightsError, UsageError
from ftaudit.sources.checkpoint import read_header
from ftaudit.sources.safetensors import FLOAT_DTYPES, TensorInfo, appended_header
from ftaudit.sources.storage import Storage

CHUNK_BYTES = 64 * 1024 * 1024
"""Raw copies read and write at most this much at a time."""

Replace = Callable[[TensorInfo], torch.Tensor | None]
"""Given a tensor's entry, its new value (same dtype and shape), or None to copy it unchanged."""


def check_destination(out: Path) -> None:
    """Refuse a destination that exists and is not an empty folder, or is the current folder or a mount point (the
    finished model is moved into place whole, replacing an empty folder), or cannot be looked at."""
    try:
        _check_destination(out)
    except OSError as e:  # a folder on the way that may not be searched, a name too long
        raise UsageError(f"{out}: cannot write there ({e.strerror})") from None


def _check_destination(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out}: exists and is not a folder; choose a new --out")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty; choose a new --out or remove it")
    if out.is_dir() and out.resolve() == Path.cwd().resolve():
        raise UsageError(f"{out}: is the current folder, which the finished model cannot replace; choose a new --out")
    if out.is_dir() and os.path.ismount(out):
        raise UsageError(f"{out}: is a mount point, which the finished model cannot replace; choose a new --out inside it")


class ModelFolder:
    """A model folder being written; `commit()` makes it appear at its destination, whole.

    Use as a context manager: leaving the block without `commit()` (an error, an interrupt) removes
    everything written, and the folders made to hold `out`.
    """

    def __init__(self, out: Path) -> None:
        check_destination(out)
        self.out = out
        self._made = [parent for parent in out.parents if not parent.exists()]
        """The folders above `out` that this one makes, nearest first."""
        self._committed = False
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.ftaudit-partial-", dir=out.parent))
            umask = os.umask(0)
            os.umask(umask)
            self.path.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the model folder is not
        except OSError as e:
            self._remove_made()
            raise UsageError(f"{out}: cannot write there ({e.strerror})") from None

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if not self._committed:
            self._remove_made()

    def _remove_made(self) -> None:
        """Remove the folders made to hold `out`, those still empty."""
        for parent in self._made:
            with contextlib.suppress(OSError):  # another process may have put something there meanwhile
                parent.rmdir()

    def commit(self) -> None:
        """Move the finished folder to its destination (an empty folder there is replaced)."""
        check_destination(self.out)
        try:
            if self.out.is_dir():
                self.out.rmdir()
            os.replace(self.path, self.out)
        except OSError as e:
            raise UsageError(f"{self.out}: cannot move the finished model there ({e.strerror})") from None
        self._committed = True

    @contextmanager
    def _file(self, name: str) -> Iterator[BinaryIO]:
        """A new file of the folder, synced to disk when the block ends; OSError becomes one clear error."""
        path = (self.path / name).resolve()
        if not path.is_relative_to(self.path.resolve()):
            raise InvalidWeightsError(f"file name {name!r} points outside the model folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UsageError(f"{self.out}: cannot write {name} ({e.strerror or e})") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        with self._file(name) as f:
            f.write(data)

    def copy_file(self, storage: Storage, name: str) -> None:
        """Copy one file of `storage` unchanged."""
        with self._file(name) as f:
            _copy_range(storage, name, 0, storage.size(name), f)

    def write_safetensors(self, storage: Storage, name: str, replace: Replace, done: Callable[[str], None],
                          added: Sequence[TensorInfo] = ()) -> None:
        """Copy safetensors file `name`, with the tensors `replace` gives re-encoded, then the tensors `added` after its
        own (entries of a dtype, a shape and a size, whose values `replace` gives); `done(tensor)` after each."""
        header = read_header(storage, name)
        with self._file(name) as f:
            f.write(appended_header(header, list(added)) if added else storage.read(name, 0, header.data_start))
            for info in sorted(header.tensors.values(), key=lambda t: t.start):
                new = replace(info)
                if new is None:
                    _copy_range(storage, name, info.start, info.nbytes, f)
                else:
                    f.write(encode(new, info))
                done(info.name)
            for info in added:
                value = replace(info)
                if value is None:
                    raise ValueError(f"no value for the added tensor {info.name!r}")
                f.write(encode(value, info))
                done(info.name)


def encode(tensor: torch.Tensor, info: TensorInfo) -> bytes:
    """The stored bytes of `tensor`, which must have the entry's dtype and shape."""
    if FLOAT_DTYPES.get(info.dtype) != tensor.dtype or tuple(tensor.shape) != info.shape:
        raise InvalidWeightsError(
            f"tensor {info.name!r}: new value is {tensor.dtype} {list(tensor.shape)}, the file holds "
            f"{info.dtype} {list(info.shape)}"
        )
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _copy_range(storage: Storage, name: str, start: int, length: int, f: BinaryIO) -> None:
    for offset in range(start, start + length, CHUNK_BYTES):
        f.write(storage.read(name, offset, min(CHUNK_BYTES, start + length - offset)))
