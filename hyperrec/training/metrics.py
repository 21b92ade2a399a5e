"""Top-K ranking metrics for full-catalogue evaluation, with binary relevance.

A top list is one row of an int array `[users, K]` of item indexes, best first; `-1` pads lists shorter
than K (a recommender that ran out of candidates) and never counts as a hit. `relevant` holds, per row,
the items the user actually interacted with in the held-out part (a set, list or array of item indexes).

The per-metric functions return one value per row, NaN where the metric is undefined (no relevant item),
so callers choose how to average; `evaluate_topk` averages over the users with at least one relevant item.
Each top list is scored against the whole catalogue: no sampled negatives, which bias comparisons.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Relevant = Sequence[Collection[int] | npt.NDArray[np.integer]]

METRIC_NAMES: tuple[str, ...] = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")


def _as_top(top: npt.ArrayLike) -> IntArray:
    """The top lists as a 2-D int64 array (one row per user)."""
    array = np.asarray(top, dtype=np.int64)
    if array.ndim != 2:
        raise ValueError(f"top lists must be a 2-D array [users, K], got shape {array.shape}")
    return array


def _relevant_arrays(relevant: Relevant) -> list[IntArray]:
    """Each user's relevant items as a sorted array without repeats."""
    return [np.unique(np.fromiter(r, dtype=np.int64, count=len(r))) for r in relevant]


def _first_occurrence(top: IntArray) -> npt.NDArray[np.bool_]:
    """True where an entry is a real item (not padding) seen for the first time in its row.

    A well-formed list never repeats an item; if one does, only its best position may count as a hit,
    otherwise precision and recall could exceed 1.
    """
    order = np.argsort(top, axis=1, kind="stable")
    ranked = np.take_along_axis(top, order, axis=1)
    repeat_sorted = np.zeros(top.shape, dtype=np.bool_)
    repeat_sorted[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeat = np.zeros(top.shape, dtype=np.bool_)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return (top >= 0) & ~repeat


def hit_matrix(top: npt.ArrayLike, relevant: Relevant) -> tuple[npt.NDArray[np.bool_], IntArray]:
    """`hits[u, j]` = whether the j-th recommendation of row u is relevant, and each row's relevant count.

    Vectorised: a (row, item) pair becomes one int64 key, and membership is one `np.isin` over all rows.
    """
    top_array = _as_top(top)
    if len(relevant) != top_array.shape[0]:
        raise ValueError("need one relevant set per row of top")
    arrays = _relevant_arrays(relevant)
    n_relevant = np.array([a.size for a in arrays], dtype=np.int64)
    width = int(max(top_array.max(initial=-1), max((int(a[-1]) for a in arrays if a.size), default=-1))) + 1
    rows = np.repeat(np.arange(len(arrays), dtype=np.int64), n_relevant)
    relevant_keys = rows * width + (np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
    top_keys = np.arange(top_array.shape[0], dtype=np.int64)[:, None] * width + top_array
    hits = np.isin(top_keys, relevant_keys) & _first_occurrence(top_array)
    return hits, n_relevant


def _check_k(hits: npt.NDArray[np.bool_], k: int) -> None:
    """K must be positive and within the lists' length: a shorter list would silently lower every metric."""
    if not 1 <= k <= hits.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the list length {hits.shape[1]}")


def _undefined_where_no_relevant(values: FloatArray, n_relevant: IntArray) -> FloatArray:
    """NaN for rows without relevant items, where recall, NDCG and AP have no meaning."""
    return np.where(n_relevant > 0, values, np.nan)


def _precision(hits: npt.NDArray[np.bool_], n_relevant: IntArray, k: int) -> FloatArray:
    """Hits among the first k, divided by k (padding counts as a miss)."""
    _check_k(hits, k)
    return _undefined_where_no_relevant(hits[:, :k].sum(axis=1) / k, n_relevant)


def _recall(hits: npt.NDArray[np.bool_], n_relevant: IntArray, k: int) -> FloatArray:
    """Hits among the first k, divided by the number of relevant items."""
    _check_k(hits, k)
    return _undefined_where_no_relevant(hits[:, :k].sum(axis=1) / np.maximum(n_relevant, 1), n_relevant)


def _discounts(k: int) -> FloatArray:
    """1 / log2(rank + 1) for ranks 1..k."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _ndcg(hits: npt.NDArray[np.bool_], n_relevant: IntArray, k: int) -> FloatArray:
    """DCG of the first k over the ideal DCG, which has min(|relevant|, k) hits at the top."""
    _check_k(hits, k)
    discounts = _discounts(k)
    dcg = hits[:, :k] @ discounts
    ideal = np.concatenate(([0.0], np.cumsum(discounts)))[np.minimum(n_relevant, k)]
    return _undefined_where_no_relevant(dcg / np.where(ideal > 0, ideal, 1.0), n_relevant)


def _average_precision(hits: npt.NDArray[np.bool_], n_relevant: IntArray, k: int) -> FloatArray:
    """Sum of precision@j over the hit positions j <= k, divided by min(|relevant|, k)."""
    _check_k(hits, k)
    head = hits[:, :k]
    precision_at_rank = np.cumsum(head, axis=1) / np.arange(1, k + 1, dtype=np.float64)
    total = (precision_at_rank * head).sum(axis=1)
    return _undefined_where_no_relevant(total / np.maximum(np.minimum(n_relevant, k), 1), n_relevant)


def _hit_rate(hits: npt.NDArray[np.bool_], n_relevant: IntArray, k: int) -> FloatArray:
    """1 when at least one of the first k is relevant, else 0."""
    _check_k(hits, k)
    any_hit: FloatArray = np.any(hits[:, :k], axis=1).astype(np.float64)
    return _undefined_where_no_relevant(any_hit, n_relevant)


def precision_at_k(top: npt.ArrayLike, relevant: Relevant, k: int) -> FloatArray:
    """Per row: |top-k ∩ relevant| / k; NaN for rows without relevant items."""
    return _precision(*hit_matrix(top, relevant), k)


def recall_at_k(top: npt.ArrayLike, relevant: Relevant, k: int) -> FloatArray:
    """Per row: |top-k ∩ relevant| / |relevant|; NaN for rows without relevant items."""
    return _recall(*hit_matrix(top, relevant), k)


def ndcg_at_k(top: npt.ArrayLike, relevant: Relevant, k: int) -> FloatArray:
    """Per row: binary-relevance NDCG with a log2 discount; the ideal list has min(|relevant|, k) hits."""
    return _ndcg(*hit_matrix(top, relevant), k)


def map_at_k(top: npt.ArrayLike, relevant: Relevant, k: int) -> FloatArray:
    """Per row: average precision truncated at k, normalised by min(|relevant|, k) (averaging rows gives MAP)."""
    return _average_precision(*hit_matrix(top, relevant), k)


def hit_rate_at_k(top: npt.ArrayLike, relevant: Relevant, k: int) -> FloatArray:
    """Per row: 1 if any of the top k is relevant, else 0; NaN for rows without relevant items."""
    return _hit_rate(*hit_matrix(top, relevant), k)


def catalogue_coverage(top_lists: npt.NDArray[np.integer] | Iterable[npt.ArrayLike], n_items: int) -> float:
    """Distinct items recommended anywhere in the lists, over the catalogue size (padding ignored).

    Low coverage means the recommender shows the same few items to everyone, which accuracy hides.
    """
    if n_items <= 0:
        raise ValueError("n_items must be positive")
    if isinstance(top_lists, np.ndarray):
        flat = top_lists.ravel().astype(np.int64)
    else:
        rows = [np.asarray(row, dtype=np.int64).ravel() for row in top_lists]
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return float(np.unique(flat[flat >= 0]).size / n_items)


_PER_USER = {
    "precision": _precision,
    "recall": _recall,
    "ndcg": _ndcg,
    "map": _average_precision,
    "hit_rate": _hit_rate,
}


def evaluate_topk(
    top: npt.ArrayLike, relevant: Relevant, ks: Sequence[int] = (10, 20, 50), *, n_items: int
) -> dict[str, float]:
    """Mean metrics at each k over the users with at least one relevant item, plus catalogue coverage.

    Keys are "<metric>@<k>" for precision, recall, ndcg, map, hit_rate and coverage, and "n_users" (how
    many users were averaged). Coverage uses the top-k lists of those same users. With no evaluable user
    every metric is NaN. `top` must have at least max(ks) columns.
    """
    top_array = _as_top(top)
    hits, n_relevant = hit_matrix(top_array, relevant)
    evaluable = n_relevant > 0
    hits, n_relevant, top_array = hits[evaluable], n_relevant[evaluable], top_array[evaluable]
    results: dict[str, float] = {}
    for k in sorted(set(ks)):
        _check_k(hits, k)
        for name, metric in _PER_USER.items():
            values = metric(hits, n_relevant, k)
            results[f"{name}@{k}"] = float(values.mean()) if values.size else float("nan")
        coverage = catalogue_coverage(top_array[:, :k], n_items) if len(top_array) else float("nan")
        results[f"coverage@{k}"] = coverage
    results["n_users"] = float(evaluable.sum())
    return results
