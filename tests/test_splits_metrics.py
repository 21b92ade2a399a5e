"""Splits (no leakage, sizes, per-user hold-out) and ranking metrics against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperrec.training.interactions import EVENT_CODE, Interactions, ItemCatalog
from hyperrec.training.metrics import (
    catalogue_coverage,
    evaluate_topk,
    hit_matrix,
    hit_rate_at_k,
    map_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)
from hyperrec.training.splits import (
    Split,
    filter_min_history,
    leave_last_out_split,
    seen_items,
    temporal_split,
    training_view,
)


def make_log(users: list[int], items: list[int], times: list[int], n_users: int = 0, n_items: int = 0) -> Interactions:
    """A log of view events over `n_users` users and `n_items` items (at least enough for the indexes given)."""
    n_users = max(n_users, max(users, default=-1) + 1)
    n_items = max(n_items, max(items, default=-1) + 1)
    ids = tuple(f"i{i}" for i in range(n_items))
    catalog = ItemCatalog(ids, tuple(() for _ in ids), tuple("" for _ in ids))
    n = len(users)
    return Interactions.build(
        tuple(f"u{u}" for u in range(n_users)),
        catalog,
        users,
        items,
        times,
        np.full(n, EVENT_CODE["view"]),
        np.full(n, np.nan),
    )


def random_log(seed: int, n_events: int = 1000, n_users: int = 30, n_items: int = 50) -> Interactions:
    """Random events with distinct timestamps, so part sizes are exact."""
    rng = np.random.default_rng(seed)
    times = rng.permutation(n_events) * 10 + 1_600_000_000
    users = rng.integers(0, n_users, n_events)
    items = rng.integers(0, n_items, n_events)
    return make_log(users.tolist(), items.tolist(), times.tolist(), n_users, n_items)


# ---------------------------------------------------------------------------------------------------------
# metrics

# One user, list [3, 1, 7, 2, -1], relevant {1, 2, 9}: hits at ranks 2 and 4.
TOP = np.array([[3, 1, 7, 2, -1]])
REL = [{1, 2, 9}]
LOG2_3 = math.log2(3)  # discount of rank 2 is 1 / log2(3) = 0.63093
LOG2_5 = math.log2(5)  # discount of rank 4 is 1 / log2(5) = 0.43068


def test_precision_recall_hit_rate_by_hand() -> None:
    # @5: 2 hits / 5 = 0.4; recall 2 of 3 relevant; hit rate 1.
    assert precision_at_k(TOP, REL, 5)[0] == pytest.approx(0.4)
    assert recall_at_k(TOP, REL, 5)[0] == pytest.approx(2 / 3)
    assert hit_rate_at_k(TOP, REL, 5)[0] == 1.0
    # @1: item 3 is not relevant.
    assert precision_at_k(TOP, REL, 1)[0] == 0.0
    assert hit_rate_at_k(TOP, REL, 1)[0] == 0.0
    # @2: 1 hit / 2; recall 1 / 3.
    assert precision_at_k(TOP, REL, 2)[0] == pytest.approx(0.5)
    assert recall_at_k(TOP, REL, 2)[0] == pytest.approx(1 / 3)


def test_ndcg_by_hand() -> None:
    # @5: DCG = 1/log2(3) + 1/log2(5) = 1.06161; ideal has min(3, 5) = 3 hits: 1 + 1/log2(3) + 1/log2(4) = 2.13093.
    dcg = 1 / LOG2_3 + 1 / LOG2_5
    assert ndcg_at_k(TOP, REL, 5)[0] == pytest.approx(dcg / (1 + 1 / LOG2_3 + 0.5))
    assert ndcg_at_k(TOP, REL, 5)[0] == pytest.approx(0.49819, abs=1e-5)
    # @2: DCG = 1/log2(3); ideal has min(3, 2) = 2 hits: 1 + 1/log2(3) -> 0.38685.
    assert ndcg_at_k(TOP, REL, 2)[0] == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))


def test_ndcg_with_fewer_relevant_than_k() -> None:
    # One relevant item at rank 3: DCG = 1/log2(4) = 0.5; ideal = one hit at rank 1 = 1 -> 0.5.
    assert ndcg_at_k([[5, 0, 4]], [{4}], 3)[0] == pytest.approx(0.5)
    # Both relevant items at the top: DCG = ideal -> 1, even though K = 3 > 2 relevant.
    assert ndcg_at_k([[4, 5, 6]], [{4, 5}], 3)[0] == pytest.approx(1.0)


def test_map_by_hand() -> None:
    # @5: hits at rank 2 (precision 1/2) and rank 4 (precision 2/4): (0.5 + 0.5) / min(3, 5) = 1/3.
    assert map_at_k(TOP, REL, 5)[0] == pytest.approx(1 / 3)
    # @2: one hit at rank 2 (precision 1/2), normalised by min(3, 2) = 2 -> 0.25.
    assert map_at_k(TOP, REL, 2)[0] == pytest.approx(0.25)
    # One relevant at rank 3: (1/3) / min(1, 3) = 1/3. Two relevant at ranks 1, 2: (1 + 1) / 2 = 1.
    assert map_at_k([[5, 0, 4]], [{4}], 3)[0] == pytest.approx(1 / 3)
    assert map_at_k([[4, 5, 6]], [{4, 5}], 3)[0] == pytest.approx(1.0)


def test_padding_never_hits_and_counts_as_a_miss() -> None:
    # [2, -1, -1] with relevant {2, 8}: precision 1/3 (padding is a miss), recall 1/2.
    assert precision_at_k([[2, -1, -1]], [{2, 8}], 3)[0] == pytest.approx(1 / 3)
    assert recall_at_k([[2, -1, -1]], [np.array([2, 8])], 3)[0] == pytest.approx(0.5)
    # The key of a -1 in row 1 equals row 0's key for the largest item (width - 1 = 9): it must not hit.
    hits, n_relevant = hit_matrix([[0, 1], [-1, -1]], [{9}, {9}])
    assert not hits.any()
    assert n_relevant.tolist() == [1, 1]


def test_repeated_item_counts_once() -> None:
    # [1, 1, 2] with relevant {1}: only the first 1 is a hit -> precision 1/3, recall 1.
    assert precision_at_k([[1, 1, 2]], [{1}], 3)[0] == pytest.approx(1 / 3)
    assert recall_at_k([[1, 1, 2]], [{1}], 3)[0] == pytest.approx(1.0)


def test_metrics_undefined_without_relevant_items() -> None:
    assert np.isnan(ndcg_at_k([[1, 2]], [set()], 2)[0])
    assert np.isnan(recall_at_k([[1, 2]], [set()], 2)[0])


def test_catalogue_coverage() -> None:
    # Distinct items {0, 1, 2} of 10 (padding ignored) -> 0.3, whatever the input form.
    assert catalogue_coverage(np.array([[0, 1, -1], [1, 2, -1]]), 10) == pytest.approx(0.3)
    assert catalogue_coverage([np.array([0, 1]), np.array([2])], 10) == pytest.approx(0.3)
    assert catalogue_coverage(np.zeros((0, 3), dtype=np.int64), 10) == 0.0


def test_evaluate_topk_by_hand() -> None:
    top = np.array([[1, 2], [3, 4], [5, 6]])
    relevant = [{1}, {4, 9}, set()]  # the third user has nothing relevant: not averaged
    result = evaluate_topk(top, relevant, (1, 2), n_items=10)
    # user 0 hits at rank 1, user 1 at rank 2.
    assert result["n_users"] == 2
    assert result["precision@1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert result["recall@1"] == pytest.approx(0.5)  # (1/1 + 0/2) / 2
    assert result["ndcg@1"] == pytest.approx(0.5)
    assert result["map@1"] == pytest.approx(0.5)
    assert result["hit_rate@1"] == pytest.approx(0.5)
    assert result["coverage@1"] == pytest.approx(0.2)  # {1, 3} of 10
    assert result["precision@2"] == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    assert result["recall@2"] == pytest.approx(0.75)  # (1 + 1/2) / 2
    # ndcg@2: user 0 -> 1; user 1 -> (1/log2(3)) / (1 + 1/log2(3)) = 0.38685; mean 0.69343.
    assert result["ndcg@2"] == pytest.approx((1 + (1 / LOG2_3) / (1 + 1 / LOG2_3)) / 2)
    # map@2: user 0 -> 1/1; user 1 -> (1/2) / min(2, 2) = 0.25; mean 0.625.
    assert result["map@2"] == pytest.approx(0.625)
    assert result["hit_rate@2"] == pytest.approx(1.0)
    assert result["coverage@2"] == pytest.approx(0.4)  # {1, 2, 3, 4} of 10


def test_evaluate_topk_rejects_short_lists() -> None:
    with pytest.raises(ValueError):
        evaluate_topk(np.array([[1, 2]]), [{1}], (10,), n_items=10)
    with pytest.raises(ValueError):
        precision_at_k(np.array([[1, 2]]), [{1}, {2}], 1)


# ---------------------------------------------------------------------------------------------------------
# splits


def assert_same_space(split: Split, data: Interactions) -> None:
    """Every part keeps the users and catalogue, and the parts partition the events."""
    for part in (split.train, split.validation, split.test):
        assert part.user_ids == data.user_ids
        assert part.catalog == data.catalog
    assert len(split.train) + len(split.validation) + len(split.test) == len(data)


def test_temporal_split_sizes_and_order() -> None:
    data = random_log(0)
    split = temporal_split(data, 0.1, 0.2)
    assert_same_space(split, data)
    assert (len(split.train), len(split.validation), len(split.test)) == (700, 100, 200)
    assert split.train.timestamp.max() < split.validation.timestamp.min()
    assert split.validation.timestamp.max() < split.test.timestamp.min()
    assert split.description["kind"] == "temporal"
    assert split.description["test_start"] == split.test.timestamp.min()


def test_temporal_split_keeps_ties_together() -> None:
    # All events share one time: none may sit in train while an equal-time event is held out.
    data = make_log([0, 1, 2, 0], [0, 1, 2, 3], [5, 5, 5, 5])
    split = temporal_split(data, 0.25, 0.25)
    assert_same_space(split, data)
    assert len(split.test) == 4


def test_temporal_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        temporal_split(random_log(1), 0.5, 0.5)
    with pytest.raises(ValueError):
        temporal_split(random_log(1), -0.1, 0.1)


def test_leave_last_out_by_hand() -> None:
    # user 0: 5 events at t=1..5; user 1: 2 events (too few for 1 train + 1 validation + 1 test); user 2: 3 events.
    data = make_log([0, 0, 0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 3, 4, 0, 1, 5, 6, 7], [1, 2, 3, 4, 5, 1, 2, 3, 9, 7])
    split = leave_last_out_split(data, n_validation=1, n_test=1)
    assert_same_space(split, data)
    test = sorted(zip(split.test.user.tolist(), split.test.item.tolist(), strict=True))
    validation = sorted(zip(split.validation.user.tolist(), split.validation.item.tolist(), strict=True))
    assert test == [(0, 4), (2, 6)]  # user 2's last event is item 6 at t=9
    assert validation == [(0, 3), (2, 7)]
    assert sorted(split.train.item[split.train.user == 1].tolist()) == [0, 1]  # short history stays in train
    assert split.description["held_out_users"] == 2


def test_leave_last_out_several_events_and_min_train() -> None:
    data = random_log(2, n_events=400, n_users=20)
    split = leave_last_out_split(data, n_validation=2, n_test=3, min_train=4)
    assert_same_space(split, data)
    counts = np.bincount(data.user, minlength=data.n_users)
    for user in range(data.n_users):
        times = data.timestamp[data.user == user]
        held = counts[user] >= 4 + 2 + 3
        assert (split.test.user == user).sum() == (3 if held else 0)
        assert (split.validation.user == user).sum() == (2 if held else 0)
        if held:  # the last three times are exactly the test times
            assert sorted(split.test.timestamp[split.test.user == user]) == sorted(times)[-3:]


def test_filter_min_history_keeps_user_index_space() -> None:
    data = make_log([0, 0, 0, 1, 2, 2], [0, 1, 2, 0, 1, 2], [1, 2, 3, 4, 5, 6])
    kept = filter_min_history(data, 2)
    assert kept.user_ids == data.user_ids
    assert sorted(set(kept.user.tolist())) == [0, 2]
    assert len(kept) == 5


def test_training_view_and_seen_items() -> None:
    data = random_log(3)
    split = leave_last_out_split(data)
    assert training_view(split) is split.train
    both = training_view(split, with_validation=True)
    assert len(both) == len(split.train) + len(split.validation)
    assert np.all(np.diff(both.timestamp) >= 0)
    seen = seen_items(split.train)
    assert len(seen) == data.n_users
    assert set(seen[0].tolist()) == set(split.train.item[split.train.user == 0].tolist())


events = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(0, 30)),
    min_size=1,
    max_size=80,
)


def log_from(rows: list[tuple[int, int, int]]) -> Interactions:
    users, items, times = (list(column) for column in zip(*rows, strict=True))
    return make_log(users, items, times, n_users=6, n_items=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=events, validation=st.floats(0.0, 0.4), test=st.floats(0.0, 0.4))
def test_temporal_split_never_leaks(rows: list[tuple[int, int, int]], validation: float, test: float) -> None:
    data = log_from(rows)
    split = temporal_split(data, validation, test)
    assert_same_space(split, data)
    parts = [p.timestamp for p in (split.train, split.validation, split.test) if len(p)]
    for earlier, later in itertools.pairwise(parts):
        assert earlier.max() < later.min()  # globally, strictly before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=events, n_validation=st.integers(0, 2), n_test=st.integers(1, 2))
def test_leave_last_out_never_leaks(rows: list[tuple[int, int, int]], n_validation: int, n_test: int) -> None:
    data = log_from(rows)
    split = leave_last_out_split(data, n_validation=n_validation, n_test=n_test)
    assert_same_space(split, data)
    for user in range(data.n_users):
        train, validation, test = (p.timestamp[p.user == user] for p in (split.train, split.validation, split.test))
        if len(test):
            assert len(train) >= 1
            assert train.max() <= test.min()
            assert len(test) == n_test
        if len(validation):
            assert train.max() <= validation.min() <= validation.max() <= test.min()
