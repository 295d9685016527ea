"""A cheap identity of a model's weights where no revision names them (a local folder).

The same tensors give the same fingerprint wherever, whenever and in whichever files they were
written (a fresh checkout in each CI job, new mtimes); other values, names, dtypes or shapes give
another. It reads a few KiB of each tensor, not the weights: a change confined to a few values
between the pieces it reads can go unseen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from ftaudit.sources.safetensors import TensorInfo

PIECE = 4096
"""The bytes read at the start, the middle and the end of each tensor, and of each expert's matrix of a stack."""
WHOLE = 16 * PIECE
"""A tensor (or an expert's matrix) no larger than this is read whole: one read costs about what three do."""
RUN = 16 * WHOLE
"""Adjacent pieces are read at once, up to this many bytes: a 3-D tensor of many small parts (Mamba's convolutions,
d_inner × 1 × d_conv) takes a read or a few, not one per part."""
READERS = 8
"""Reads in flight at once: a disk answers several faster than one after another."""


class Stored(Protocol):
    """Tensors whose stored bytes can be read in part."""

    @property
    def infos(self) -> dict[str, TensorInfo]: ...

    def stored_size(self, name: str) -> int: ...

    def read_stored(self, name: str, start: int, length: int) -> bytes | bytearray: ...


def fingerprint(weights: Stored, *texts: str) -> str:
    """Hex SHA-256 over `texts` (an adapter's configuration), then, by name, the SHA-256 of each tensor's name, dtype,
    shape and the bytes of its pieces."""
    infos = weights.infos
    in_file_order = sorted(infos, key=lambda name: infos[name].start)  # each file's reads go forward through it
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="ftaudit-fingerprint") as pool:
        digests = dict(zip(in_file_order, pool.map(lambda name: _tensor(weights, infos[name]), in_file_order)))
    top = hashlib.sha256(b"ftaudit weights 1\n")
    top.update(json.dumps(texts).encode())
    for name in sorted(digests):
        top.update(digests[name])
    return top.hexdigest()


def _tensor(weights: Stored, info: TensorInfo) -> bytes:
    digest = hashlib.sha256(json.dumps([info.name, info.dtype, list(info.shape)]).encode())
    size = weights.stored_size(info.name)
    # each expert's matrix of a stack, where each fills whole bytes (4-bit values may not): else the whole
    parts = info.shape[0] if len(info.shape) == 3 and info.shape[0] and size % info.shape[0] == 0 else 1
    for start, length in joined(pieces(size, parts)):
        digest.update(weights.read_stored(info.name, start, length))
    return digest.digest()


def pieces(size: int, parts: int) -> Iterator[tuple[int, int]]:
    """(start, length) of the first, middle and last PIECE bytes of each of `parts` equal parts of `size` bytes, or of
    the whole part where it is no larger than WHOLE."""
    part = size // parts
    for first in range(0, part * parts, part or 1):
        if part <= WHOLE:
            yield first, part
        else:
            yield from ((first, PIECE), (first + (part - PIECE) // 2, PIECE), (first + part - PIECE, PIECE))


def joined(reads: Iterable[tuple[int, int]], most: int = RUN) -> Iterator[tuple[int, int]]:
    """`reads` (start, length), in order, each run of adjacent ones as one read of at most `most` bytes: the same
    bytes in the same order."""
    start = length = 0
    for first, size in reads:
        if first == start + length and length + size <= most:
            length += size
            continue
        if length:
            yield start, length
        start, length = first, size
    if length:
        yield start, length
