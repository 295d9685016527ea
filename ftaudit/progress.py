"""Progress of long work on stderr: on a terminal a bar naming the current tensor; elsewhere (a CI log) a line now
and then."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import click

from ftaudit.audit import Progress
from ftaudit.fix import Phases
from ftaudit.secrets import mask_shapes

LINE_EVERY = 30.0
"""Seconds between two progress lines where stderr is not a terminal: work shorter than this prints none."""

BAR_WIDTH = 20
NAME_WIDTH = 32
"""Columns of a bar, and characters of the current tensor's name shown beside it and its count."""

log = logging.getLogger("ftaudit")


def progress_display(label: str, unit: str = "matrices") -> tuple[Progress, Callable[[], None]]:
    """The progress callback of one piece of work (`label`, counted in `unit`), and what ends its display."""
    return _bar(label) if sys.stderr.isatty() else _lines(label, unit)


def phase_displays() -> tuple[Phases, Callable[[], None]]:
    """One display per phase of a fix, each ended when the next starts."""
    closers: list[Callable[[], None]] = []

    def close() -> None:
        while closers:
            closers.pop()()

    def phase(name: str) -> Progress:
        close()
        progress, closer = progress_display(name.capitalize(), "tensors" if name == "writing" else "matrices")
        closers.append(closer)
        return progress

    return phase, close


def _bar(label: str) -> tuple[Progress, Callable[[], None]]:
    state: dict[str, object] = {}

    def update(done: int, total: int, name: str) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, width=BAR_WIDTH,
                                    item_show_func=_current)
            bar.__enter__()
            state["bar"] = bar
        bar.update(done - bar.pos, name)  # type: ignore[attr-defined]

    def close() -> None:
        bar = state.get("bar")
        if bar is not None:
            bar.__exit__(None, None, None)  # type: ignore[attr-defined]

    return update, close


def _current(name: str | None) -> str | None:
    """The tensor being worked on, as the bar shows it: its name's end, so that the line fits an 80-column terminal,
    with anything shaped like a secret masked (names come from the files read)."""
    if not name:
        return None
    shown = mask_shapes(name)
    return shown if len(shown) <= NAME_WIDTH else "..." + shown[3 - NAME_WIDTH:]


def _lines(label: str, unit: str) -> tuple[Progress, Callable[[], None]]:
    start = time.monotonic()
    last = [start]

    def update(done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if now - last[0] < LINE_EVERY or done >= total:
            return
        last[0] = now
        elapsed = now - start
        left = elapsed / done * (total - done)
        log.info("%s: %d of %d %s after %s, about %s left", label, done, total, unit, duration(elapsed), duration(left))

    return update, lambda: None


def duration(seconds: float) -> str:
    """A duration as people read it: 45s, 3m05s, 1h02m."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole // 60 % 60:02d}m"
