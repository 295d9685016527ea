"""Analysing several matrix pairs at once on a CPU, where one pair cannot keep every core busy.

LAPACK's eigensolvers scale poorly across threads on matrices a few hundred wide: on two cores a
384-wide float64 eigh takes 17 ms on one thread and 14 ms on two. Below PARALLEL_MAX_DIM, ftaudit
therefore gives each core its own pair, each with one torch thread; above it, and on a GPU, pairs go
one at a time with every thread on each.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import TypeVar

import torch

PARALLEL_MAX_DIM = 1024
"""Pairs whose smaller side is at most this wide are analysed one per core; wider ones use all threads."""

T = TypeVar("T")
R = TypeVar("R")


def worker_count(device: torch.device, shapes: Sequence[tuple[int, ...]]) -> int:
    """How many pairs to analyse at once: one per torch thread on a CPU when every matrix is small."""
    if device.type != "cpu" or not shapes or max(min(s) for s in shapes) > PARALLEL_MAX_DIM:
        return 1
    return max(1, torch.get_num_threads())


@contextmanager
def threads_per_worker(workers: int) -> Iterator[None]:
    """With several workers, one torch thread each (restored afterwards); otherwise unchanged."""
    if workers <= 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_order(items: Iterable[T], work: Callable[[T], R], workers: int) -> Iterator[R]:
    """work(item) for each item, in the items' order, computed on `workers` threads.

    An item is drawn only when a worker is free, and only results are handed back, so at most
    `workers` items are held at once: memory stays bounded by the largest few. An exception in
    `work` is raised when its item's turn comes.
    """
    if workers <= 1:
        yield from map(work, items)
        return
    source = iter(items)
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftaudit-analyse") as pool:
        try:
            while True:
                pending.extend(pool.submit(work, item) for item in islice(source, workers - len(pending)))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
