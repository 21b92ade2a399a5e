"""Item features as of a moment: only earlier events count, and one transform serves training and bundles."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperrec.training.interactions import EVENT_CODE, Interactions, ItemCatalog
from hyperrec.training.item_features import DAY, NUMERIC, ItemHistory, fit_item_features, fit_stats, transform

CATALOG = ItemCatalog(("a", "b", "c"), (("drama",), ("comedy", "drama"), ()), ("A", "B", "C"))


def log_of(events: list[tuple[int, int, int]]) -> Interactions:
    users = sorted({u for u, _, _ in events}) or [0]
    return Interactions.build(
        [f"u{u}" for u in range(max(users) + 1)],
        CATALOG,
        [u for u, _, _ in events],
        [i for _, i, _ in events],
        [t for _, _, t in events],
        [EVENT_CODE["click"]] * len(events),
        [np.nan] * len(events),
    )


T0 = 1_600_000_000


def test_counts_ages_and_momentum_by_hand() -> None:
    # item a: days 0, 10, 40; item b: day 35; item c: never.
    log = log_of([(0, 0, T0), (1, 0, T0 + 10 * DAY), (0, 0, T0 + 40 * DAY), (1, 1, T0 + 35 * DAY)])
    history = ItemHistory(log)
    raw = history.raw(np.array([0, 0, 1, 2]), np.array([T0 + 41 * DAY, T0 + 10 * DAY, T0 + 41 * DAY, T0 + 41 * DAY]))
    np.testing.assert_allclose(raw[0], np.log1p([3, 1, 41, 1]))  # 3 events; only day 40 within 30 days
    np.testing.assert_allclose(raw[1], np.log1p([1, 1, 10, 10]))  # the day-10 event itself is not "before"
    np.testing.assert_allclose(raw[2], np.log1p([1, 1, 6, 6]))
    assert raw[3, 0] == 0 and np.isnan(raw[3, 2]) and np.isnan(raw[3, 3])  # never seen: ages are missing


@settings(max_examples=50, deadline=None)
@given(
    times=st.lists(st.integers(min_value=0, max_value=200 * DAY), min_size=1, max_size=40),
    probe=st.integers(min_value=0, max_value=200 * DAY),
)
def test_only_strictly_earlier_events_count(times: list[int], probe: int) -> None:
    log = log_of([(0, 0, T0 + t) for t in times])
    raw = ItemHistory(log).raw(np.array([0]), np.array([T0 + probe]))
    assert raw[0, 0] == np.log1p(sum(t < probe for t in times))
    # Adding events at or after the probe time changes nothing.
    later = log_of([(0, 0, T0 + t) for t in times] + [(0, 0, T0 + probe), (0, 0, T0 + probe + DAY)])
    np.testing.assert_array_equal(ItemHistory(later).raw(np.array([0]), np.array([T0 + probe])), raw)


def test_transform_imputes_caps_and_standardises_with_train_stats() -> None:
    raw = np.array([[0.0, 1.0, 2.0, np.nan], [1.0, 2.0, 4.0, 1.0], [100.0, 3.0, np.nan, 2.0]])
    stats = fit_stats(raw)
    out = transform(raw, stats)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert stats.cap[0] < 100.0  # the outlier is capped at the 99th percentile
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-6)
    # The same stats applied later to new raw values give the same transform.
    np.testing.assert_array_equal(transform(raw[:1], stats), out[:1])


def test_bundle_matrix_equals_the_training_transform_at_the_cut_off() -> None:
    log = log_of([(0, 0, T0), (1, 1, T0 + DAY), (0, 1, T0 + 2 * DAY)])
    spec = fit_item_features(log)
    assert spec.names[: len(NUMERIC)] == NUMERIC and spec.names[len(NUMERIC) :] == ("category:comedy", "category:drama")
    matrix = spec.matrix(log)
    history = ItemHistory(log)
    expected = spec.at(history, np.arange(3), np.full(3, history.end))
    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_array_equal(matrix[:, len(NUMERIC) :], [[0, 1], [1, 1], [0, 0]])
