"""Live profiles: recording events, consent, erasure and declared interests. Protocol-neutral.

An event batch is validated event by event; good events are grouped per user and
each user's group is applied by the store in one atomic step (a Lua script in
Redis). The user vector is then refolded from the updated recent items with the
active bundle's embeddings, so the user's next Recommend reflects the events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from hyperrec.core import metrics
from hyperrec.core.behaviour import engagement_weight
from hyperrec.core.breaker import CircuitBreaker, CircuitOpen
from hyperrec.core.bundle import Bundle
from hyperrec.core.domain import Event, validate_event, validate_interests, validate_user_id
from hyperrec.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from hyperrec.core.pipeline import BundleSlot, fold_recent
from hyperrec.core.profile import StoredEvent
from hyperrec.core.profile_store import ProfileStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Rejection:
    """An invalid event: its position in the batch, the offending field and why."""

    index: int
    field: str
    reason: str


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    dropped_no_consent: int
    rejected: tuple[Rejection, ...]


def stored_event(event: Event, now: datetime, bundle: Bundle | None) -> StoredEvent:
    """A valid event as the stores take it: engagement weight, unix time, the item's categories (when known)."""
    categories = () if bundle is None else bundle.categories_of(event.item_id)
    at = (event.event_time or now).timestamp()
    weight = engagement_weight(event.event_type, event.value)
    return StoredEvent(event.event_id, event.item_id, event.event_type, weight, at, categories)


class ProfileService:
    """What the Profiles RPCs do. Shares the pipeline's bundle slot and the store's circuit breaker."""

    def __init__(self, store: ProfileStore, slot: BundleSlot, breaker: CircuitBreaker, max_events: int) -> None:
        self._store = store
        self._slot = slot
        self._breaker = breaker
        self._max_events = max_events

    async def _guarded(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run a store call through the circuit breaker: refused at once (UNAVAILABLE) while it is open."""
        try:
            return await self._breaker.call(make)
        except CircuitOpen:
            raise Unavailable("the profile store is unavailable (circuit open); retry later") from None

    async def record_events(self, events: Sequence[Event | InvalidArgument]) -> IngestResult:
        """Store the valid events; entries that are already an InvalidArgument (they failed to decode)
        and events failing validation come back as rejections with their index."""
        if not events:
            raise InvalidArgument("events", "must not be empty")
        if len(events) > self._max_events:
            raise InvalidArgument("events", f"at most {self._max_events} per call, got {len(events)}")
        now = datetime.now(UTC)
        bundle = self._slot.active
        rejected: list[Rejection] = []
        by_user: dict[str, list[StoredEvent]] = {}
        for index, event in enumerate(events):
            try:
                if isinstance(event, InvalidArgument):
                    raise event
                validate_event(event, now)
            except InvalidArgument as exc:
                rejected.append(Rejection(index, exc.field, exc.reason))
                continue
            by_user.setdefault(event.user_id, []).append(stored_event(event, now, bundle))
        outcomes = await asyncio.gather(*(self._record_user(u, evs, bundle) for u, evs in by_user.items()))
        accepted = sum(a for a, _, _ in outcomes)
        duplicates = sum(d for _, d, _ in outcomes)
        dropped = sum(n for _, _, n in outcomes)
        for outcome, count in (
            ("accepted", accepted),
            ("duplicate", duplicates),
            ("no_consent", dropped),
            ("rejected", len(rejected)),
        ):
            metrics.EVENTS.labels(outcome).inc(count)
        return IngestResult(accepted, duplicates, dropped, tuple(rejected))

    async def _record_user(
        self, user_id: str, events: list[StoredEvent], bundle: Bundle | None
    ) -> tuple[int, int, int]:
        """(accepted, duplicates, dropped for lack of consent) for one user's events."""
        outcome = await self._guarded(lambda: self._store.record(user_id, events))
        if outcome.opted_out:
            return 0, 0, len(events)
        accepted = sum(outcome.fresh)
        if accepted and bundle is not None and outcome.profile is not None:
            vector = fold_recent(bundle, outcome.profile)
            if vector is not None:
                space = bundle.manifest.embedding_space
                await self._guarded(lambda: self._store.set_vector(user_id, vector, space, outcome.seq))
        return accepted, len(events) - accepted, 0

    async def set_consent(self, user_id: str, personalization: bool) -> bool:
        validate_user_id(user_id)
        deleted = await self._guarded(lambda: self._store.set_consent(user_id, personalization))
        metrics.PRIVACY_ACTIONS.labels("opt_in" if personalization else "opt_out").inc()
        return deleted

    async def forget(self, user_id: str) -> tuple[str, ...]:
        validate_user_id(user_id)
        deleted = await self._guarded(lambda: self._store.forget(user_id))
        metrics.PRIVACY_ACTIONS.labels("forget").inc()
        log.info("erased a user's data: %s", ", ".join(deleted) or "nothing was stored")
        return deleted

    async def set_interests(self, user_id: str, categories: Sequence[str]) -> tuple[str, ...]:
        validate_user_id(user_id)
        bundle = self._slot.active
        if bundle is None:
            raise Unavailable("no model version is loaded yet")
        if categories and bundle.categories is None:
            raise FailedPrecondition(f"model {bundle.model_name} version {bundle.version} has no item categories")
        interests = tuple(categories)
        validate_interests(interests, None if bundle.categories is None else bundle.categories.index)
        if not await self._guarded(lambda: self._store.set_interests(user_id, interests)):
            raise FailedPrecondition("the user opted out of personalization; interests are not stored")
        return interests
