"""The protocol-neutral call rules (hyperrec/core/admission.py): in-flight limit, request ids, deadlines.

The gRPC outcome of each (RESOURCE_EXHAUSTED, x-request-id, DEADLINE_EXCEEDED) is tested over a real channel in
tests/test_hardening.py and tests/test_server.py; these pin the rules themselves, for any protocol.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperrec.core.admission import (
    InFlightLimit,
    check_request_id,
    deadline_after,
    new_request_id,
    settle_request_id,
)
from hyperrec.core.domain import MAX_REQUEST_ID_BYTES, request_id_problem
from hyperrec.core.errors import InvalidArgument


def test_the_in_flight_limit_admits_up_to_its_limit_and_one_more_after_a_release() -> None:
    limit = InFlightLimit(2)
    assert [limit.admit(), limit.admit(), limit.admit()] == [True, True, False]
    assert limit.in_flight == 2  # a refused call is not counted
    limit.release()
    assert limit.admit() and not limit.admit()
    assert limit.refusal() == "server busy: 2 calls already in flight; retry with backoff or elsewhere"


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
