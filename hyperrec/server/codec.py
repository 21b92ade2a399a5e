"""The server side of the contract: requests decoded into domain types, answers encoded from them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import TypeVar

from hyperrec.core.domain import (
    Context,
    DeviceType,
    Event,
    EventType,
    Recommendation,
    RecommendRequest,
    Strategy,
    Surface,
)
from hyperrec.core.errors import InvalidArgument
from hyperrec.core.ingest import IngestResult
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import recommender_pb2 as pb

# Timestamp seconds representable as a datetime (0001-01-01 .. 9999-12-31).
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799

_STRATEGY = {
    Strategy.PERSONALIZED: pb.STRATEGY_PERSONALIZED,
    Strategy.COLD_START: pb.STRATEGY_COLD_START,
    Strategy.DEGRADED: pb.STRATEGY_DEGRADED,
    Strategy.INTERESTS: pb.STRATEGY_INTERESTS,
    Strategy.NOT_PERSONALIZED: pb.STRATEGY_NOT_PERSONALIZED,
    Strategy.UNRANKED: pb.STRATEGY_UNRANKED,
}


E = TypeVar("E", bound=IntEnum)


def _enum(kind: type[E], value: int, field: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown enum value {value}") from None


def _timestamp(msg: pb.Context | ppb.Event, field: str) -> datetime | None:
    if not msg.HasField("event_time"):
        return None
    ts = msg.event_time
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS) or not (0 <= ts.nanos < 1_000_000_000):
        raise InvalidArgument(field, "is not a valid timestamp")
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def decode_context(msg: pb.Context, with_time: bool = True) -> Context:
    """The request context; `with_time=False` leaves its event_time out (undecoded, so it cannot reject)."""
    return Context(
        event_time=_timestamp(msg, "context.event_time") if with_time else None,
        utc_offset_minutes=msg.utc_offset_minutes,
        device=_enum(DeviceType, msg.device_type, "context.device_type"),
        country=msg.country,
        surface=_enum(Surface, msg.surface, "context.surface"),
        features=dict(msg.features),
    )


def decode_request(msg: pb.RecommendRequest, request_id: str) -> RecommendRequest:
    """Domain request from the wire message; enum values outside the contract raise InvalidArgument."""
    return RecommendRequest(
        user_id=msg.user_id,
        k=msg.k,
        context=decode_context(msg.context),
        exclude=tuple(msg.exclude_item_ids),
        request_id=request_id,
        include_timings=msg.include_timings,
        disable_personalization=msg.disable_personalization,
        include_seen=msg.include_seen_items,
    )


def decode_event(msg: ppb.Event) -> Event:
    """One event; InvalidArgument (field relative to the event) when an enum or timestamp is out of range.

    The event's own event_time is when it happened; its context's event_time is ignored (profiles.proto), so it
    is not decoded and cannot reject the event."""
    context = decode_context(msg.context, with_time=False)
    return Event(
        event_id=msg.event_id,
        user_id=msg.user_id,
        item_id=msg.item_id,
        event_type=_enum(EventType, msg.type, "type"),
        value=msg.value,
        event_time=_timestamp(msg, "event_time"),
        context=context,
    )


def encode_ingest_result(result: IngestResult, request_id: str) -> ppb.RecordEventsResponse:
    return ppb.RecordEventsResponse(
        accepted=result.accepted,
        duplicates=result.duplicates,
        dropped_no_consent=result.dropped_no_consent,
        rejected=[ppb.EventRejection(index=r.index, field=r.field, reason=r.reason) for r in result.rejected],
        request_id=request_id,
    )


def encode_response(rec: Recommendation) -> pb.RecommendResponse:
    out = pb.RecommendResponse(
        model_name=rec.model_name,
        model_version=rec.model_version,
        strategy=_STRATEGY[rec.strategy],
        request_id=rec.request_id,
        items=[pb.ScoredItem(item_id=i.item_id, score=i.score, retrieval_score=i.retrieval_score) for i in rec.items],
    )
    if rec.timings is not None:
        t = rec.timings
        out.timings.CopyFrom(
            pb.StageTimings(
                profile_ms=t.profile_ms, retrieval_ms=t.retrieval_ms, ranking_ms=t.ranking_ms, total_ms=t.total_ms
            )
        )
    return out
