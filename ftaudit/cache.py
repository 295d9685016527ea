"""The base-spectrum cache: a base matrix's singular basis, computed once and reused.

Entries are keyed by a digest of the base tensor's stored bytes (with its dtype, shape and the
algorithm version; `digest`, hashed on all cores), so the same base weights hit the cache whether
they come from a Hub commit or a local folder, and changed weights can never hit a stale entry.
Each entry is a safetensors file written atomically (temporary file + rename) with a digest of its
payload, verified on read; a corrupt entry is recomputed. The directory is size-capped: entries of
earlier audits go least recently used first; an audit never evicts its own, and keeps those that
fit when they alone exceed the cap (so that repeated audits of a base larger than the cap still
hit most entries).
Entries are written by a background thread, so that the audit goes on (and a GPU stays busy) while
they are serialised, digested and written; at most PENDING wait at once, and `flush` (called at the
end of every audit, and on leaving a `with` block) waits until all are on disk.
A cache that cannot be written is skipped with one warning: the audit goes on without it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from ftaudit.digest import digest
from ftaudit.errors import InvalidWeightsError
from ftaudit.sources import safetensors as format_
from ftaudit.spectral import Basis

log = logging.getLogger("ftaudit")

ALGORITHM = "gram-eigh/f32-basis/6"
"""Changes whenever what is stored, or how it is computed, changes."""
DEFAULT_MAX_BYTES = 20 * 1024**3
PENDING = 1
"""Computed bases waiting for the writer at most, besides the one being written: `put` waits beyond."""
ENTRY_NAME = re.compile(r"[0-9a-f]{64}")
"""The stem of an entry's file name (a key); eviction touches no other file of the directory."""


def default_dir() -> Path:
    """FTAUDIT_CACHE, else the user's cache directory."""
    if os.environ.get("FTAUDIT_CACHE"):
        return Path(os.environ["FTAUDIT_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ftaudit" / "spectra"


def tensor_key(w: torch.Tensor) -> str:
    """Digest of the tensor's stored bytes, dtype, shape and the algorithm version."""
    return digest(f"{ALGORITHM}|{w.dtype}|{tuple(w.shape)}", [w.cpu()])


def _load(f: io.BufferedReader, info: format_.TensorInfo) -> torch.Tensor:
    """One tensor of a validated entry, read into memory allocated as a computed basis's is (the
    float64 products with it then round exactly as with a freshly computed one)."""
    dtype = format_.FLOAT_DTYPES.get(info.dtype)
    if dtype is None:
        raise InvalidWeightsError(f"tensor {info.name!r}: dtype {info.dtype} is not a float dtype")
    tensor = torch.empty(info.shape, dtype=dtype)
    f.seek(info.start)
    if f.readinto(tensor.view(torch.uint8).reshape(-1).numpy().data) != info.nbytes:
        raise InvalidWeightsError(f"tensor {info.name!r}: truncated")
    return tensor


def _payload(basis: Basis) -> dict[str, torch.Tensor]:
    """The tensors an entry holds: the vectors, as "V" for a basis held by its right vectors, else "U", and "S"."""
    return {"V" if basis.right else "U": basis.vectors.cpu().contiguous(), "S": basis.S.cpu().contiguous()}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    names = sorted(tensors)
    return digest("|".join(f"{n}:{tensors[n].dtype}:{tuple(tensors[n].shape)}" for n in names), [tensors[n] for n in names])


def flushed(cache: SpectrumCache | None) -> AbstractContextManager[object]:
    """A block at whose end everything put in `cache` (if any) is written."""
    return nullcontext() if cache is None else cache


class SpectrumCache:
    """A directory of cached base bases (`Basis`)."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._disabled = False
        self._full = False
        self._used: set[Path] = set()
        """Entries this audit has read or written: never evicted by it, so an audit larger than the
        cap keeps what fits instead of evicting its own entries in a cycle that no later audit could hit."""
        self._lock = threading.Condition()  # audits analyse several pairs at once on CPU threads
        self._pending: dict[str, Basis] = {}
        """Put and not yet written, oldest first, the first one being written: `get` answers from here.
        A writer thread runs exactly while this is not empty."""
        self._failure: BaseException | None = None

    def __enter__(self) -> SpectrumCache:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Flush; with an exception on its way out, only wait for the writer (raising nothing of its own)."""
        if kind is None:
            self.flush()
        else:
            self._written()

    def get(self, key: str) -> Basis | None:
        """The cached basis for `key`, verified, or None (counted as a hit or a miss)."""
        with self._lock:
            found = self._pending.get(key)
        found = found if found is not None else self._read(key)
        with self._lock:
            self.hits += found is not None
            self.misses += found is None
        return found

    def put(self, key: str, basis: Basis) -> None:
        """Store `basis` for `key`, within the cap, in the background (waits while PENDING are queued)."""
        with self._lock:
            self._lock.wait_for(lambda: len(self._pending) <= PENDING)
            if self._disabled or self._full:
                return
            idle = not self._pending
            self._pending[key] = basis
            if idle:
                threading.Thread(target=self._write_pending, name="ftaudit-cache", daemon=True).start()

    def flush(self) -> None:
        """Wait until every entry put is written (or given up); raise what the writer failed with."""
        self._written()
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _written(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: not self._pending)

    def _write_pending(self) -> None:
        while self._write_oldest():
            pass

    def _write_oldest(self) -> bool:
        """Write the oldest pending entry; whether any is left (if not, the thread ends)."""
        with self._lock:
            key = next(iter(self._pending))
            basis = self._pending[key]
        try:
            self._write(key, basis)
        except BaseException as e:  # not a full or read-only disk (handled): raised by `flush`
            self._failure = self._failure or e
        del basis  # let go of it before `flush` can return
        with self._lock:
            del self._pending[key]
            self._lock.notify_all()
            return bool(self._pending)

    def get_or_compute(self, key: str, compute: Callable[[], Basis]) -> Basis:
        """The cached basis for `key`, or `compute()`'s, stored for next time."""
        found = self.get(key)
        if found is not None:
            return found
        basis = compute()
        self.put(key, basis)
        return basis

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> Basis | None:
        path = self._path(key)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                try:
                    n = format_.header_length(f.read(8), size, path.name)
                    header = format_.parse_header(f.read(n), size, path.name)
                    tensors = {name: _load(f, info) for name, info in header.tensors.items()}
                    right = "V" in tensors
                    basis = Basis(tensors["V" if right else "U"], tensors["S"], right)
                    valid = set(tensors) in ({"U", "S"}, {"V", "S"}) and _checksum(tensors) == header.metadata.get("digest")
                except (InvalidWeightsError, KeyError):
                    valid = False
        except OSError:
            return None
        if not valid:
            log.warning("cache entry %s is corrupt; recomputing it", path.name)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        with self._lock:
            self._used.add(path)
        return basis

    def _write(self, key: str, basis: Basis) -> None:
        if self._disabled or self._full:
            return
        path = self._path(key)
        tensors = _payload(basis)
        header = format_.encode_header(tensors, {"digest": _checksum(tensors), "algorithm": ALGORITHM})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:  # the tensors' own memory, not a serialised copy
                    f.write(header)
                    for t in tensors.values():
                        f.write(t.view(torch.uint8).reshape(-1).numpy().data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            with self._lock:
                self._used.add(path)
                self._evict(path)
        except OSError as e:
            self._disabled = True
            log.warning("cache %s is not writable (%s); going on without it", self.directory, e.strerror or e)

    def _evict(self, written: Path) -> None:
        """Remove least recently used entries of earlier audits until the cache fits its cap; when
        this audit's own entries exceed it, drop the one just `written` and keep no more. Only
        entries count and go: other files in the directory (a model's folder) are left alone."""
        entries, total = [], 0
        for p in self.directory.glob("??/*.safetensors"):
            if not (ENTRY_NAME.fullmatch(p.stem) and p.parent.name == p.stem[:2]):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            total += st.st_size
            if p not in self._used:
                entries.append((st.st_mtime, st.st_size, p))
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
        if total > self.max_bytes:
            written.unlink(missing_ok=True)
            self._used.discard(written)
            self._full = True
            log.warning("cache %s is full (cap %.1f GiB): this audit's further base spectra are not kept; "
                        "raise --cache-size to keep them all", self.directory, self.max_bytes / 1024**3)
