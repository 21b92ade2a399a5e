"""Baseline recommenders on small planted data, and the full-catalogue evaluation loop."""

from __future__ import annotations

import numpy as np
import pytest

from hyperrec.training import baselines
from hyperrec.training.baselines import (
    ImplicitALS,
    ItemKNN,
    MostPopular,
    OfflineRecommender,
    ScoringRecommender,
    evaluate_recommender,
    top_k_items,
)
from hyperrec.training.interactions import EVENT_CODE, Interactions, ItemCatalog
from hyperrec.training.metrics import METRIC_NAMES
from hyperrec.training.splits import leave_last_out_split, seen_items

EMPTY = np.zeros(0, dtype=np.int64)


def make_log(pairs: list[tuple[int, int]], n_users: int, n_items: int) -> Interactions:
    """(user, item) view events at increasing times."""
    ids = tuple(f"i{i}" for i in range(n_items))
    catalog = ItemCatalog(ids, tuple(() for _ in ids), tuple("" for _ in ids))
    users = [u for u, _ in pairs]
    items = [i for _, i in pairs]
    return Interactions.build(
        tuple(f"u{u}" for u in range(n_users)),
        catalog,
        users,
        items,
        np.arange(len(pairs)) + 1_700_000_000,
        np.full(len(pairs), EVENT_CODE["view"]),
        np.full(len(pairs), np.nan),
    )


def popularity_log() -> Interactions:
    """Item 3 has 5 events, item 1 four, item 4 three, item 0 two, item 2 one; user 9 has none."""
    counts = {3: 5, 1: 4, 4: 3, 0: 2, 2: 1}
    pairs = [(n % 5, item) for item, times in counts.items() for n in range(times)]
    return make_log(pairs, n_users=10, n_items=6)


def block_log(seed: int) -> Interactions:
    """Users 0-19 like items 0-9, users 20-39 like items 10-19; each user has 6 of their group's 10."""
    rng = np.random.default_rng(seed)
    pairs = []
    for user in range(40):
        group = 0 if user < 20 else 10
        pairs += [(user, group + int(i)) for i in rng.choice(10, size=6, replace=False)]
    return make_log(pairs, n_users=40, n_items=20)


def test_most_popular_orders_by_train_count() -> None:
    model = MostPopular()
    model.fit(popularity_log())
    top = model.recommend(np.array([9]), 4, [EMPTY])
    assert top.tolist() == [[3, 1, 4, 0]]


def test_most_popular_never_recommends_excluded_items() -> None:
    data = popularity_log()
    model = MostPopular()
    model.fit(data)
    # Default exclusions: each user's own train items.
    users = np.arange(10)
    top = model.recommend(users, 6)
    seen = seen_items(data)
    for row, user in zip(top, users, strict=True):
        assert not set(row.tolist()) & set(seen[user].tolist())
    # Explicit exclusions; running out of items pads with -1.
    top = model.recommend(np.array([9]), 6, [np.array([3, 4])])
    assert top.tolist() == [[1, 0, 2, 5, -1, -1]]


def test_top_k_items_ties_and_padding() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    top = top_k_items(scores, 5, [np.array([3]), EMPTY])
    assert top.tolist() == [[1, 2, 0, -1, -1], [0, 1, 2, 3, -1]]


def test_recommend_before_fit_fails() -> None:
    with pytest.raises(RuntimeError):
        MostPopular().recommend(np.array([0]), 3)


def test_item_knn_recommends_the_co_occurring_item() -> None:
    # Items 0 and 1 always appear together; 2 and 3 together. User 3 has only item 0.
    data = make_log([(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 0), (4, 2), (4, 3)], n_users=5, n_items=4)
    model = ItemKNN(neighbours=2)
    model.fit(data)
    top = model.recommend(np.array([3]), 2)
    assert top[0, 0] == 1
    assert 0 not in top[0].tolist()
    # cosine(0, 1) = co-occurrences 2 / sqrt(3 * 2) since item 0 has 3 users, item 1 has 2.
    assert model.similarity[0, 1] == pytest.approx(2 / np.sqrt(6))
    assert model.similarity[0, 0] == 0.0


def test_item_knn_keeps_only_top_neighbours() -> None:
    model = ItemKNN(neighbours=1)
    model.fit(block_log(0))
    assert np.all(np.diff(model.similarity.indptr) <= 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_als_learns_planted_groups(seed: int) -> None:
    data = block_log(seed)
    # More factors than groups, with enough regularisation not to memorise each user's exact items.
    model = ImplicitALS(factors=4, regularization=5.0, alpha=10.0, iterations=15, random_state=seed)
    model.fit(data)
    assert model.num_threads <= 2
    users = np.arange(40)
    top = model.recommend(users, 3)
    own_group = (top // 10) == (users[:, None] // 20)
    assert own_group.all()  # each user's 4 unseen own-group items outrank the other group's 10
    seen = seen_items(data)
    for row, user in zip(top, users, strict=True):
        assert not set(row.tolist()) & set(seen[user].tolist())


def test_recommend_in_blocks_matches_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ItemKNN(neighbours=5)
    model.fit(block_log(4))
    users = np.arange(40)
    whole = model.recommend(users, 5)
    monkeypatch.setattr(baselines, "SCORE_BLOCK_CELLS", 3 * 20)  # three users per block
    np.testing.assert_array_equal(model.recommend(users, 5), whole)


def test_als_is_reproducible() -> None:
    data = block_log(2)
    first, second = ImplicitALS(factors=4, iterations=3), ImplicitALS(factors=4, iterations=3)
    first.fit(data)
    second.fit(data)
    np.testing.assert_array_equal(first.item_factors, second.item_factors)


def test_models_satisfy_the_protocol() -> None:
    models: list[OfflineRecommender] = [MostPopular(), ItemKNN(), ImplicitALS(factors=4, iterations=2)]
    for model in models:
        assert isinstance(model, ScoringRecommender)
        assert model.name


def test_evaluate_recommender_keys_and_ranges() -> None:
    rng = np.random.default_rng(3)
    pairs = [(int(u), int(i)) for u, i in zip(rng.integers(0, 30, 600), rng.integers(0, 40, 600), strict=True)]
    split = leave_last_out_split(make_log(pairs, n_users=30, n_items=40))
    model = ItemKNN(neighbours=10)
    model.fit(split.train)
    ks = (5, 10)
    result = evaluate_recommender(model, split.train, split.test, ks)
    assert set(result) == {f"{m}@{k}" for m in METRIC_NAMES for k in ks} | {"n_users"}
    for key, value in result.items():
        if key != "n_users":
            assert 0.0 <= value <= 1.0, key
    # Test items the user already had in train are dropped from the relevant sets (they can't be hit).
    seen = seen_items(split.train)
    fresh = [u for u, i in zip(split.test.user, split.test.item, strict=True) if i not in seen[u]]
    assert result["n_users"] == len(set(fresh))
    assert result["recall@10"] >= result["recall@5"]


def test_evaluate_recommender_warm_only_skips_cold_users() -> None:
    # User 2 has only a test event and no train history.
    train = make_log([(0, 0), (0, 1), (1, 1)], n_users=3, n_items=4)
    test = make_log([(0, 2), (1, 3), (2, 0)], n_users=3, n_items=4)
    model = MostPopular()
    model.fit(train)
    assert evaluate_recommender(model, train, test, (2,))["n_users"] == 3
    assert evaluate_recommender(model, train, test, (2,), warm_only=True)["n_users"] == 2
