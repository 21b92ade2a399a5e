"""The rules a call meets before the core serves it, the same for every protocol.

- Admission: an adaptive concurrency limit (`AdaptiveLimit`) says how many calls may be in progress at once;
  one more is refused at once rather than queued, so the calls already admitted keep their latency and the client
  can retry elsewhere. The limit follows measured latency (see `AdaptiveLimit`). A call whose deadline cannot be
  met behind the calls already queued is refused at once too (`AdaptiveLimit.deadline_refusal`).
- Request ids: every call gets one to quote in answers and logs, the caller's own when it gave a valid one.
- Deadline: the time the caller has left becomes a monotonic deadline the pipeline checks between stages.

Each protocol adapter (the gRPC gate and servicers today) applies these and says the outcome in its own terms
(status codes, metadata): it reports each call's start and end and its latency, and refuses what these refuse.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass

from hyperrec.core.domain import request_id_problem
from hyperrec.core.errors import InvalidArgument

SERVICE_TIME_WEIGHT = 0.2  # weight of each new call in the moving average of the service time
MAX_DECREASE = 0.5  # one window never cuts the limit by more than half


@dataclass(frozen=True)
class LimitSettings:
    """The bounds and pace of an `AdaptiveLimit`."""

    min_limit: int  # the limit never goes below this (calls admitted even while latency is high)
    max_limit: int  # ... nor above this; it also starts here
    tolerance: float = 2.0  # latency up to tolerance x the baseline counts as "near the baseline"
    window_s: float = 0.1  # a new limit is computed once per window of this length ...
    min_samples: int = 10  # ... holding at least this many completed calls (a window stretches until it does)
    baseline_windows: int = 100  # the baseline is the lowest window latency of the last this many windows
    capacity: int = 1  # calls the server computes at once (its compute threads): beyond it calls queue

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError("the limits need 1 <= min_limit <= max_limit")
        if not (self.tolerance >= 1 and self.window_s > 0 and self.min_samples >= 1 and self.baseline_windows >= 1):
            raise ValueError("tolerance >= 1, window_s > 0, min_samples >= 1 and baseline_windows >= 1")
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")


class AdaptiveLimit:
    """How many calls may be in progress at once, adjusted to measured latency. Not thread-safe: one event loop
    admits, releases and observes.

    The idea is that of TCP Vegas as Netflix's concurrency-limits applies it, and of Envoy's adaptive concurrency
    filter: while calls take about as long as they do unloaded, more of them at once only raises throughput, so
    the limit may grow; once latency rises above that, extra calls only wait (in the event loop, for a compute
    thread), so the limit shrinks in proportion. Concretely, once per window (`window_s`, with at least
    `min_samples` completed calls):

    - the window's latency is the median latency (arrival to answer) of the calls that completed in it;
    - the baseline is the lowest window latency of the last `baseline_windows` windows (the unloaded latency; it
      follows a slower model or machine within that many windows);
    - latency <= tolerance x baseline: the limit grows by sqrt(limit) when the window used at least half of it
      (as concurrency-limits does: a limit far from reached says nothing about more calls), else it stays;
    - latency above that: limit x (tolerance x baseline / latency), never less than half the limit at once;
    - the result is kept within [min_limit, max_limit]. It starts at max_limit, so a server that is never loaded
      behaves as the fixed limit did.

    Latency is the whole call's, so it also rises when a dependency slows down (a profile store answering near its
    budget): the limit then shrinks too, until the baseline has followed the new latency (`baseline_windows`).
    """

    def __init__(self, settings: LimitSettings, now: float) -> None:
        self.settings = settings
        self.limit = float(settings.max_limit)
        self.in_flight = 0
        self.service_time: float | None = None  # moving average of handler time (handler start to answer)
        self.throughput: float | None = None  # calls completed per second in the last closed window
        self._window_start = now
        self._samples: list[float] = []
        self._peak = 0  # the most calls in progress at once during this window
        self._windows: deque[float] = deque(maxlen=settings.baseline_windows)

    @property
    def current(self) -> int:
        """The whole number of calls admitted at once now."""
        return max(self.settings.min_limit, math.floor(self.limit))

    @property
    def baseline(self) -> float | None:
        """The unloaded latency the limit compares against (None until a window has closed)."""
        return min(self._windows) if self._windows else None

    def admit(self) -> bool:
        """Count one more call in and return True, or return False when `current` calls are already in progress.
        An admitted call must be released when it ends, however it ends."""
        if self.in_flight >= self.current:
            return False
        self.in_flight += 1
        self._peak = max(self._peak, self.in_flight)
        return True

    def release(self) -> None:
        """Count an admitted call out."""
        self.in_flight -= 1

    def observe(self, latency_s: float, service_s: float, now: float) -> None:
        """Record a call that completed normally: `latency_s` from its arrival to its answer (every wait included),
        `service_s` from its handler starting to its answer. Closes the window when it is due."""
        self._samples.append(latency_s)
        w = SERVICE_TIME_WEIGHT
        self.service_time = service_s if self.service_time is None else (1 - w) * self.service_time + w * service_s
        if now - self._window_start >= self.settings.window_s and len(self._samples) >= self.settings.min_samples:
            self._close_window(now)

    def _close_window(self, now: float) -> None:
        """Compute the next limit from the window's latency (see the class docstring) and start a new window."""
        latency = statistics.median(self._samples)
        self._windows.append(latency)
        used = 2 * self._peak >= self.current
        self.limit = next_limit(self.limit, latency, min(self._windows), used, self.settings)
        self.throughput = len(self._samples) / (now - self._window_start)
        self._samples = []
        self._peak = self.in_flight
        self._window_start = now

    def expected_latency(self) -> float | None:
        """How long a call arriving now should take, given the calls ahead of it: None while nothing has been
        measured or while fewer calls than `capacity` are in progress (no queue: the call starts at once)."""
        capacity = self.settings.capacity
        ahead = self.in_flight - 1  # the call asking is already counted in
        if self.service_time is None or ahead < capacity:
            return None
        # The calls beyond capacity form a queue that drains `capacity` calls per service time.
        queued = ahead - capacity + 1
        expected = self.service_time * (1 + queued / capacity)
        if self.throughput is not None:
            # Calls that overlap (waiting on the profile store, batched together) drain faster than that model
            # says; the measured rate bounds the wait too (Little's law: the calls ahead and this one, at the
            # rate calls completed lately). The smaller estimate wins: refuse only what neither expects to fit.
            expected = min(expected, (ahead + 1) / self.throughput)
        return expected

    def deadline_refusal(self, remaining_s: float | None) -> str | None:
        """Why an admitted call with `remaining_s` left cannot meet its deadline behind the current queue, or
        None when it can (or has no deadline, or there is no queue)."""
        expected = self.expected_latency()
        if remaining_s is None or expected is None or remaining_s >= expected:
            return None
        return (
            f"server busy: {self.in_flight - 1} calls ahead would take about {expected * 1e3:.0f} ms, more than the "
            f"{max(remaining_s, 0.0) * 1e3:.0f} ms left before the deadline; retry elsewhere or with a longer deadline"
        )

    def refusal(self) -> str:
        """Why a call was not admitted, and what the caller should do: the message of the refusal."""
        return (
            f"server busy: {self.current} calls already in flight (the adaptive concurrency limit); "
            "retry with backoff or elsewhere"
        )


def next_limit(limit: float, latency: float, baseline: float, used: bool, settings: LimitSettings) -> float:
    """The limit after a window whose median latency was `latency` against `baseline` (see `AdaptiveLimit`)."""
    near = settings.tolerance * baseline
    if latency <= near:
        grown = limit + math.sqrt(limit) if used else limit
    else:
        grown = limit * max(MAX_DECREASE, near / latency)
    return min(float(settings.max_limit), max(float(settings.min_limit), grown))


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
