"""Progress bars for long training steps: shown on a terminal, silent in tests, CI and logs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def interactive() -> bool:
    """True when stderr is a terminal a person watches."""
    return sys.stderr.isatty()


def progress(items: Iterable[T], label: str, total: int | None = None, unit: str = " it") -> Iterator[T]:
    """`items`, with a progress bar labelled `label` on an interactive terminal."""
    if not interactive():
        yield from items
        return
    yield from tqdm(items, desc=label, total=total, unit=unit, leave=False)


def counter(label: str, unit: str = " it") -> Callable[[int, int], None]:
    """A `(done, total)` callback drawing a progress bar on an interactive terminal (index builds)."""
    bar: tqdm[None] | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if not interactive():
            return
        if bar is None:
            bar = tqdm(desc=label, total=total, unit=unit, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
