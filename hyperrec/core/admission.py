"""The rules a call meets before the core serves it, the same for every protocol.

- Admission: at most `limit` calls run at once; one more is refused at once rather than queued, so the calls
  already admitted keep their latency and the client can retry elsewhere.
- Request ids: every call gets one to quote in answers and logs, the caller's own when it gave a valid one.
- Deadline: the time the caller has left becomes a monotonic deadline the pipeline checks between stages.

Each protocol adapter (the gRPC gate and servicers today) applies these and says the outcome in its own terms
(status codes, metadata).
"""

from __future__ import annotations

import time
import uuid

from hyperrec.core.domain import request_id_problem
from hyperrec.core.errors import InvalidArgument


class InFlightLimit:
    """Counts the calls in progress against a limit. Not thread-safe: one event loop admits and releases."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def admit(self) -> bool:
        """Count one more call in and return True, or return False when `limit` calls are already in progress.
        An admitted call must be released when it ends, however it ends."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        """Count an admitted call out."""
        self.in_flight -= 1

    def refusal(self) -> str:
        """Why a call was not admitted, and what the caller should do: the message of the refusal."""
        return f"server busy: {self.limit} calls already in flight; retry with backoff or elsewhere"


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def settle_request_id(given: str, fresh: str) -> tuple[str, str]:
    """(the id the request goes on with, the id to quote in answers and logs) for a call carrying `given` ("" when
    the caller set none) that was assigned `fresh`. The caller's id goes on with the request even when it is not
    acceptable, so that validation rejects it; only an acceptable one is quoted back (it may travel as metadata)."""
    request_id = given or fresh
    return request_id, request_id if request_id_problem(request_id) is None else fresh


def check_request_id(request_id: str) -> None:
    """Raise InvalidArgument saying why `request_id` is not acceptable; return when it is."""
    problem = request_id_problem(request_id)
    if problem is not None:
        raise InvalidArgument("request_id", problem)


def deadline_after(remaining_s: float | None) -> float | None:
    """The `time.monotonic()` deadline of a call with `remaining_s` seconds left (None: no deadline)."""
    return None if remaining_s is None else time.monotonic() + remaining_s
