"""Analysing several matrix pairs at once on a CPU, where one pair cannot keep every core busy.

LAPACK's eigensolvers scale poorly across threads on matrices a few hundred wide: on two cores a
384-wide float64 eigh takes 17 ms on one thread and 14 ms on two. Below PARALLEL_MAX_DIM, ftaudit
therefore gives each core its own pair, each with one torch thread; above it, and on a GPU, pairs go
one at a time with every thread on each.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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


def _one_thread() -> None:
    """A worker's own torch and BLAS thread count set to one. A new thread otherwise keeps BLAS's default (every core)
    until some torch operation large enough to be split sets it; small pairs may never reach one, so the same matrix
    would be decomposed with one or several threads, rounded differently, by where it happened to be scheduled."""
    torch.set_num_threads(1)


AHEAD = 4
"""How many items per worker may be drawn before the oldest one's result has been handed back."""


def in_order(items: Iterable[T], work: Callable[[T], R], workers: int) -> Iterator[R]:
    """work(item) for each item, in the items' order, computed on `workers` threads.

    An item is drawn whenever a worker is free, so one slow item does not hold up the rest; items
    that finish before their turn wait as results (at most AHEAD per worker), not as inputs. At
    most `workers` items are worked on at once, so memory stays bounded by the largest few. An
    exception in `work` is raised when its item's turn comes.
    """
    if workers <= 1:
        yield from map(work, items)
        return
    source = iter(items)
    order: deque[Future[R]] = deque()
    running: set[Future[R]] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftaudit-analyse", initializer=_one_thread) as pool:
        try:
            exhausted = False
            while True:
                running = {future for future in running if not future.done()}
                free = max(0, min(workers - len(running), AHEAD * workers - len(order)))
                drawn = [pool.submit(work, item) for item in islice(source, free)]
                exhausted = exhausted or len(drawn) < free
                order.extend(drawn)
                running.update(drawn)
                while order and order[0].done():
                    yield order.popleft().result()
                if order:
                    wait(running | {order[0]}, return_when=FIRST_COMPLETED)
                elif exhausted:
                    return
        finally:
            for future in order:
                future.cancel()
