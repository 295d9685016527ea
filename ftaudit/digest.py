"""Content digests of large buffers, hashed in pieces on every core.

A digest is SHA-256 over a label and the SHA-256 of each PIECE-byte piece of each buffer, in order
(a two-level hash tree). hashlib lets go of the GIL while it hashes, so the pieces of a
multi-gigabyte model are hashed on all cores at once instead of at one core's ~1 GB/s.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

PIECE = 16 * 2**20

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hashers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="ftaudit-digest")
        return _pool


def digest(label: str, tensors: list[torch.Tensor]) -> str:
    """Hex SHA-256 over `label` and the bytes of `tensors` (CPU), in pieces hashed in parallel."""
    views = [t.detach().contiguous().view(torch.uint8).reshape(-1).numpy().data for t in tensors]
    pieces = [(view, start) for view in views for start in range(0, len(view), PIECE)]
    top = hashlib.sha256(label.encode())
    top.update(len(views).to_bytes(8, "little"))
    for view in views:
        top.update(len(view).to_bytes(8, "little"))
    for piece_digest in _hashers().map(lambda p: hashlib.sha256(p[0][p[1] : p[1] + PIECE]).digest(), pieces):
        top.update(piece_digest)
    return top.hexdigest()
