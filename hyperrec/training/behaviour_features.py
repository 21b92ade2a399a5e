"""Behaviour features in training: each user's category affinities replayed from the log, exactly as live.

A user's affinities just before an event are what their live profile would hold at that
moment: every earlier event applied with `hyperrec.core.behaviour.add_to_affinity` (the rule
the profile stores apply), weighted by `engagement_weight`. The per-candidate features
come from `hyperrec.core.behaviour.behaviour_raw` and `hyperrec.core.features.standardize`, the
functions the server calls, with statistics fitted here on the train split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hyperrec.core.behaviour import (
    BEHAVIOUR_FEATURES,
    add_to_affinity,
    affinity_arrays,
    behaviour_raw,
    engagement_weight,
)
from hyperrec.core.bundle import Categories
from hyperrec.core.domain import EventType
from hyperrec.core.features import standardize
from hyperrec.core.profile import CategoryAffinity
from hyperrec.training.interactions import EVENT_TYPES, Interactions
from hyperrec.training.item_features import fit_stats

#: The domain event type of each training event code (index into EVENT_TYPES).
EVENT_TYPE_OF_CODE = [EventType[name.upper()] for name in EVENT_TYPES]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def event_weights(log: Interactions) -> FloatArray:
    """Engagement weight of every event of the log (the live rule; a missing value counts as 0)."""
    values = np.nan_to_num(log.value.astype(np.float64), nan=0.0)
    return np.array(
        [engagement_weight(EVENT_TYPE_OF_CODE[t], float(v)) for t, v in zip(log.event_type, values, strict=True)],
        dtype=np.float64,
    )


def category_columns(item_categories: Sequence[Sequence[str]]) -> Categories:
    """The vocabulary and per-item category columns exactly as a bundle built from the same catalogue has them."""
    return Categories.build(item_categories, np.zeros((len(item_categories), 1), dtype=np.float32))


def replay_states(
    log: Interactions, columns: Categories, half_life_s: float, before_rows: IntArray | None = None
) -> tuple[FloatArray, FloatArray]:
    """Affinity arrays (weights, reference times) [len(before_rows), C] of each row's user just before that row's
    event; with `before_rows` None, of every user [users, C] after all their events."""
    n_cat = len(columns.names)
    index = columns.index
    weights = event_weights(log)
    wanted = {} if before_rows is None else {int(r): i for i, r in enumerate(before_rows)}
    size = log.n_users if before_rows is None else len(before_rows)
    out_w = np.zeros((size, n_cat), dtype=np.float64)
    out_t = np.full((size, n_cat), np.nan, dtype=np.float64)
    order = np.lexsort((np.arange(len(log)), log.timestamp, log.user))  # per user in time (then log) order
    bounds = np.searchsorted(log.user[order], np.arange(log.n_users + 1))
    for user in range(log.n_users):
        state: dict[str, CategoryAffinity] = {}
        for row in order[bounds[user] : bounds[user + 1]]:
            slot = wanted.get(int(row))
            if slot is not None:
                out_w[slot], out_t[slot] = affinity_arrays(state, index, n_cat)
            at = float(log.timestamp[row])
            for column in columns.columns[log.item[row]]:
                if column >= 0:
                    name = columns.names[column]
                    state[name] = add_to_affinity(state.get(name), float(weights[row]), at, half_life_s)
        if before_rows is None:
            out_w[user], out_t[user] = affinity_arrays(state, index, n_cat)
    return out_w, out_t


@dataclass(frozen=True)
class BehaviourFeatures:
    """Everything to compute transformed behaviour features for (user state, time, candidates)."""

    columns: Categories
    half_life_s: float
    stats: Mapping[str, Mapping[str, float]]

    @property
    def width(self) -> int:
        return len(BEHAVIOUR_FEATURES)

    def features(
        self, weights: FloatArray, times: FloatArray, now: npt.ArrayLike, candidates: IntArray
    ) -> npt.NDArray[np.float32]:
        """[users, n, 3] for candidate item indexes [users, n] at `now` [users]."""
        raw = behaviour_raw(weights, times, np.asarray(now), self.columns.columns[candidates], self.half_life_s)
        return standardize(raw, self.stats, BEHAVIOUR_FEATURES)


def fit_behaviour_features(
    train: Interactions,
    item_categories: Sequence[Sequence[str]],
    half_life_s: float,
    sample_events: int = 5000,
    items_per_event: int = 20,
    seed: int = 0,
) -> BehaviourFeatures:
    """Fit caps, means and standard deviations on the most recent train events: each event's item and random
    catalogue items, with the user's state just before the event."""
    if not (math.isfinite(half_life_s) and half_life_s > 0):
        raise ValueError("half_life_s must be positive")
    columns = category_columns(item_categories)
    rows = np.arange(max(len(train) - sample_events, 0), len(train), dtype=np.int64)
    rng = np.random.default_rng(seed)
    candidates = np.concatenate(
        [train.item[rows][:, None], rng.integers(0, train.n_items, (len(rows), items_per_event))], axis=1
    )
    weights, times = replay_states(train, columns, half_life_s, rows)
    raw = behaviour_raw(
        weights, times, train.timestamp[rows].astype(np.float64), columns.columns[candidates], half_life_s
    )
    stats = fit_stats(raw.reshape(-1, raw.shape[2]))
    named = {
        name: {"cap": c, "mean": m, "std": s}
        for name, c, m, s in zip(BEHAVIOUR_FEATURES, stats.cap, stats.mean, stats.std, strict=True)
    }
    return BehaviourFeatures(columns, half_life_s, named)
