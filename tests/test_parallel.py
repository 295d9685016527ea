"""Several pairs analysed at once: order, bounded memory, errors, and when it is used."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ftaudit import parallel
from ftaudit.parallel import (
    PARALLEL_MAX_DIM,
    in_order,
    threads_per_worker,
    worker_count,
)


def test_results_come_in_input_order_with_a_bounded_number_in_hand():
    drawn: list[int] = []
    running, peak = [0], [0]
    lock = threading.Lock()

    def items():
        for i in range(12):
            drawn.append(i)
            yield i

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 * (i % 3 == 0))  # every third item is slow, so later ones finish first
        with lock:
            running[0] -= 1
        return i * i

    seen = []
    for result in in_order(items(), work, workers=3):
        # Items drawn but not yet handed back: those being worked on and finished ones awaiting their turn.
        assert len(drawn) - len(seen) <= parallel.AHEAD * 3
        seen.append(result)
    assert seen == [i * i for i in range(12)]
    assert peak[0] == 3


def test_a_slow_item_does_not_hold_up_the_items_after_it():
    third_started = threading.Event()

    def work(i: int) -> int:
        if i == 3:
            third_started.set()
        if i == 0:  # finishes only once item 3 has been drawn and started on the other worker
            assert third_started.wait(timeout=10), "item 3 waited for item 0"
        return i

    assert list(in_order(range(6), work, workers=2)) == list(range(6))


def test_an_error_in_one_item_is_raised_in_its_turn():
    def work(i: int) -> int:
        if i == 4:
            raise ValueError("item 4")
        return i

    got = []
    with pytest.raises(ValueError, match="item 4"):
        for result in in_order(range(10), work, workers=2):
            got.append(result)
    assert got == [0, 1, 2, 3]


def test_one_worker_is_the_plain_loop():
    assert list(in_order(iter("abc"), str.upper, workers=1)) == ["A", "B", "C"]


def test_workers_only_for_small_matrices_on_a_cpu():
    cpu = torch.device("cpu")
    small = [(384, 384), (1536, PARALLEL_MAX_DIM)]
    assert worker_count(cpu, small) == torch.get_num_threads()
    assert worker_count(cpu, small + [(PARALLEL_MAX_DIM + 1, 4096)]) == 1
    assert worker_count(torch.device("cuda"), small) == 1
    assert worker_count(cpu, []) == 1


def test_each_worker_gets_one_torch_thread_and_the_setting_is_restored():
    before = torch.get_num_threads()
    with threads_per_worker(2):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads_per_worker(1):
        assert torch.get_num_threads() == before


def test_a_matrix_is_computed_alike_on_every_worker():
    """Each worker computes with the one thread the pairs are given, from its first item on, so a pair's numbers do
    not depend on which worker took it. A fresh thread had kept BLAS's own count (every core) until some operation
    large enough to be split set it, and a small matrix's Gram and eigenvalues then rounded differently."""
    torch.manual_seed(0)
    w = torch.randn(64, 256, dtype=torch.float64)

    def work(_: int) -> torch.Tensor:
        return torch.linalg.eigvalsh(w @ w.mT)

    with threads_per_worker(2):
        alone = work(0)
        on_workers = list(in_order(range(8), work, workers=2))
    assert all(torch.equal(values, alone) for values in on_workers)
