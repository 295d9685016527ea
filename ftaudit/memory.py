"""Keeping the process's resident memory close to what the audit actually holds.

glibc's malloc serves a large block from its own mapping and unmaps it when freed, but each such
free raises the size it calls large (up to 32 MiB). After a few upcast blocks and Gram matrices
have come and gone, blocks of that size come from the heap of whichever thread asked, and freeing
them keeps their pages resident: on a 1024-wide model analysed on two threads, 200 MiB more than
the audit holds. Fixing the threshold keeps large blocks mapped on their own.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter for the size above which a block gets its own mapping."""
LARGE_BLOCK = 4 * 1024**2
"""Blocks at least this large are mapped on their own and returned when freed. Smaller thresholds
return a little more memory but pay a page fault per page of every fresh block."""


def return_large_blocks() -> None:
    """Fix malloc's threshold for large blocks at LARGE_BLOCK where the C library is glibc; elsewhere, nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)
