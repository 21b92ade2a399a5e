"""Train / validation / test splits of an interaction log, built so that nothing leaks from the future.

Every split keeps the user index space and the catalogue of its input, so the three parts can be compared
index for index. Anything learned from data (popularity, co-occurrence, negatives, features, factors) must
come from `Split.train` only: the helpers here and in `hyperrec.training.baselines` take the train `Interactions`
explicitly, never a whole `Split`, so that reading validation or test data by accident takes a visible step.

- `temporal_split`: global time cut-offs; the realistic "train on the past, predict the future" setting.
  Test users may have no train history at all (cold users).
- `leave_last_out_split`: each user's last events are held out; every evaluated user has a history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hyperrec.training.interactions import Interactions

Description = dict[str, str | int | float]


@dataclass(frozen=True)
class Split:
    """Three disjoint parts of one log over the same users and catalogue, with how they were made."""

    train: Interactions
    validation: Interactions
    test: Interactions
    description: Description = field(default_factory=dict)


def _check_fraction(name: str, value: float) -> None:
    """Reject fractions outside [0, 1): a bad fraction would silently produce an empty or overlapping part."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _cut_time(sorted_timestamps: npt.NDArray[np.int64], position: int) -> int:
    """The timestamp at `position` of a sorted column; one past the last time when `position` is past the end."""
    if position >= len(sorted_timestamps):
        return int(sorted_timestamps[-1]) + 1 if len(sorted_timestamps) else 0
    return int(sorted_timestamps[position])


def _sizes(split_parts: tuple[Interactions, Interactions, Interactions]) -> Description:
    """Event and user counts per part, for the split description."""
    out: Description = {}
    for name, part in zip(("train", "validation", "test"), split_parts, strict=True):
        out[f"{name}_events"] = len(part)
        out[f"{name}_users"] = int(np.unique(part.user).size)
    return out


def temporal_split(data: Interactions, validation_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """Split at two global times t1 <= t2: train = events before t1, validation = [t1, t2), test = from t2 on.

    The cut-offs are the event-time quantiles at 1 - validation - test and 1 - test, so the part sizes match
    the fractions up to ties (all events sharing a timestamp land in the same part). Because the cut is
    global, every train event is strictly earlier than every validation event, which is strictly earlier
    than every test event, for all users together.
    """
    _check_fraction("validation_fraction", validation_fraction)
    _check_fraction("test_fraction", test_fraction)
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError("validation_fraction + test_fraction must leave some data for training")
    ts = data.timestamp  # rows are sorted by time, so this column is sorted
    n = len(ts)
    t1 = _cut_time(ts, round(n * (1.0 - validation_fraction - test_fraction)))
    t2 = _cut_time(ts, round(n * (1.0 - test_fraction)))
    parts = (data.subset(ts < t1), data.subset((ts >= t1) & (ts < t2)), data.subset(ts >= t2))
    description: Description = {
        "kind": "temporal",
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "validation_start": t1,
        "test_start": t2,
        **_sizes(parts),
    }
    return Split(*parts, description=description)


def _rank_from_end(data: Interactions) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For each row, how many later events its user has (0 = the user's last), and the user's event count.

    Rows are sorted by (time, user, item), so a stable sort by user keeps each user's events in time order.
    """
    order = np.argsort(data.user, kind="stable")
    counts = np.bincount(data.user, minlength=data.n_users).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    position_sorted = np.arange(len(order), dtype=np.int64) - starts[data.user[order]]
    position = np.empty_like(position_sorted)
    position[order] = position_sorted
    per_row_count = counts[data.user]
    return per_row_count - 1 - position, per_row_count


def leave_last_out_split(data: Interactions, n_validation: int = 1, n_test: int = 1, min_train: int = 1) -> Split:
    """Per user: the last `n_test` events go to test, the `n_validation` before them to validation.

    A user with fewer than `min_train + n_validation + n_test` events keeps all of them in train, so every
    user who is evaluated has at least `min_train` train events. "Last" follows the log's row order (time,
    then user, then item), so for each user every train time <= every validation time <= every test time;
    events sharing a timestamp may fall on either side of a boundary (ties are not future information).
    """
    if n_validation < 0 or n_test < 0 or min_train < 1:
        raise ValueError("n_validation and n_test must be >= 0 and min_train >= 1")
    rank, count = _rank_from_end(data)
    eligible = count >= min_train + n_validation + n_test
    is_test = eligible & (rank < n_test)
    is_validation = eligible & (rank >= n_test) & (rank < n_test + n_validation)
    parts = (data.subset(~(is_test | is_validation)), data.subset(is_validation), data.subset(is_test))
    description: Description = {
        "kind": "leave_last_out",
        "n_validation": n_validation,
        "n_test": n_test,
        "min_train": min_train,
        "held_out_users": int(np.unique(data.user[eligible]).size),
        **_sizes(parts),
    }
    return Split(*parts, description=description)


def filter_min_history(data: Interactions, min_events: int) -> Interactions:
    """Drop the events of users with fewer than `min_events` events.

    The user index space is kept as it is (`user_ids` unchanged, dropped users simply have no events), so
    indexes stay comparable with the unfiltered log and with any split made from it.
    """
    counts = np.bincount(data.user, minlength=data.n_users)
    return data.subset(counts[data.user] >= min_events)


def concatenate(first: Interactions, second: Interactions) -> Interactions:
    """All events of two logs over the same users and catalogue, re-sorted by time."""
    if first.user_ids != second.user_ids or first.catalog != second.catalog:
        raise ValueError("can only concatenate logs over the same users and catalogue")
    return Interactions.build(
        first.user_ids,
        first.catalog,
        np.concatenate((first.user, second.user)),
        np.concatenate((first.item, second.item)),
        np.concatenate((first.timestamp, second.timestamp)),
        np.concatenate((first.event_type, second.event_type)),
        np.concatenate((first.value, second.value)),
    )


def training_view(split: Split, with_validation: bool = False) -> Interactions:
    """The events a model may learn from: train, or train + validation for the final fit before testing.

    Use `with_validation=True` only once hyperparameters are chosen on validation; the test part is never
    part of a training view.
    """
    return concatenate(split.train, split.validation) if with_validation else split.train


def seen_items(train: Interactions) -> list[npt.NDArray[np.int64]]:
    """For each user index, the distinct items of their train events (sorted): what evaluation excludes."""
    return [np.unique(items) for items in train.items_by_user()]
