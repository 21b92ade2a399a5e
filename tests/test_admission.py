"""The protocol-neutral call rules (hyperrec/core/admission.py): the adaptive concurrency limit, the deadline
rule at arrival, request ids, deadlines.

The gRPC outcome of each (RESOURCE_EXHAUSTED, x-request-id, DEADLINE_EXCEEDED) is tested over a real channel in
tests/test_hardening.py and tests/test_server.py; these pin the rules themselves, for any protocol. The limit's
arithmetic is fed synthetic latencies on a fake clock: nothing here measures time.
"""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperrec.core.admission import (
    AdaptiveLimit,
    LimitSettings,
    check_request_id,
    deadline_after,
    new_request_id,
    next_limit,
    settle_request_id,
)
from hyperrec.core.domain import MAX_REQUEST_ID_BYTES, request_id_problem
from hyperrec.core.errors import InvalidArgument

SETTINGS = LimitSettings(min_limit=4, max_limit=64, tolerance=2.0, window_s=0.1, min_samples=10, capacity=2)


def feed(limit: AdaptiveLimit, latency: float, now: float, calls: int = 10, service: float | None = None) -> float:
    """Complete `calls` calls of `latency` each at `now` (one window's worth); returns the clock after them."""
    for _ in range(calls):
        limit.observe(latency, latency if service is None else service, now)
    return now


def window(limit: AdaptiveLimit, latency: float, now: float, use: float = 0.0) -> float:
    """One full window of calls taking `latency`, during which `use` of the limit was in progress at once at the
    peak; the next clock."""
    for _ in range(math.ceil(use * limit.current)):
        limit.admit()
    for _ in range(limit.in_flight):
        limit.release()
    return feed(limit, latency, now + 1.0)  # well past the window (whole seconds: no rounding at the edge)


def test_the_limit_starts_at_its_ceiling_and_admits_up_to_it() -> None:
    limit = AdaptiveLimit(LimitSettings(min_limit=1, max_limit=2), now=0.0)
    assert [limit.admit(), limit.admit(), limit.admit()] == [True, True, False]
    assert limit.in_flight == 2  # a refused call is not counted
    limit.release()
    assert limit.admit() and not limit.admit()
    assert limit.refusal().startswith("server busy: 2 calls already in flight")


def test_a_window_closes_only_after_its_length_and_enough_calls() -> None:
    limit = AdaptiveLimit(SETTINGS, now=0.0)
    feed(limit, 0.010, now=0.5, calls=9)  # late enough, but only nine calls
    assert limit.baseline is None
    limit.observe(0.010, 0.010, now=0.5)
    assert limit.baseline == 0.010
    feed(limit, 0.001, now=0.55, calls=20)  # enough calls, too early: the window of 0.5 is still open
    assert limit.baseline == 0.010


def test_latency_above_the_tolerance_shrinks_the_limit_in_proportion() -> None:
    limit = AdaptiveLimit(SETTINGS, now=0.0)
    now = window(limit, 0.010, 0.0)  # the baseline: 10 ms
    assert limit.current == 64  # near the baseline, not reached: unchanged
    now = window(limit, 0.030, now)  # 3x the baseline, 1.5x the tolerated 20 ms
    assert limit.limit == pytest.approx(64 * 20 / 30)
    now = window(limit, 0.500, now)  # far above: at most half at once
    assert limit.limit == pytest.approx(64 * 20 / 30 / 2)
    for _ in range(10):
        now = window(limit, 0.500, now)
    assert limit.current == SETTINGS.min_limit  # never below the floor


def test_latency_near_the_baseline_grows_the_limit_only_when_the_window_used_half_of_it() -> None:
    limit = AdaptiveLimit(SETTINGS, now=0.0)
    now = window(limit, 0.010, 0.0)
    now = window(limit, 0.500, now)
    now = window(limit, 0.500, now)
    assert limit.limit == pytest.approx(16.0)
    now = window(limit, 0.012, now)  # back near the baseline, but no call was in progress: it stays
    now = window(limit, 0.012, now, use=0.4)  # nor with less than half of it in use
    assert limit.limit == pytest.approx(16.0)
    now = window(limit, 0.012, now, use=0.5)
    assert limit.limit == pytest.approx(16.0 + 4.0)  # grows by sqrt(limit)
    for _ in range(40):
        now = window(limit, 0.012, now, use=1.0)
    assert limit.current == SETTINGS.max_limit  # never above the ceiling


def test_the_baseline_is_the_lowest_window_latency_of_the_recent_windows() -> None:
    limit = AdaptiveLimit(LimitSettings(min_limit=1, max_limit=8, baseline_windows=3), now=0.0)
    now = 0.0
    for latency in (0.004, 0.009, 0.008, 0.007):
        now = window(limit, latency, now)
    assert limit.baseline == 0.007  # 4 ms has left the last three windows: a slower model is followed


@given(
    st.lists(
        st.tuples(st.floats(min_value=1e-4, max_value=5.0), st.floats(min_value=0.0, max_value=1.0)),
        min_size=1,
        max_size=60,
    )
)
def test_the_limit_always_stays_within_its_bounds(windows: list[tuple[float, float]]) -> None:
    limit = AdaptiveLimit(SETTINGS, now=0.0)
    now = 0.0
    for latency, use in windows:
        now = window(limit, latency, now, use=use)
        assert SETTINGS.min_limit <= limit.limit <= SETTINGS.max_limit
        assert limit.current == math.floor(limit.limit)


@given(
    st.floats(min_value=4, max_value=64),
    st.floats(min_value=1e-4, max_value=1.0),
    st.floats(min_value=1e-4, max_value=1.0),
    st.floats(min_value=1e-4, max_value=1.0),
    st.booleans(),
)
def test_higher_latency_never_gives_a_higher_limit(
    limit: float, baseline: float, a: float, b: float, used: bool
) -> None:
    low, high = sorted((a, b))
    assert next_limit(limit, high, baseline, used, SETTINGS) <= next_limit(limit, low, baseline, used, SETTINGS)


def test_a_deadline_shorter_than_the_queue_ahead_is_refused_and_a_longer_one_is_not() -> None:
    limit = AdaptiveLimit(SETTINGS, now=0.0)  # capacity 2
    assert limit.deadline_refusal(0.001) is None  # nothing measured yet: no estimate, no refusal
    feed(limit, 0.100, now=0.0, calls=1, service=0.100)  # service time 100 ms
    for _ in range(2):
        limit.admit()
    assert limit.expected_latency() is None  # the call asking has one call ahead: a compute slot is free
    assert limit.deadline_refusal(0.001) is None
    for _ in range(4):
        limit.admit()  # six in flight: the newest has five ahead, four of them queued beyond the two computing
    assert limit.expected_latency() == pytest.approx(0.100 * (1 + 4 / 2))
    assert limit.deadline_refusal(None) is None
    assert limit.deadline_refusal(0.301) is None
    why = limit.deadline_refusal(0.250)
    assert why is not None and "5 calls ahead would take about 300 ms" in why and "250 ms left" in why


def test_the_measured_completion_rate_caps_the_expected_wait() -> None:
    """Twenty calls of 100 ms each completing within 0.1 s overlap (a rate of 100/s): six calls in flight then
    expect 60 ms (Little's law), not the 300 ms that two compute slots at 100 ms each would give."""
    limit = AdaptiveLimit(SETTINGS, now=0.0)
    feed(limit, 0.100, now=0.1, calls=20)  # the first ten close the window: 10 calls in 0.1 s
    assert limit.throughput == pytest.approx(100.0)
    for _ in range(6):
        limit.admit()
    assert limit.expected_latency() == pytest.approx(0.06)
    assert limit.deadline_refusal(0.07) is None
    assert limit.deadline_refusal(0.05) is not None


def test_the_service_time_is_a_moving_average_of_handler_times() -> None:
    limit = AdaptiveLimit(SETTINGS, now=0.0)
    limit.observe(0.5, 0.010, now=0.0)
    limit.observe(0.5, 0.020, now=0.0)
    assert limit.service_time == pytest.approx(0.8 * 0.010 + 0.2 * 0.020)


@pytest.mark.parametrize(
    "bad",
    [
        {"min_limit": 0, "max_limit": 4},
        {"min_limit": 5, "max_limit": 4},
        {"min_limit": 1, "max_limit": 4, "tolerance": 0.9},
        {"min_limit": 1, "max_limit": 4, "window_s": 0},
        {"min_limit": 1, "max_limit": 4, "capacity": 0},
    ],
)
def test_impossible_limit_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LimitSettings(**bad)  # type: ignore[arg-type]


def test_fresh_request_ids_are_distinct_and_acceptable() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(request_id_problem(i) is None and len(i) == 32 for i in ids)


@pytest.mark.parametrize(
    ("given_id", "carried", "quoted"),
    [
        ("", "fresh", "fresh"),  # none given: the fresh id, both ways
        ("caller-7", "caller-7", "caller-7"),  # a valid one is carried on and quoted back
        ("caf\u00e9", "caf\u00e9", "fresh"),  # not ASCII: carried on (validation rejects it), never quoted
        ("x" * (MAX_REQUEST_ID_BYTES + 1), "x" * (MAX_REQUEST_ID_BYTES + 1), "fresh"),  # too long: likewise
    ],
)
def test_a_callers_request_id_is_quoted_only_when_acceptable(given_id: str, carried: str, quoted: str) -> None:
    assert settle_request_id(given_id, "fresh") == (carried, quoted)


@given(st.text(max_size=2 * MAX_REQUEST_ID_BYTES))
def test_the_quoted_request_id_is_always_acceptable(given_id: str) -> None:
    carried, quoted = settle_request_id(given_id, "fresh")
    assert carried == (given_id or "fresh")
    assert request_id_problem(quoted) is None


def test_check_request_id_names_the_field_and_the_problem() -> None:
    check_request_id("caller-7")
    with pytest.raises(InvalidArgument) as err:
        check_request_id("bad\nid")
    assert err.value.field == "request_id" and err.value.reason == "must be printable ASCII"


def test_the_deadline_is_the_time_remaining_from_now_on_the_monotonic_clock() -> None:
    assert deadline_after(None) is None
    before = time.monotonic()
    deadline = deadline_after(2.5)
    after = time.monotonic()
    assert deadline is not None and before + 2.5 <= deadline <= after + 2.5
