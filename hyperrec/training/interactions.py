"""The in-memory form of an interaction log, shared by loaders, splits, features, models and evaluation.

Users and items are dense int64 indexes into `user_ids` and `catalog.item_ids`
(the raw ids, as strings, are kept verbatim: never narrowed or re-parsed).
Rows are sorted by (timestamp, user, item) so "the past" is always a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# Event types a log may carry; `rating` is an explicit rating whose value is the rating.
EVENT_TYPES: tuple[str, ...] = ("view", "click", "like", "share", "add_to_cart", "purchase", "dwell", "rating")
EVENT_CODE: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}


class DataError(ValueError):
    """A malformed input row: names the file, the 1-based line and the reason."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class ItemCatalog:
    """Items in index order with their metadata. Items may have no interactions at all."""

    item_ids: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]
    titles: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.item_ids) == len(self.categories) == len(self.titles)):
            raise ValueError("item_ids, categories and titles must have one entry per item")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def category_vocabulary(self) -> tuple[str, ...]:
        """All category names, sorted."""
        return tuple(sorted({c for cats in self.categories for c in cats}))


@dataclass
class LoadReport:
    """What a loader read, kept and dropped (with a count per reason)."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass(frozen=True)
class Interactions:
    """An interaction log over a catalogue. Arrays are aligned, one entry per event."""

    user_ids: tuple[str, ...]
    catalog: ItemCatalog
    user: npt.NDArray[np.int64]
    item: npt.NDArray[np.int64]
    timestamp: npt.NDArray[np.int64]  # unix seconds, UTC
    event_type: npt.NDArray[np.int8]  # index into EVENT_TYPES
    value: npt.NDArray[np.float32]  # rating, dwell milliseconds...; NaN when the event has none

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    def __len__(self) -> int:
        return len(self.user)

    @staticmethod
    def build(
        user_ids: Sequence[str],
        catalog: ItemCatalog,
        user: npt.ArrayLike,
        item: npt.ArrayLike,
        timestamp: npt.ArrayLike,
        event_type: npt.ArrayLike,
        value: npt.ArrayLike,
    ) -> Interactions:
        """Check shapes and index ranges, then sort rows by (timestamp, user, item)."""
        u = np.asarray(user, dtype=np.int64)
        i = np.asarray(item, dtype=np.int64)
        ts = np.asarray(timestamp, dtype=np.int64)
        et = np.asarray(event_type, dtype=np.int8)
        val = np.asarray(value, dtype=np.float32)
        if not (len(u) == len(i) == len(ts) == len(et) == len(val)):
            raise ValueError("event columns must have equal length")
        if len(u) and (u.min() < 0 or u.max() >= len(user_ids) or i.min() < 0 or i.max() >= len(catalog)):
            raise ValueError("user or item index out of range")
        order = np.lexsort((i, u, ts))
        return Interactions(tuple(user_ids), catalog, u[order], i[order], ts[order], et[order], val[order])

    def subset(self, rows: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> Interactions:
        """The same users and catalogue, only the selected events (order kept)."""
        return Interactions(
            self.user_ids,
            self.catalog,
            self.user[rows],
            self.item[rows],
            self.timestamp[rows],
            self.event_type[rows],
            self.value[rows],
        )

    def items_by_user(self) -> list[npt.NDArray[np.int64]]:
        """For each user index, the items of their events in time order (may repeat)."""
        order = np.argsort(self.user, kind="stable")
        bounds = np.searchsorted(self.user[order], np.arange(self.n_users + 1))
        items = self.item[order]
        return [items[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]
