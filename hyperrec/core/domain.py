"""Protocol-neutral request and response types, and request validation.

The gRPC codec converts to and from these; nothing here knows about protobuf.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from hyperrec.core.errors import InvalidArgument

MAX_USER_ID_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
MAX_ITEM_ID_BYTES = 256
MAX_FEATURES = 32
MAX_FEATURE_KEY_BYTES = 64
MAX_FEATURE_VALUE_BYTES = 256
MAX_UTC_OFFSET_MINUTES = 14 * 60
EARLIEST_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE_EVENT_TOLERANCE = timedelta(hours=24)
_COUNTRY = re.compile(r"[A-Z]{2}")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def is_printable_ascii(text: str) -> bool:
    """True for text that may travel as a gRPC metadata value (request ids)."""
    return _PRINTABLE_ASCII.fullmatch(text) is not None


class DeviceType(enum.IntEnum):
    """Device kinds; values equal the contract's enum numbers."""

    UNSPECIFIED = 0
    MOBILE = 1
    DESKTOP = 2
    TABLET = 3
    TV = 4


class Surface(enum.IntEnum):
    """Where results are shown; values equal the contract's enum numbers."""

    UNSPECIFIED = 0
    HOME = 1
    ITEM_DETAIL = 2
    SEARCH = 3
    CART = 4
    NOTIFICATION = 5


class Strategy(enum.Enum):
    """How an answer was produced."""

    PERSONALIZED = "personalized"
    COLD_START = "cold_start"
    DEGRADED = "degraded"
    INTERESTS = "interests"
    NOT_PERSONALIZED = "not_personalized"
    UNRANKED = "unranked"


@dataclass(frozen=True)
class Context:
    """Where and when recommendations are shown. `event_time` is timezone-aware UTC or None (now)."""

    event_time: datetime | None = None
    utc_offset_minutes: int = 0
    device: DeviceType = DeviceType.UNSPECIFIED
    country: str = ""
    surface: Surface = Surface.UNSPECIFIED
    features: Mapping[str, str] = field(default_factory=dict)

    def local_time(self, now: datetime) -> datetime:
        """The event's wall-clock time at the user's UTC offset (naive datetime)."""
        at = self.event_time if self.event_time is not None else now
        return (at + timedelta(minutes=self.utc_offset_minutes)).replace(tzinfo=None)


@dataclass(frozen=True)
class RecommendRequest:
    """One Recommend call, decoded."""

    user_id: str
    k: int
    context: Context = field(default_factory=Context)
    exclude: tuple[str, ...] = ()
    request_id: str = ""
    include_timings: bool = False
    disable_personalization: bool = False
    include_seen: bool = False  # False: the profile's recent items are excluded too


@dataclass(frozen=True)
class ScoredItem:
    """One recommended item with its ranker and retrieval scores."""

    item_id: str
    score: float
    retrieval_score: float


@dataclass
class StageTimings:
    """Milliseconds spent per pipeline stage."""

    profile_ms: float = 0.0
    retrieval_ms: float = 0.0
    ranking_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Recommendation:
    """The pipeline's answer."""

    items: tuple[ScoredItem, ...]
    model_name: str
    model_version: str
    strategy: Strategy
    request_id: str
    timings: StageTimings | None = None


@dataclass(frozen=True)
class RequestLimits:
    """Server-configured bounds that a request must respect."""

    max_k: int = 100
    max_exclusions: int = 1000


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def request_id_problem(request_id: str) -> str | None:
    """Why a caller's request id is unacceptable, or None. Acceptable ids can be echoed as gRPC metadata."""
    if _utf8_len(request_id) > MAX_REQUEST_ID_BYTES:
        return f"must be at most {MAX_REQUEST_ID_BYTES} bytes"
    if not is_printable_ascii(request_id):
        return "must be printable ASCII"
    return None


def validate_request(req: RecommendRequest, limits: RequestLimits, now: datetime) -> None:
    """Raise InvalidArgument naming the first offending field; return None when the request is valid."""
    validate_user_id(req.user_id)
    if req.k < 1 or req.k > limits.max_k:
        raise InvalidArgument("k", f"must be between 1 and {limits.max_k}, got {req.k}")
    if len(req.exclude) > limits.max_exclusions:
        raise InvalidArgument("exclude_item_ids", f"at most {limits.max_exclusions} ids, got {len(req.exclude)}")
    for item_id in req.exclude:
        if _utf8_len(item_id) > MAX_ITEM_ID_BYTES:
            raise InvalidArgument("exclude_item_ids", f"ids must be at most {MAX_ITEM_ID_BYTES} bytes")
    problem = request_id_problem(req.request_id)
    if problem is not None:
        raise InvalidArgument("request_id", problem)
    validate_context(req.context, now)


def validate_context(ctx: Context, now: datetime) -> None:
    """Raise InvalidArgument naming the first offending context field."""
    if ctx.event_time is not None:
        if ctx.event_time.tzinfo is None:
            raise InvalidArgument("context.event_time", "must be timezone-aware")
        if ctx.event_time < EARLIEST_EVENT_TIME or ctx.event_time > now + FUTURE_EVENT_TOLERANCE:
            raise InvalidArgument(
                "context.event_time",
                "must lie between 2000-01-01T00:00:00Z and 24 hours from now",
            )
    if abs(ctx.utc_offset_minutes) > MAX_UTC_OFFSET_MINUTES:
        raise InvalidArgument("context.utc_offset_minutes", f"must be within ±{MAX_UTC_OFFSET_MINUTES}")
    if ctx.country and not _COUNTRY.fullmatch(ctx.country):
        raise InvalidArgument("context.country", "must be an upper-case ISO 3166-1 alpha-2 code")
    if len(ctx.features) > MAX_FEATURES:
        raise InvalidArgument("context.features", f"at most {MAX_FEATURES} entries")
    for key, value in ctx.features.items():
        if not key or _utf8_len(key) > MAX_FEATURE_KEY_BYTES:
            raise InvalidArgument("context.features", f"keys must be 1-{MAX_FEATURE_KEY_BYTES} bytes")
        if _utf8_len(value) > MAX_FEATURE_VALUE_BYTES:
            raise InvalidArgument("context.features", f"values must be at most {MAX_FEATURE_VALUE_BYTES} bytes")


class EventType(enum.IntEnum):
    """What a user did with an item; values equal the contract's enum numbers."""

    UNSPECIFIED = 0
    VIEW = 1
    CLICK = 2
    LIKE = 3
    SHARE = 4
    ADD_TO_CART = 5
    PURCHASE = 6
    DWELL = 7
    RATING = 8


MAX_EVENT_ID_BYTES = 128
MAX_RATING = 10.0
MAX_INTERESTS = 20
MAX_CATEGORY_BYTES = 128


@dataclass(frozen=True)
class Event:
    """One user event, decoded. `value`: dwell milliseconds for DWELL, the rating for RATING, else unused.

    `event_time` is timezone-aware UTC, or None for "now on the server's clock".
    """

    event_id: str
    user_id: str
    item_id: str
    event_type: EventType
    value: float = 0.0
    event_time: datetime | None = None
    context: Context = field(default_factory=Context)


def validate_user_id(user_id: str, field_name: str = "user_id") -> None:
    if not user_id:
        raise InvalidArgument(field_name, "must not be empty")
    if _utf8_len(user_id) > MAX_USER_ID_BYTES:
        raise InvalidArgument(field_name, f"must be at most {MAX_USER_ID_BYTES} bytes")


def validate_event(event: Event, now: datetime) -> None:
    """Raise InvalidArgument naming the first offending field of one event (field names relative to the event)."""
    if not event.event_id:
        raise InvalidArgument("event_id", "must not be empty (it makes retries idempotent)")
    if _utf8_len(event.event_id) > MAX_EVENT_ID_BYTES:
        raise InvalidArgument("event_id", f"must be at most {MAX_EVENT_ID_BYTES} bytes")
    validate_user_id(event.user_id)
    if not event.item_id:
        raise InvalidArgument("item_id", "must not be empty")
    if _utf8_len(event.item_id) > MAX_ITEM_ID_BYTES:
        raise InvalidArgument("item_id", f"must be at most {MAX_ITEM_ID_BYTES} bytes")
    if event.event_type == EventType.UNSPECIFIED:
        raise InvalidArgument("type", "must be set")
    if not math.isfinite(event.value):
        raise InvalidArgument("value", "must be a finite number")
    if event.event_type == EventType.DWELL and event.value < 0:
        raise InvalidArgument("value", "dwell milliseconds must not be negative")
    if event.event_type == EventType.RATING and not 0 < event.value <= MAX_RATING:
        raise InvalidArgument("value", f"a rating must be above 0 and at most {MAX_RATING:g}")
    try:
        validate_context(replace(event.context, event_time=event.event_time), now)
    except InvalidArgument as exc:
        field_name = "event_time" if exc.field == "context.event_time" else exc.field
        raise InvalidArgument(field_name, exc.reason) from None


def validate_interests(categories: tuple[str, ...], known: Collection[str] | None) -> None:
    """Declared interests: at most MAX_INTERESTS distinct names, each in the active model's vocabulary."""
    if len(categories) > MAX_INTERESTS:
        raise InvalidArgument("categories", f"at most {MAX_INTERESTS} entries, got {len(categories)}")
    for i, name in enumerate(categories):
        if not name or _utf8_len(name) > MAX_CATEGORY_BYTES:
            raise InvalidArgument(f"categories[{i}]", f"must be 1-{MAX_CATEGORY_BYTES} bytes")
        if known is not None and name not in known:
            raise InvalidArgument(f"categories[{i}]", f"{name!r} is not a category of the active model")
    if len(set(categories)) != len(categories):
        raise InvalidArgument("categories", "must not repeat a name")
