"""Per-item ranker features: popularity, momentum and age as of a moment, plus category metadata.

Numeric features for item i at time t use only events strictly before t, so a
training example never sees its own future. They are capped at the 99th
percentile, missing values (an item nobody has touched yet) are imputed with
the cap, and each column is standardised; the caps, means and standard
deviations are fitted once, on the train part, and travel in the bundle's
feature spec. The bundle stores the transformed matrix as of its training
cut-off, which the server gathers per candidate as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hyperrec.core.features import standardize
from hyperrec.training.interactions import Interactions

DAY = 86_400
RECENT_DAYS = 30
NUMERIC = ("log_count", f"log_count_{RECENT_DAYS}d", "log_days_since_first", "log_days_since_last")
_SPAN = 1 << 33  # unix seconds fit below this until the year 2242
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class NumericStats:
    """Cap, mean and standard deviation per numeric column, fitted on the train part."""

    cap: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, dict[str, float]]:
        return {
            name: {"cap": c, "mean": m, "std": s}
            for name, c, m, s in zip(NUMERIC, self.cap, self.mean, self.std, strict=True)
        }


class ItemHistory:
    """Answers "what did item i look like at time t" from one log, with events strictly before t."""

    def __init__(self, log: Interactions) -> None:
        order = np.lexsort((log.timestamp, log.item))
        self._items = log.item[order]
        self._times = log.timestamp[order]
        self._start = np.searchsorted(self._items, np.arange(log.n_items + 1))
        self._keys = self._items * _SPAN + self._times  # sorted: by item, then time
        self.n_items = log.n_items
        self.end = int(log.timestamp.max()) + 1 if len(log) else 0

    def _before(self, items: IntArray, at: IntArray) -> IntArray:
        """Events of each item strictly before its time (one vectorised search over (item, time) keys)."""
        clipped = np.clip(at, 0, _SPAN - 1)
        found: IntArray = np.searchsorted(self._keys, items * _SPAN + clipped, side="left") - self._start[items]
        return found

    def raw(self, items: IntArray, at: IntArray) -> FloatArray:
        """Untransformed numeric features [len(items), len(NUMERIC)]; NaN where the item has no earlier event."""
        items = np.asarray(items, dtype=np.int64)
        at = np.asarray(at, dtype=np.int64)
        count = self._before(items, at)
        recent = count - self._before(items, at - RECENT_DAYS * DAY)
        seen = count > 0
        first = np.where(seen, self._times[np.minimum(self._start[items], len(self._times) - 1)], 0)
        last = np.where(seen, self._times[np.maximum(self._start[items] + count - 1, 0)], 0)
        out = np.full((len(items), len(NUMERIC)), np.nan)
        out[:, 0] = np.log1p(count)
        out[:, 1] = np.log1p(recent)
        out[seen, 2] = np.log1p((at[seen] - first[seen]) / DAY)
        out[seen, 3] = np.log1p((at[seen] - last[seen]) / DAY)
        return out

    def all_items_at(self, at: int) -> FloatArray:
        return self.raw(np.arange(self.n_items), np.full(self.n_items, at))


def fit_stats(raw: FloatArray) -> NumericStats:
    """Caps at the 99th percentile of observed values, then mean and std after capping and imputing."""
    caps, means, stds = [], [], []
    for column in raw.T:
        observed = column[np.isfinite(column)]
        cap = float(np.percentile(observed, 99)) if len(observed) else 0.0
        filled = np.minimum(np.where(np.isfinite(column), column, cap), cap)
        caps.append(cap)
        means.append(float(filled.mean()))
        stds.append(float(filled.std()) or 1.0)
    return NumericStats(tuple(caps), tuple(means), tuple(stds))


def transform(raw: FloatArray, stats: NumericStats) -> npt.NDArray[np.float32]:
    """Impute missing with the cap, cap, standardise: the one transform used in training and for the bundle."""
    out: npt.NDArray[np.float32] = standardize(raw, stats.to_json(), NUMERIC)
    return out


def category_columns(log: Interactions) -> tuple[tuple[str, ...], npt.NDArray[np.float32]]:
    """Names and the 0/1 category matrix [items, categories] from the catalogue's metadata."""
    vocab = log.catalog.category_vocabulary
    index = {c: j for j, c in enumerate(vocab)}
    matrix = np.zeros((log.n_items, len(vocab)), dtype=np.float32)
    for row, cats in enumerate(log.catalog.categories):
        for c in cats:
            matrix[row, index[c]] = 1.0
    return tuple(f"category:{c}" for c in vocab), matrix


@dataclass(frozen=True)
class ItemFeatureSpec:
    """Column names, fitted numeric stats and the category matrix: enough to build features at any time."""

    names: tuple[str, ...]
    stats: NumericStats
    categories: npt.NDArray[np.float32]

    @property
    def width(self) -> int:
        return len(self.names)

    def stats_json(self) -> Mapping[str, Mapping[str, float]]:
        return self.stats.to_json()

    def at(self, history: ItemHistory, items: IntArray, times: IntArray) -> npt.NDArray[np.float32]:
        """Transformed features for (item, time) pairs: [len(items), width]."""
        numeric = transform(history.raw(items, times), self.stats)
        return np.concatenate([numeric, self.categories[items]], axis=1)

    def matrix(self, log: Interactions) -> npt.NDArray[np.float32]:
        """Features of every catalogue item as of the end of `log` (what a bundle published then holds)."""
        history = ItemHistory(log)
        items = np.arange(log.n_items)
        return self.at(history, items, np.full(log.n_items, history.end))


def fit_item_features(train: Interactions) -> ItemFeatureSpec:
    """Fit the numeric stats on the catalogue as it stood at the end of the train part."""
    history = ItemHistory(train)
    stats = fit_stats(history.all_items_at(history.end))
    names, categories = category_columns(train)
    return ItemFeatureSpec((*NUMERIC, *names), stats, categories)
