"""A synchronous client for the Profiles service (used by `hyperrec events`, `interests`, `consent`, `forget`).

Each function makes one call on a channel of its own and returns plain values. A refused call raises ClientError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from hyperrec.client.connect import Connection
from hyperrec.client.recommend import build_context
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc

# "click", "purchase", ... (the EventType names without their prefix, lower case)
EVENT_TYPES = tuple(
    v.name.removeprefix("EVENT_TYPE_").lower() for v in ppb.EventType.DESCRIPTOR.values if v.number != 0
)


@dataclass(frozen=True)
class EventSpec:
    """One user event as plain values; `type` is one of EVENT_TYPES; `when` None means now on the server's clock."""

    event_id: str
    user_id: str
    item_id: str
    type: str
    value: float = 0.0
    when: datetime | None = None
    device: str = "unspecified"
    surface: str = "unspecified"
    country: str = ""


@dataclass(frozen=True)
class Rejection:
    """Why the event at `index` of a batch was not stored: the offending field and the reason."""

    index: int
    field: str
    reason: str


@dataclass(frozen=True)
class IngestOutcome:
    """What a RecordEvents call did with its batch."""

    accepted: int
    duplicates: int
    dropped_no_consent: int
    rejected: tuple[Rejection, ...]
    request_id: str


def build_event(spec: EventSpec) -> ppb.Event:
    """The Event message for `spec`; ValueError names an unknown event type, device or surface."""
    if spec.type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {spec.type!r} (one of {', '.join(EVENT_TYPES)})")
    event = ppb.Event(
        event_id=spec.event_id,
        user_id=spec.user_id,
        item_id=spec.item_id,
        type=ppb.EventType.Value(f"EVENT_TYPE_{spec.type.upper()}"),
        value=spec.value,
        context=build_context(spec.device, spec.surface, spec.country),
    )
    if spec.when is not None:
        event.event_time.FromDatetime(spec.when)
    return event


def record_events(connection: Connection, events: Sequence[EventSpec], timeout_s: float = 10.0) -> IngestOutcome:
    """Send one batch of events; what the server did with each is in the outcome."""
    request = ppb.RecordEventsRequest(events=[build_event(e) for e in events])
    reply = connection.unary(ppb_grpc.ProfilesStub, "RecordEvents", request, timeout_s)
    rejected = tuple(Rejection(r.index, r.field, r.reason) for r in reply.rejected)
    return IngestOutcome(reply.accepted, reply.duplicates, reply.dropped_no_consent, rejected, reply.request_id)


def set_consent(connection: Connection, user_id: str, personalization: bool, timeout_s: float = 10.0) -> bool:
    """Record the user's choice; True when opting out deleted a profile that existed."""
    request = ppb.SetConsentRequest(user_id=user_id, personalization=personalization)
    return bool(connection.unary(ppb_grpc.ProfilesStub, "SetConsent", request, timeout_s).profile_deleted)


def forget_user(connection: Connection, user_id: str, timeout_s: float = 10.0) -> tuple[str, ...]:
    """Erase everything the server holds for the user; the kinds of data that existed."""
    return tuple(
        connection.unary(ppb_grpc.ProfilesStub, "ForgetUser", ppb.ForgetUserRequest(user_id=user_id), timeout_s).deleted
    )


def set_interests(
    connection: Connection, user_id: str, categories: Sequence[str], timeout_s: float = 10.0
) -> tuple[str, ...]:
    """Store the user's declared categories (empty clears them); the interests now stored."""
    request = ppb.SetInterestsRequest(user_id=user_id, categories=list(categories))
    return tuple(connection.unary(ppb_grpc.ProfilesStub, "SetInterests", request, timeout_s).categories)
