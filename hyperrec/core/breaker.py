"""A circuit breaker for the profile store: a dead Redis must cost requests no time.

closed → (failure_threshold consecutive failures) → open: calls are refused at once
for `open_s` → half-open: one probe call is let through; success closes the
breaker, failure opens it for another `open_s`. What a failure is, is the caller's to say: the pipeline counts
the store's errors and the budget misses that are the store's fault, never one caused by the event loop's own
lateness (hyperrec/core/budget.py).

Why not a library: pybreaker's asynchronous calls need Tornado, aiobreaker has been
unmaintained since 2021, and purgatory's unit-of-work API cannot express "a call
cancelled by the caller's deadline is neither success nor failure"; the state
machine itself is a dozen lines.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class CircuitOpen(Exception):
    """The breaker is open: the call was not made."""


class BreakerState(enum.IntEnum):
    """Values are what the `hyperrec_profile_store_breaker_state` gauge exports."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        open_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
        failures: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        if failure_threshold < 1 or open_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_s > 0")
        self._threshold = failure_threshold
        self._open_s = open_s
        self._clock = clock
        self._on_change = on_change
        self._failure_types = failures
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._state == BreakerState.OPEN and self._clock() - self._opened_at >= self._open_s:
            return BreakerState.HALF_OPEN
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """Whether a call may go to the store now. In half-open state only one probe at a time is allowed."""
        state = self.state
        if state == BreakerState.CLOSED:
            return True
        if state == BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            self._set(BreakerState.HALF_OPEN)
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._probing = False
            self._set(BreakerState.OPEN)

    def abandoned(self) -> None:
        """An allowed call ended without an answer for reasons of its own (its caller's deadline)."""
        self._probing = False

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Make and await one call through the breaker.

        CircuitOpen at once while the breaker refuses calls (the call is never made). An exception of the
        `failures` types counts as a failure; a cancellation (the caller's deadline) or any other exception as
        neither; an answer as a success. Exceptions propagate.
        """
        if not self.allow():
            raise CircuitOpen("circuit open")
        try:
            result = await make()
        except self._failure_types:
            self.failure()
            raise
        except (asyncio.CancelledError, Exception):
            self.abandoned()
            raise
        self.success()
        return result
