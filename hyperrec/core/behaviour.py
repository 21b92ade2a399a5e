"""How user events turn into profile state: engagement weights, time-decayed category affinities, counters.

One definition for every place that builds profiles: the in-process store applies
`apply_events` directly, the Redis store's Lua script (hyperrec/profiles/scripts.py)
performs the same arithmetic in the same order (a contract test compares them), and
the trainers replay logged events through `apply_events` to compute the same
behaviour features a live profile yields at request time.

Affinities are order-independent: the value kept for a category is the sum of
w_i * 2^(-(t_ref - t_i) / half_life) over its events, referred to t_ref, the time
of its latest event; reading it at another time multiplies by one more decay factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from hyperrec.core.domain import EventType
from hyperrec.core.profile import CategoryAffinity, Profile, ProfileSettings, StoredEvent

# Engagement weight of one event by type: how strongly it says "more like this".
EVENT_WEIGHTS: Mapping[EventType, float] = {
    EventType.VIEW: 1.0,
    EventType.CLICK: 2.0,
    EventType.LIKE: 4.0,
    EventType.SHARE: 5.0,
    EventType.ADD_TO_CART: 6.0,
    EventType.PURCHASE: 10.0,
}
DWELL_UNIT_MS = 30_000.0  # 30 s of dwell weighs as much as a view
DWELL_CAP = 4.0  # dwell beyond two minutes (idle tabs) counts as two minutes
RATING_UNIT = 2.5  # a 5-star rating weighs 2, a 2.5-star one 1


def engagement_weight(event_type: EventType, value: float) -> float:
    """Weight of one event: fixed per type, from the dwell time (capped) or from the rating."""
    if event_type == EventType.DWELL:
        return min(max(value, 0.0) / DWELL_UNIT_MS, DWELL_CAP)
    if event_type == EventType.RATING:
        return value / RATING_UNIT
    return EVENT_WEIGHTS[event_type]


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    """2^(-elapsed / half_life): the share of a weight left after `elapsed_s` seconds."""
    return math.pow(2.0, -elapsed_s / half_life_s)


def add_to_affinity(stat: CategoryAffinity | None, weight: float, at: float, half_life_s: float) -> CategoryAffinity:
    """The category's affinity after one more event of `weight` at `at` (events may arrive out of order)."""
    if stat is None:
        return CategoryAffinity(weight, at)
    if at >= stat.at:
        return CategoryAffinity(stat.weight * decay_factor(at - stat.at, half_life_s) + weight, at)
    return CategoryAffinity(stat.weight + weight * decay_factor(stat.at - at, half_life_s), stat.at)


def apply_events(profile: Profile | None, events: Sequence[StoredEvent], settings: ProfileSettings) -> Profile:
    """The profile after `events`, in the given order (duplicates already removed).

    Recent items: newest arrival first, capped at `recent_limit`, each with its engagement weight.
    The user vector is left as it is; the ingest path refolds it from the new recent items.
    """
    base = profile or Profile()
    recent = list(zip(base.recent_items, base.weights_of_recent(), strict=True))
    categories = dict(base.categories)
    counts = dict(base.event_counts)
    last_seen = base.last_seen
    for event in events:
        recent.insert(0, (event.item_id, event.weight))
        for name in event.categories:
            categories[name] = add_to_affinity(categories.get(name), event.weight, event.at, settings.half_life_s)
        key = event.event_type.name.lower()
        counts[key] = counts.get(key, 0) + 1
        last_seen = max(last_seen, event.at)
    recent = recent[: settings.recent_limit]
    return replace(
        base,
        recent_items=tuple(item for item, _ in recent),
        recent_weights=tuple(weight for _, weight in recent),
        categories=categories,
        event_counts=counts,
        last_seen=last_seen,
    )


def replay(events: Iterable[StoredEvent], settings: ProfileSettings) -> Profile:
    """A profile built from nothing by `events` in order (backfill and training use this)."""
    return apply_events(None, list(events), settings)


# --- Behaviour features: what the ranker sees of a user's category affinities, per candidate item -----------

BEHAVIOUR_FEATURES = ("log_category_affinity", "category_affinity_share", "log_days_since_category")
DAY_S = 86_400.0


def affinity_arrays(
    categories: Mapping[str, CategoryAffinity], index: Mapping[str, int], n_categories: int
) -> tuple[np.ndarray, np.ndarray]:
    """A profile's affinities as arrays over a category vocabulary: weights (0 where none) and their reference
    times (NaN where none). Categories outside the vocabulary are ignored."""
    weights = np.zeros(n_categories, dtype=np.float64)
    times = np.full(n_categories, np.nan, dtype=np.float64)
    for name, stat in categories.items():
        column = index.get(name)
        if column is not None:
            weights[column], times[column] = stat.weight, stat.at
    return weights, times


def behaviour_raw(
    weights: np.ndarray, times: np.ndarray, now: np.ndarray, item_categories: np.ndarray, half_life_s: float
) -> np.ndarray:
    """Untransformed behaviour features [users, n, 3] of candidate items for users at `now` [users].

    weights, times: [users, C] from `affinity_arrays` (or a replay of logged events in training);
    item_categories: [users, n, m] category columns of each candidate, -1 padding.
    Columns: log1p of the user's decayed affinity summed over the item's categories; that sum's share of the
    user's total affinity (0 for a user without any); log1p of days since the user's latest event in any of the
    item's categories (NaN when none: imputed by the transform).
    """
    now = np.asarray(now, dtype=np.float64)[:, None]
    known = np.isfinite(times)
    elapsed = np.where(known, np.maximum(now - np.where(known, times, 0.0), 0.0), 0.0)
    decayed = np.where(known, weights * np.power(2.0, -elapsed / half_life_s), 0.0)  # [users, C]
    padded = np.concatenate([decayed, np.zeros((len(decayed), 1))], axis=1)  # column C stands for "no category"
    last = np.concatenate([np.where(known, times, -np.inf), np.full((len(times), 1), -np.inf)], axis=1)
    columns = np.where(item_categories >= 0, item_categories, decayed.shape[1])
    rows = np.arange(len(decayed))[:, None, None]
    summed = padded[rows, columns].sum(axis=2)  # [users, n]
    total = decayed.sum(axis=1, keepdims=True)
    share = np.divide(summed, total, out=np.zeros_like(summed), where=total > 0)
    latest = last[rows, columns].max(axis=2)
    days = np.where(
        np.isfinite(latest), np.maximum(now - np.where(np.isfinite(latest), latest, 0.0), 0.0) / DAY_S, np.nan
    )
    return np.stack([np.log1p(summed), share, np.log1p(days)], axis=2)
