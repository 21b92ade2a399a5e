"""A time budget that tells the awaited call's slowness from the event loop's own lateness.

`asyncio.wait_for(call, budget)` blames the call for every budget it misses. When the event loop is saturated,
the budget timer fires late, and the call's answer may have been waiting in a socket buffer for a loop iteration
that had no time for it: the miss is ours, not the call's. `within_budget` looks at the call when the budget
runs out and measures how late that look is (when the timer was due against when the waiting task got to run):

- the look is on time (late by at most a fifth of the budget) and there is no answer: the call missed its
  budget through its own fault (`MissCause.STORE`);
- the look is late: the loop kept the call (or its answer) waiting, so the budget is extended by the lateness,
  the time the loop took from the call, and the call is looked at again; after `LATE_LOOKS` late looks in a row
  the miss is ours (`MissCause.LOCAL`).

A failure of the call's own that the caller marks as a timeout (`timeouts`) and that ends the call after a late
look is ours too: such timeouts are loop timers as well. Any other failure is the call's, whenever it comes.

The call runs in a task of its own, so a late look does not cancel it; when the wait ends without an answer the
task is cancelled, and its outcome is always retrieved (no "Task exception was never retrieved" in the log).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# A look later than this share of the budget means the loop, not the call, was behind.
LATE_TOLERANCE_SHARE = 0.2
# Late looks in a row after which a call without an answer is given up (as our miss, not the call's).
LATE_LOOKS = 16


class MissCause(enum.Enum):
    """Whose fault a budget miss is. Values are what the budget-miss metric exports."""

    STORE = "store"  # the loop looked on time and the call had not answered
    LOCAL = "local"  # the event loop was late every time it looked


class BudgetMissed(Exception):
    """The call gave no answer within its budget (extended for the loop's lateness); `cause` says whose fault.

    Deliberately not a TimeoutError: a handler of timeouts must not count a local miss against the call.
    """

    def __init__(self, cause: MissCause, late_looks: int) -> None:
        super().__init__(f"no answer within the budget ({cause.value} miss after {late_looks} late looks)")
        self.cause = cause
        self.late_looks = late_looks


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the outcome of a task as seen, whoever stopped waiting for it."""
    if not task.cancelled():
        task.exception()


async def within_budget(
    call: Callable[[], Coroutine[Any, Any, T]],
    budget_s: float,
    timeouts: tuple[type[BaseException], ...] = (),
) -> T:
    """The answer of `call()` within `budget_s` of on-time loop service, else BudgetMissed (see the module).

    The call's own exceptions propagate, except one of `timeouts` after a late look: that is a local miss.
    Cancelling the caller cancels the call.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(call())
    task.add_done_callback(_retrieve)
    tolerance = budget_s * LATE_TOLERANCE_SHARE
    due = loop.time() + budget_s
    late_looks = 0
    try:
        while True:
            await asyncio.wait((task,), timeout=max(due - loop.time(), 0.0))
            now = loop.time()
            lateness = now - due
            late = lateness > tolerance
            late_looks += late  # a call that ended in the iteration of a late look counts it too
            if task.done():
                break
            if not late:
                raise BudgetMissed(MissCause.STORE, late_looks)
            if late_looks >= LATE_LOOKS:
                raise BudgetMissed(MissCause.LOCAL, late_looks)
            due = now + lateness  # give back the time the loop took from the call
    finally:
        if not task.done():
            task.cancel()
    error = task.exception()
    if error is not None and late_looks and isinstance(error, timeouts):
        raise BudgetMissed(MissCause.LOCAL, late_looks) from error
    return task.result()
