"""Hostile input over the wire, against one real server (real channel, real Redis, real bundle).

Hypothesis builds Recommend, RecordEvents and profile requests with odd unicode, empty and very long strings,
int32 extremes, unknown enum numbers, NaN and infinities and out-of-range timestamps, and checks every answer
against the documented contract: OK with a well-formed response exactly when the request is valid, else
INVALID_ARGUMENT naming one of the offending fields. Raw-bytes fuzzing (random bytes, mutated valid messages and
hand-made malformed protobufs) goes to every Profiles method, Recommend and one ModelAdmin method, bypassing the
client's serializer. Oversized messages and fields hit the documented limits (docs/api.md, "Limits").

Never acceptable anywhere: UNKNOWN, INTERNAL, or DEADLINE_EXCEEDED (every call has a few seconds: running out
means the server hung). Afterwards the server still answers, health is SERVING and nothing is left in flight.
The in-process codec and validation properties are in tests/test_encoding.py; these go over the wire.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import event as label
from hypothesis import strategies as st

from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import recommender_pb2 as pb
from tests.conftest import RedisProcess
from tests.helpers import SERVING, health_status, publish_toy, sample
from tests.serving import TEST_SECRET, Running, running_server

MAX_MESSAGE_BYTES = 256 * 1024  # small enough to exceed cheaply, large enough for a 100 KB field under it
MAX_K = 100
MAX_EXCLUSIONS = 1000
MAX_EVENTS = 1000
N_ITEMS = 300
CATEGORIES = 5
ADMIN = "hostile-admin-token-0123456789"
AUTH = (("authorization", f"Bearer {ADMIN}"),)
TIMEOUT_S = 5.0

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Everything a hostile request may get; UNKNOWN, INTERNAL and DEADLINE_EXCEEDED (a hang) never.
ALLOWED = frozenset(
    {
        OK,
        INVALID,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

RECOMMEND = "/hyperrec.v1.Recommender/Recommend"
RECORD_EVENTS = "/hyperrec.v1.Profiles/RecordEvents"
SET_CONSENT = "/hyperrec.v1.Profiles/SetConsent"
FORGET_USER = "/hyperrec.v1.Profiles/ForgetUser"
SET_INTERESTS = "/hyperrec.v1.Profiles/SetInterests"
LOAD_VERSION = "/hyperrec.v1.ModelAdmin/LoadVersion"
LIST_MODELS = "/hyperrec.v1.ModelAdmin/ListModels"
# Method, request type, metadata: every method that parses caller bytes.
METHODS: tuple[tuple[str, type[Message], tuple[tuple[str, str], ...]], ...] = (
    (RECOMMEND, pb.RecommendRequest, ()),
    (RECORD_EVENTS, ppb.RecordEventsRequest, ()),
    (SET_CONSENT, ppb.SetConsentRequest, ()),
    (FORGET_USER, ppb.ForgetUserRequest, ()),
    (SET_INTERESTS, ppb.SetInterestsRequest, ()),
    (LOAD_VERSION, apb.LoadVersionRequest, AUTH),
)
RESPONSES: dict[str, type[Message]] = {
    RECOMMEND: pb.RecommendResponse,
    RECORD_EVENTS: ppb.RecordEventsResponse,
    SET_CONSENT: ppb.SetConsentResponse,
    FORGET_USER: ppb.ForgetUserResponse,
    SET_INTERESTS: ppb.SetInterestsResponse,
    LOAD_VERSION: apb.LoadVersionResponse,
    LIST_MODELS: apb.ListModelsResponse,
}

ITEM_IDS = [f"item-{i:05d}" for i in range(N_ITEMS)]  # publish_toy's catalogue
CATEGORY_NAMES = [f"cat-{i}" for i in range(CATEGORIES)]

# The contract's bounds, restated from the .proto comments (not imported: the server is what is under test).
MIN_TIMESTAMP_S = -62_135_596_800  # 0001-01-01: the Timestamp type's own range
MAX_TIMESTAMP_S = 253_402_300_799  # 9999-12-31T23:59:59
EARLIEST_S = 946_684_800  # 2000-01-01T00:00:00Z
FUTURE_S = 24 * 3600
# Strategies draw around this instant, fixed per run (Hypothesis needs a strategy to be the same on replay).
NOW_S = int(time.time())
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
HEX_ID = re.compile(r"[0-9a-f]{32}")
PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


# --- the server ----------------------------------------------------------------------------------------------


@dataclass
class Baseline:
    in_flight: float
    faults: dict[tuple[str, str], float] = field(default_factory=dict)


FAULT_CODES = ("INTERNAL", "UNKNOWN")


def fault_counts() -> dict[tuple[str, str], float]:
    methods = [m for m, _, _ in METHODS] + [LIST_MODELS]
    return {
        (m, c): sample("hyperrec_grpc_requests_total", {"method": m, "code": c}) for m in methods for c in FAULT_CODES
    }


@dataclass
class Hostile:
    running: Running
    baseline: Baseline


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hostile-repo")
    publish_toy(repo, n_items=N_ITEMS, dim=8, seed=5, categories=CATEGORIES)
    return repo


@pytest.fixture(scope="module")
async def hostile(repo: Path, redis_process: RedisProcess) -> AsyncIterator[Hostile]:
    if redis_process.proc is None:
        redis_process.start()
    redis.Redis.from_url(redis_process.url).flushall()
    baseline = Baseline(sample("hyperrec_grpc_requests_in_flight"), fault_counts())
    async with running_server(
        repo,
        "toy",
        redis_url=redis_process.url,
        profile_secret=TEST_SECRET,
        max_message_bytes=MAX_MESSAGE_BYTES,
        admin_token=ADMIN,
    ) as running:
        assert running.app.config.max_k == MAX_K and running.app.config.max_exclusions == MAX_EXCLUSIONS
        assert running.app.config.max_events_per_batch == MAX_EVENTS
        yield Hostile(running, baseline)


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str
    reply: bytes | None
    trailers: dict[str, str]

    @property
    def field(self) -> str:
        """The field path an INVALID_ARGUMENT message starts with (`context.device_type: ...`)."""
        return self.details.split(": ", 1)[0]


async def call(running: Running, method: str, payload: bytes, metadata: Sequence[tuple[str, str]] = ()) -> Answer:
    """One unary call with raw request bytes (no client serializer); a status that must never occur fails here."""
    stub: Any = running.channel.unary_unary(method)
    try:
        reply = await stub(payload, timeout=TIMEOUT_S, metadata=tuple(metadata))
        answer = Answer(OK, "", reply, {})
    except grpc.aio.AioRpcError as exc:
        trailers = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
        answer = Answer(exc.code(), exc.details() or "", None, trailers)
    shown = payload[:200] + (b"..." if len(payload) > 200 else b"")
    assert answer.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung on {shown!r}"
    assert answer.code in ALLOWED, f"{method} answered {answer.code.name} ({answer.details}) to {shown!r}"
    return answer


def expect_invalid(answer: Answer, fields: set[str] | str, what: object = "") -> None:
    allowed = {fields} if isinstance(fields, str) else fields
    assert answer.code == INVALID, f"{what!r}: expected INVALID_ARGUMENT naming {allowed}, got {answer.code.name}"
    assert answer.field in allowed, f"{what!r}: {answer.details!r} names none of {allowed}"


# --- strategies ----------------------------------------------------------------------------------------------

# Strings as they can travel (protobuf strings are UTF-8: no lone surrogates), plus deliberately odd ones.
WIRE_CHARS = st.characters(codec="utf-8")
ODD = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\u200b",  # zero-width space
    "\u202e" + "evil",  # right-to-left override
    "e\u0301" * 3,  # combining marks
    "\ufeff",
    "\U0001f600" * 4,  # 4-byte characters
    "\U0010ffff",
    "ǅ",
    "𝔘𝔰𝔢𝔯",
    "ﬀ",
    "İ",
    "\r\n\t",
    "../../etc/passwd",
    "' OR 1=1 --",
    "%s%n{0}",
    "{}[]:\x1f\x1e",
    "é" * 128,  # 256 bytes: exactly the longest id
    "é" * 129,  # 258 bytes
    "u" * 256,
    "u" * 257,
]
TEXT = st.one_of(
    st.text(WIRE_CHARS, max_size=24),
    st.sampled_from(ODD),
    st.text(WIRE_CHARS, min_size=200, max_size=3000),
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001f600", "\x00"]), st.integers(1, 1500)),
)
USERS = st.one_of(st.sampled_from(["alice", "bob", "ünï", "\U0001f600", "x" * 256]), TEXT)
ITEMS = st.one_of(st.sampled_from(ITEM_IDS), TEXT)
ASCII_IDS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=140)
REQUEST_IDS = st.one_of(st.just(""), ASCII_IDS, TEXT)

# Within the limits but still odd: any UTF-8, NULs, combining marks, RTL overrides, 4-byte characters.
SHORT_TEXT = st.one_of(st.text(WIRE_CHARS, min_size=1, max_size=24), st.sampled_from([s for s in ODD if s]))
VALID_USERS = st.one_of(st.sampled_from(["alice", "bob", "ünï", "\U0001f600", "x" * 256, "é" * 128]), SHORT_TEXT)
VALID_REQUEST_IDS = st.one_of(st.just(""), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=128))


def timestamps(hostile: bool) -> st.SearchStrategy[tuple[int, int]]:
    """(seconds, nanos): any int64 and int32 with the edges of both ranges, or only the contract's range."""
    if not hostile:
        return st.tuples(st.integers(EARLIEST_S, NOW_S + FUTURE_S - 300), st.integers(0, 999_999_999))
    seconds = st.one_of(
        INT64,
        st.integers(MIN_TIMESTAMP_S - 2, MIN_TIMESTAMP_S + 2),
        st.integers(MAX_TIMESTAMP_S - 2, MAX_TIMESTAMP_S + 2),
        st.integers(EARLIEST_S - 2, EARLIEST_S + 2),
        st.integers(EARLIEST_S, NOW_S + 2 * FUTURE_S),
    )
    nanos = st.one_of(INT32, st.integers(-1, 1_000_000_000), st.sampled_from([0, 999_999_999]))
    # Away from the moving "24 hours from now" edge: the server reads its clock a moment later.
    return st.tuples(seconds, nanos).filter(lambda ts: abs(ts[0] - (NOW_S + FUTURE_S)) > 300)


def timestamp_ok(ts: tuple[int, int] | None) -> bool:
    """The contract: a valid Timestamp between 2000-01-01 and 24 hours from now (or unset)."""
    if ts is None:
        return True
    seconds, nanos = ts
    if not (MIN_TIMESTAMP_S <= seconds <= MAX_TIMESTAMP_S and 0 <= nanos < 1_000_000_000):
        return False
    return seconds >= EARLIEST_S and seconds + nanos / 1e9 <= time.time() + FUTURE_S


class Picker:
    """Draws each field from its valid or its hostile strategy, by a mode drawn once per request: all valid
    (so the OK paths get exercised with odd but legal values), one field hostile, or every field hostile."""

    def __init__(self, draw: st.DrawFn, fields: Sequence[str]) -> None:
        self._draw = draw
        self._mode = draw(st.sampled_from(["valid", "one", "chaos"]))
        self._bad = draw(st.sampled_from(fields))

    def __call__(self, name: str, valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
        bad = self._mode == "chaos" or (self._mode == "one" and name == self._bad)
        return self._draw(hostile if bad else valid)


CONTEXT_FIELDS = ("event_time", "utc_offset_minutes", "device_type", "surface", "country", "features")


def draw_context(pick: Picker) -> tuple[pb.Context, tuple[int, int] | None]:
    features = st.dictionaries(
        st.text(WIRE_CHARS, min_size=1, max_size=16).filter(lambda k: utf8_len(k) <= 64),
        st.text(WIRE_CHARS, max_size=64),
        max_size=8,
    )
    ctx = pb.Context(
        utc_offset_minutes=pick(
            "utc_offset_minutes",
            st.integers(-840, 840),
            st.one_of(INT32, st.sampled_from([-(2**31), -841, 841, 2**31 - 1])),
        ),
        device_type=pick("device_type", st.integers(0, 4), st.one_of(st.integers(-1, 6), INT32)),
        surface=pick("surface", st.integers(0, 5), st.one_of(st.integers(-1, 7), INT32)),
        country=pick(
            "country",
            st.sampled_from(["", "DE", "BR", "US", "ZZ"]),
            st.one_of(st.sampled_from(["de", "D", "DEU", "ÄÖ", "D1", "ＤＥ", "DE\n", " DE"]), TEXT),
        ),
        features=pick(
            "features",
            features,
            st.one_of(
                st.dictionaries(TEXT, TEXT, max_size=6),
                st.dictionaries(st.text(WIRE_CHARS, min_size=1, max_size=8), st.just("v"), min_size=33, max_size=36),
            ),
        ),
    )
    ts = pick("event_time", st.none() | timestamps(hostile=False), st.none() | timestamps(hostile=True))
    if ts is not None:
        ctx.event_time.seconds, ctx.event_time.nanos = ts
    return ctx, ts


def context_problems(ctx: pb.Context, ts: tuple[int, int] | None) -> set[str]:
    """The offending fields of a context, per the contract."""
    problems = set()
    if not timestamp_ok(ts):
        problems.add("context.event_time")
    if abs(ctx.utc_offset_minutes) > 840:
        problems.add("context.utc_offset_minutes")
    if ctx.device_type not in range(5):
        problems.add("context.device_type")
    if ctx.surface not in range(6):
        problems.add("context.surface")
    if ctx.country and re.fullmatch(r"[A-Z]{2}", ctx.country, flags=re.ASCII) is None:
        problems.add("context.country")
    features = dict(ctx.features)
    if len(features) > 32 or any(not k or utf8_len(k) > 64 or utf8_len(v) > 256 for k, v in features.items()):
        problems.add("context.features")
    return problems


def request_id_ok(request_id: str) -> bool:
    return utf8_len(request_id) <= 128 and PRINTABLE_ASCII.fullmatch(request_id) is not None


def user_ok(user_id: str) -> bool:
    return 0 < utf8_len(user_id) <= 256


# --- Recommend, typed, over the wire ---------------------------------------------------------------------------


@st.composite
def recommend_requests(draw: st.DrawFn) -> tuple[pb.RecommendRequest, set[str]]:
    """A request and the fields the contract says are wrong in it (none: it must be answered OK)."""
    pick = Picker(draw, ("user_id", "k", "exclude_item_ids", "request_id", *CONTEXT_FIELDS))
    ctx, ts = draw_context(pick)
    excluded = pick(
        "exclude_item_ids",
        st.one_of(
            st.lists(st.sampled_from(ITEM_IDS), max_size=N_ITEMS),
            st.lists(st.one_of(st.sampled_from(ITEM_IDS), SHORT_TEXT), max_size=20),
            st.builds(lambda n: [f"x{i}" for i in range(n)], st.integers(MAX_EXCLUSIONS - 2, MAX_EXCLUSIONS)),
        ),
        st.one_of(
            st.lists(ITEMS, max_size=20),
            st.builds(lambda n: [f"x{i}" for i in range(n)], st.integers(MAX_EXCLUSIONS - 2, MAX_EXCLUSIONS + 2)),
        ),
    )
    req = pb.RecommendRequest(
        user_id=pick("user_id", VALID_USERS, TEXT),
        k=pick("k", st.integers(1, MAX_K), st.one_of(st.integers(-2, MAX_K + 2), INT32)),
        context=ctx,
        exclude_item_ids=excluded,
        request_id=pick("request_id", VALID_REQUEST_IDS, REQUEST_IDS),
        include_timings=draw(st.booleans()),
        disable_personalization=draw(st.booleans()),
    )
    problems = context_problems(ctx, ts)
    if not user_ok(req.user_id):
        problems.add("user_id")
    if not 1 <= req.k <= MAX_K:
        problems.add("k")
    if len(excluded) > MAX_EXCLUSIONS or any(utf8_len(i) > 256 for i in excluded):
        problems.add("exclude_item_ids")
    if not request_id_ok(req.request_id):
        problems.add("request_id")
    return req, problems


def check_recommendation(req: pb.RecommendRequest, reply: pb.RecommendResponse) -> None:
    """What the contract promises of an OK answer."""
    ids = [i.item_id for i in reply.items]
    excluded = set(req.exclude_item_ids)
    assert len(ids) == min(req.k, N_ITEMS - len(excluded & set(ITEM_IDS))), (len(ids), req.k)
    assert len(set(ids)) == len(ids) and not set(ids) & excluded and set(ids) <= set(ITEM_IDS)
    assert all(math.isfinite(i.score) and math.isfinite(i.retrieval_score) for i in reply.items)
    if reply.strategy == pb.STRATEGY_PERSONALIZED:
        scores = [i.score for i in reply.items]
        assert scores == sorted(scores, reverse=True)
    assert reply.strategy != pb.STRATEGY_UNSPECIFIED
    assert reply.model_name == "toy" and reply.model_version == "1"
    if req.request_id:
        assert reply.request_id == req.request_id
    else:
        assert HEX_ID.fullmatch(reply.request_id)
    assert reply.HasField("timings") == req.include_timings
    if req.include_timings:
        t = reply.timings
        assert all(math.isfinite(v) and v >= 0 for v in (t.profile_ms, t.retrieval_ms, t.ranking_ms, t.total_ms))


HOSTILE_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- RecordEvents, typed, over the wire -------------------------------------------------------------------------

FLOATS = st.one_of(
    st.floats(),  # NaN and infinities included
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.0, 10.0, 10.000001, -1.0]),
)


@st.composite
def events(draw: st.DrawFn) -> tuple[ppb.Event, set[str]]:
    """An event and the fields it must be rejected for (it may be rejected for no other)."""
    pick = Picker(draw, ("event_id", "user_id", "item_id", "type", "value", "own_event_time", *CONTEXT_FIELDS))
    ctx, _ = draw_context(pick)  # its event_time, valid or not, is ignored
    event_type = pick("type", st.integers(1, 8), st.one_of(st.integers(-1, 9), INT32))
    valid_value = st.floats(min_value=0, max_value=10, exclude_min=True) if event_type == 8 else st.floats(0, 1e308)
    event = ppb.Event(
        event_id=pick("event_id", st.text(WIRE_CHARS, min_size=1, max_size=16), TEXT),
        user_id=pick("user_id", VALID_USERS, TEXT),
        item_id=pick("item_id", st.one_of(st.sampled_from(ITEM_IDS), SHORT_TEXT), ITEMS),
        type=event_type,
        value=pick("value", valid_value, FLOATS),
        context=ctx,
    )
    ts = pick("own_event_time", st.none() | timestamps(hostile=False), st.none() | timestamps(hostile=True))
    if ts is not None:
        event.event_time.seconds, event.event_time.nanos = ts
    # Context.event_time of an event is ignored (the event's own counts), so it never rejects the event
    # (docs/api.md): judge the context without it.
    problems = context_problems(event.context, None)
    if not timestamp_ok(ts):
        problems.add("event_time")
    if not event.event_id or utf8_len(event.event_id) > 128:
        problems.add("event_id")
    if not user_ok(event.user_id):
        problems.add("user_id")
    if not event.item_id or utf8_len(event.item_id) > 256:
        problems.add("item_id")
    if event.type not in range(1, 9):
        problems.add("type")
    v = event.value
    if (
        not math.isfinite(v)
        or (event.type == ppb.EVENT_TYPE_DWELL and v < 0)
        or (event.type == ppb.EVENT_TYPE_RATING and not 0 < v <= 10)
    ):
        problems.add("value")
    return event, problems


# --- raw bytes ---------------------------------------------------------------------------------------------------


def parses(kind: type[Message], payload: bytes) -> bool:
    try:
        kind.FromString(payload)
    except DecodeError:
        return False
    return True


async def check_raw(running: Running, method: str, kind: type[Message], payload: bytes, metadata: Any = ()) -> Answer:
    """Bytes that are not a `kind` get INVALID_ARGUMENT naming `request`; others an allowed code (see `call`)."""
    answer = await call(running, method, payload, metadata)
    if not parses(kind, payload):
        expect_invalid(answer, "request", payload[:64])
    elif answer.code == OK:
        assert answer.reply is not None
        RESPONSES[method].FromString(answer.reply)  # a well-formed reply
    return answer


def _valid_payloads() -> list[tuple[str, type[Message], Any, bytes]]:
    """One realistic valid request per method, to mutate."""
    ctx = pb.Context(device_type=pb.DEVICE_TYPE_MOBILE, country="DE", surface=pb.SURFACE_HOME, features={"a": "b"})
    ctx.event_time.seconds = NOW_S - 60
    event = ppb.Event(
        event_id="e1", user_id="alice", item_id=ITEM_IDS[3], type=ppb.EVENT_TYPE_RATING, value=4.5, context=ctx
    )
    return [
        (
            RECOMMEND,
            pb.RecommendRequest,
            (),
            pb.RecommendRequest(
                user_id="alice", k=10, context=ctx, exclude_item_ids=ITEM_IDS[:3], request_id="r-1"
            ).SerializeToString(),
        ),
        (RECORD_EVENTS, ppb.RecordEventsRequest, (), ppb.RecordEventsRequest(events=[event] * 2).SerializeToString()),
        (SET_CONSENT, ppb.SetConsentRequest, (), ppb.SetConsentRequest(user_id="bob").SerializeToString()),
        (FORGET_USER, ppb.ForgetUserRequest, (), ppb.ForgetUserRequest(user_id="mallory").SerializeToString()),
        (
            SET_INTERESTS,
            ppb.SetInterestsRequest,
            (),
            ppb.SetInterestsRequest(user_id="carol", categories=CATEGORY_NAMES[:2]).SerializeToString(),
        ),
        (
            LOAD_VERSION,
            apb.LoadVersionRequest,
            AUTH,
            apb.LoadVersionRequest(model="toy", version=1).SerializeToString(),
        ),
    ]


@st.composite
def mutated(draw: st.DrawFn, payload: bytes) -> bytes:
    """`payload` with a few truncations, byte flips, insertions or repeated slices."""
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["truncate", "flip", "insert", "repeat", "delete"]))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 16))] * draw(st.integers(1, 4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def padded(payload: bytes, size: int, field_number: int = 999) -> bytes:
    """`payload` plus one unknown length-delimited field, `size` bytes in all."""
    tag = varint(field_number << 3 | 2)
    n = size - len(payload) - len(tag) - 1
    while len(payload) + len(tag) + len(varint(n)) + n != size:
        n -= 1
    return payload + tag + varint(n) + b"\0" * n


VALID_PAYLOADS = _valid_payloads()
GOOD_RECOMMEND = pb.RecommendRequest(user_id="alice", k=3).SerializeToString()

# Hand-made malformed and odd encodings: (name, payload, True when the bytes are not a valid message).
MALFORMED: list[tuple[str, bytes, bool]] = [
    ("empty message", b"", False),
    ("truncated varint", b"\x10\xff", True),
    ("varint of eleven bytes", b"\x10" + b"\xff" * 10 + b"\x01", True),
    ("length beyond the end", b"\x0a\x10abc", True),
    ("length near 2**63", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\x7f", True),
    ("valid message then garbage", GOOD_RECOMMEND + b"\xff\xff\xff", True),
    ("valid message then tag 0", GOOD_RECOMMEND + b"\x00", True),
    ("field number 0", b"\x00\x01", True),
    ("field number 2**29", b"\x80\x80\x80\x80\x10\x01", True),
    ("wire type 6", b"\x0e", True),
    ("wire type 7", b"\x0f", True),
    ("end group without start", b"\x0c", True),
    ("mismatched end group", b"\x7b\x84\x01", True),
    ("unknown fixed64 truncated", b"\x79\x01\x02", True),
    ("unknown fixed32 truncated", b"\x7d\x01", True),
    ("groups nested 99 deep", b"\x7b" * 99 + b"\x7c" * 99, False),
    ("groups nested 100,000 deep", b"\x7b" * 100_000 + b"\x7c" * 100_000, True),
    ("unclosed group", b"\x7b" * 10, True),
    ("string field as varint (wrong wire type)", b"\x08\x01", False),
    ("string field as group (wrong wire type)", b"\x0b\x0c", False),
    ("int field as length-delimited (wrong wire type)", b"\x12\x01a", False),
    ("unknown fields", GOOD_RECOMMEND + b"\xc0\x3e\x01" + b"\xfa\x3e\x03abc" + b"\xf8\xff\xff\xff\x0f\x01", False),
    ("k as a 10-byte varint (uint64 max)", b"\x0a\x01u\x10" + b"\xff" * 9 + b"\x01", False),
    ("user_id not UTF-8", b"\x0a\x02\xc3\x28", True),
    ("user_id a lone surrogate in UTF-8", b"\x0a\x03\xed\xa0\x80", True),
    ("user_id an overlong NUL", b"\x0a\x02\xc0\x80", True),
    ("context.country not UTF-8", b"\x1a\x04\x22\x02\xff\xfe", True),
    ("context truncated inside", b"\x1a\x05\x22\x02DE", True),
    ("features map entry with a key not UTF-8", b"\x1a\x06\x32\x04\x0a\x02\xff\xff", True),
    ("features map entry with garbage", b"\x1a\x04\x32\x02\xff\xff", True),
    ("exclusion not UTF-8", GOOD_RECOMMEND + b"\x22\x01\x80", True),
    ("event_time nanos as a string", b"\x1a\x04\x0a\x02\x12\x00", False),
]


# --- the tests ---------------------------------------------------------------------------------------------------


@HOSTILE_SETTINGS
@given(batch=st.lists(events(), max_size=6), request_id=REQUEST_IDS)
async def test_record_events_answers_hostile_events_per_the_contract(
    hostile: Hostile, batch: list[tuple[ppb.Event, set[str]]], request_id: str
) -> None:
    req = ppb.RecordEventsRequest(events=[e for e, _ in batch], request_id=request_id)
    batch_problems = set() if request_id_ok(request_id) else {"request_id"}
    if not batch:
        batch_problems.add("events")
    answer = await call(hostile.running, RECORD_EVENTS, req.SerializeToString())
    if batch_problems:
        expect_invalid(answer, batch_problems, req)
        return
    assert answer.code == OK, f"{answer.code.name} {answer.details} for {req}"
    assert answer.reply is not None
    reply = ppb.RecordEventsResponse.FromString(answer.reply)
    label(f"accepted {min(reply.accepted, 1)}+, rejected {min(len(reply.rejected), 1)}+")
    assert reply.accepted + reply.duplicates + reply.dropped_no_consent + len(reply.rejected) == len(batch)
    rejected = {r.index: r for r in reply.rejected}
    for index, (event, problems) in enumerate(batch):
        if problems:
            assert index in rejected, f"event {index} should be rejected for {problems}: {event}"
        if index in rejected:
            named = rejected[index].field
            assert named in problems, f"event {index}: {rejected[index]} names none of {problems}: {event}"
            assert rejected[index].reason
    assert reply.request_id == request_id if request_id else HEX_ID.fullmatch(reply.request_id)


@HOSTILE_SETTINGS
@given(case=recommend_requests())
async def test_recommend_answers_hostile_requests_per_the_contract(
    hostile: Hostile, case: tuple[pb.RecommendRequest, set[str]]
) -> None:
    req, problems = case
    answer = await call(hostile.running, RECOMMEND, req.SerializeToString())
    if problems:
        label(f"invalid: {answer.field}")
        expect_invalid(answer, problems, req)
        quoted = answer.trailers.get("x-request-id", "")
        assert (
            quoted == req.request_id if req.request_id and request_id_ok(req.request_id) else HEX_ID.fullmatch(quoted)
        )
        assert answer.details.endswith(f"(request id {quoted})")
        return
    assert answer.code == OK, f"{answer.code.name} {answer.details} for {req}"
    assert answer.reply is not None
    reply = pb.RecommendResponse.FromString(answer.reply)
    label(pb.Strategy.Name(reply.strategy))  # --hypothesis-show-statistics: which code paths were reached
    check_recommendation(req, reply)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user_id=USERS,
    personalization=st.booleans(),
    categories=st.lists(st.one_of(st.sampled_from(CATEGORY_NAMES), TEXT), max_size=22),
)
async def test_profile_calls_answer_hostile_user_ids_and_categories(
    hostile: Hostile, user_id: str, personalization: bool, categories: list[str]
) -> None:
    running = hostile.running
    user_problem = set() if user_ok(user_id) else {"user_id"}
    for method, payload in (
        (SET_CONSENT, ppb.SetConsentRequest(user_id=user_id, personalization=personalization)),
        (FORGET_USER, ppb.ForgetUserRequest(user_id=user_id)),
    ):
        answer = await call(running, method, payload.SerializeToString())
        if user_problem:
            expect_invalid(answer, user_problem, payload)
        else:
            assert answer.code == OK, f"{method}: {answer.code.name} {answer.details}"
    problems = set(user_problem)
    if len(categories) > 20:
        problems.add("categories")
    for i, name in enumerate(categories):
        if not name or utf8_len(name) > 128 or name not in CATEGORY_NAMES:
            problems.add(f"categories[{i}]")
    if len(set(categories)) != len(categories):
        problems.add("categories")
    req = ppb.SetInterestsRequest(user_id=user_id, categories=categories)
    answer = await call(running, SET_INTERESTS, req.SerializeToString())
    if problems:
        expect_invalid(answer, problems, req)
    else:  # FAILED_PRECONDITION: an earlier example left this user opted out
        assert answer.code in (OK, grpc.StatusCode.FAILED_PRECONDITION), f"{answer.code.name} {answer.details}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(METHODS), payload=st.binary(max_size=600))
async def test_random_bytes_get_an_allowed_code(
    hostile: Hostile, target: tuple[str, type[Message], Any], payload: bytes
) -> None:
    method, kind, metadata = target
    answer = await check_raw(hostile.running, method, kind, payload, metadata)
    label(f"{method.rsplit('/', 1)[1]}: {answer.code.name}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
async def test_mutated_valid_messages_get_an_allowed_code(hostile: Hostile, data: st.DataObject) -> None:
    method, kind, metadata, payload = data.draw(st.sampled_from(VALID_PAYLOADS), label="base")
    answer = await check_raw(hostile.running, method, kind, data.draw(mutated(payload), label="payload"), metadata)
    label(f"{method.rsplit('/', 1)[1]}: {answer.code.name}")


@pytest.mark.parametrize(("name", "payload", "malformed"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_protobufs_are_invalid_argument_everywhere(
    hostile: Hostile, name: str, payload: bytes, malformed: bool
) -> None:
    for method, kind, metadata in METHODS:
        if malformed:
            # The same bytes may be valid for another message type (a field it lacks is unknown to it).
            assert not parses(pb.RecommendRequest, payload), name
        answer = await check_raw(hostile.running, method, kind, payload, metadata)
        if not parses(kind, payload):
            expected = f"request: not a valid {kind.DESCRIPTOR.name}"
            assert answer.details.startswith(expected), (method, answer.details)
        if method == RECOMMEND and not malformed:
            if name == "unknown fields":
                assert answer.code == OK, answer.details  # proto3: unknown fields are skipped
            else:
                assert answer.code == INVALID, answer.details  # parses, but user_id is empty or k is 0


async def test_an_events_ignored_context_time_does_not_reject_it(hostile: Hostile) -> None:
    event = ppb.Event(event_id="ctx-time", user_id="dave", item_id=ITEM_IDS[1], type=ppb.EVENT_TYPE_CLICK)
    event.context.event_time.nanos = -1
    answer = await call(hostile.running, RECORD_EVENTS, ppb.RecordEventsRequest(events=[event]).SerializeToString())
    assert answer.code == OK and answer.reply is not None
    reply = ppb.RecordEventsResponse.FromString(answer.reply)
    assert not reply.rejected, reply.rejected


async def test_a_message_over_max_message_bytes_is_resource_exhausted(hostile: Hostile) -> None:
    running = hostile.running
    for method, _, metadata in METHODS:
        answer = await call(running, method, padded(b"", MAX_MESSAGE_BYTES + 1), metadata)
        assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, answer)
        huge = b"\xff" * (4 * MAX_MESSAGE_BYTES)  # garbage too: refused before it is parsed
        assert (await call(running, method, huge, metadata)).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Exactly at the limit the message is read (the padding is an unknown field, so the request is valid).
    at_limit = await call(running, RECOMMEND, padded(GOOD_RECOMMEND, MAX_MESSAGE_BYTES))
    assert at_limit.code == OK, at_limit
    big_user = pb.RecommendRequest(user_id="u" * (MAX_MESSAGE_BYTES + 10), k=3).SerializeToString()
    assert (await call(running, RECOMMEND, big_user)).code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_huge_fields_under_the_message_limit_name_the_field(hostile: Hostile) -> None:
    running = hostile.running
    long_text = "u" * 100_000

    async def recommend(**fields: Any) -> Answer:
        req = pb.RecommendRequest(**{"user_id": "alice", "k": 5, **fields})
        return await call(running, RECOMMEND, req.SerializeToString())

    expect_invalid(await recommend(user_id=long_text), "user_id")
    expect_invalid(await recommend(k=0), "k")
    expect_invalid(await recommend(k=MAX_K + 1), "k")
    expect_invalid(await recommend(k=2**31 - 1), "k")
    expect_invalid(await recommend(k=-(2**31)), "k")
    expect_invalid(await recommend(exclude_item_ids=[f"x{i}" for i in range(10_000)]), "exclude_item_ids")
    expect_invalid(await recommend(exclude_item_ids=[f"x{i}" for i in range(MAX_EXCLUSIONS + 1)]), "exclude_item_ids")
    assert (await recommend(exclude_item_ids=[f"x{i}" for i in range(MAX_EXCLUSIONS)])).code == OK
    expect_invalid(await recommend(exclude_item_ids=["i" * 257]), "exclude_item_ids")
    expect_invalid(await recommend(context=pb.Context(utc_offset_minutes=841)), "context.utc_offset_minutes")
    expect_invalid(await recommend(context=pb.Context(utc_offset_minutes=-(2**31))), "context.utc_offset_minutes")
    expect_invalid(await recommend(context=pb.Context(device_type=2**31 - 1)), "context.device_type")  # type: ignore[arg-type]
    expect_invalid(await recommend(context=pb.Context(surface=-1)), "context.surface")  # type: ignore[arg-type]
    expect_invalid(await recommend(context=pb.Context(country=long_text)), "context.country")
    many = {f"k{i}": "v" for i in range(33)}
    expect_invalid(await recommend(context=pb.Context(features=many)), "context.features")
    expect_invalid(await recommend(context=pb.Context(features={"k" * 65: "v"})), "context.features")
    expect_invalid(await recommend(context=pb.Context(features={"k": long_text})), "context.features")
    expect_invalid(await recommend(context=pb.Context(features={"": "v"})), "context.features")
    for seconds, nanos in ((2**63 - 1, 0), (-(2**63), 0), (0, 0), (EARLIEST_S, -1), (EARLIEST_S, 10**9)):
        ctx = pb.Context()
        ctx.event_time.seconds, ctx.event_time.nanos = seconds, nanos
        expect_invalid(await recommend(context=ctx), "context.event_time", (seconds, nanos))
    answer = await recommend(request_id="r" * 100_000)
    expect_invalid(answer, "request_id")
    assert HEX_ID.fullmatch(answer.trailers["x-request-id"])  # the caller's id is not echoed, a made-up one is

    # Profiles: the same limits, each breach named.
    for method, msg in (
        (SET_CONSENT, ppb.SetConsentRequest(user_id=long_text)),
        (FORGET_USER, ppb.ForgetUserRequest(user_id=long_text)),
        (SET_INTERESTS, ppb.SetInterestsRequest(user_id=long_text)),
    ):
        expect_invalid(await call(running, method, msg.SerializeToString()), "user_id", method)
    too_many = ppb.SetInterestsRequest(user_id="carol", categories=[f"c{i}" for i in range(21)])
    expect_invalid(await call(running, SET_INTERESTS, too_many.SerializeToString()), "categories")
    long_name = ppb.SetInterestsRequest(user_id="carol", categories=["c" * 100_000])
    expect_invalid(await call(running, SET_INTERESTS, long_name.SerializeToString()), "categories[0]")

    def event(i: int, **fields: Any) -> ppb.Event:
        base: dict[str, Any] = {
            "event_id": f"bulk-{i}",
            "user_id": f"bulk-user-{i % 10}",
            "item_id": ITEM_IDS[i % N_ITEMS],
            "type": ppb.EVENT_TYPE_VIEW,
        }
        return ppb.Event(**{**base, **fields})

    for n in (0, MAX_EVENTS + 1, 100_000):  # empty events (2 bytes each): the batch is refused before they matter
        req = ppb.RecordEventsRequest(events=[ppb.Event()] * n)
        expect_invalid(await call(running, RECORD_EVENTS, req.SerializeToString()), "events", n)
    full = await call(
        running,
        RECORD_EVENTS,
        ppb.RecordEventsRequest(events=[event(i) for i in range(MAX_EVENTS)]).SerializeToString(),
    )
    assert full.code == OK and full.reply is not None
    assert ppb.RecordEventsResponse.FromString(full.reply).accepted == MAX_EVENTS
    for model, version, named in (("", 1, "model"), ("a/b", 1, "model"), ("..", 1, "model"), ("toy", 0, "version")):
        admin_req = apb.LoadVersionRequest(model=model, version=version).SerializeToString()
        expect_invalid(await call(running, LOAD_VERSION, admin_req, AUTH), named, (model, version))
    absent = apb.LoadVersionRequest(model="toy", version=2**63 - 1).SerializeToString()
    assert (await call(running, LOAD_VERSION, absent, AUTH)).code == grpc.StatusCode.NOT_FOUND

    long_field = "é" * 20_000  # 40 KB: four of them fit under the message limit
    odd = [
        event(0, event_id=long_field),
        event(1, user_id=long_field),
        event(2, item_id=long_field),
        event(3, type=ppb.EVENT_TYPE_DWELL, value=math.inf),
        event(4, type=ppb.EVENT_TYPE_RATING, value=math.nan),
        event(5, type=ppb.EVENT_TYPE_DWELL, value=-math.inf),
        event(6, type=ppb.EVENT_TYPE_RATING, value=1e308),
        event(7, type=2**31 - 1),
        event(8, context=pb.Context(features={"k": long_field})),
        event(9, type=ppb.EVENT_TYPE_DWELL, value=1e308, event_id="dwell-max"),  # valid: dwell weight is capped
    ]
    answer = await call(running, RECORD_EVENTS, ppb.RecordEventsRequest(events=odd).SerializeToString())
    assert answer.code == OK and answer.reply is not None
    reply = ppb.RecordEventsResponse.FromString(answer.reply)
    fields = {r.index: r.field for r in reply.rejected}
    assert fields == {
        0: "event_id",
        1: "user_id",
        2: "item_id",
        3: "value",
        4: "value",
        5: "value",
        6: "value",
        7: "type",
        8: "context.features",
    }
    assert reply.accepted + reply.duplicates == 1


async def test_a_flood_of_hostile_calls_is_answered_and_nothing_is_left_in_flight(hostile: Hostile) -> None:
    running = hostile.running
    bases = VALID_PAYLOADS
    payloads: list[tuple[str, type[Message], Any, bytes]] = []
    for i in range(400):
        method, kind, metadata, payload = bases[i % len(bases)]
        if i % 3 == 1:
            payload = payload[: len(payload) // 2]
        elif i % 3 == 2:
            payload = bytes(b ^ 0x5A for b in payload)
        payloads.append((method, kind, metadata, payload))
    answers = await asyncio.gather(*(check_raw(running, m, k, p, md) for m, k, md, p in payloads))
    assert {a.code for a in answers} <= ALLOWED  # RESOURCE_EXHAUSTED when more than max_in_flight overlap


@pytest.mark.parametrize("model", ["toy\x00", "tö", "to y", "t*y", "\u202etoy"])
async def test_a_model_name_outside_the_documented_alphabet_is_invalid_argument(hostile: Hostile, model: str) -> None:
    req = apb.LoadVersionRequest(model=model, version=1).SerializeToString()
    expect_invalid(await call(hostile.running, LOAD_VERSION, req, AUTH), "model", model)


async def test_a_burst_beyond_grpc_pending_limit_is_refused_resource_exhausted(hostile: Hostile) -> None:
    stub: Any = hostile.running.channel.unary_unary(FORGET_USER)
    payload = ppb.ForgetUserRequest(user_id="burst").SerializeToString()

    async def one() -> grpc.StatusCode:
        try:
            await stub(payload, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return OK

    codes = await asyncio.gather(*(one() for _ in range(3000)))
    assert set(codes) <= {OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, {c.name: codes.count(c) for c in set(codes)}


async def test_the_server_is_still_healthy_afterwards(hostile: Hostile) -> None:
    """Runs last in this module: after everything above the server answers normally and nothing is stuck."""
    running = hostile.running
    reply = await running.stub.Recommend(pb.RecommendRequest(user_id="alice", k=10), timeout=TIMEOUT_S)
    assert len(reply.items) == 10
    for service in ("", "hyperrec.v1.Recommender", "hyperrec.v1.Profiles"):
        assert await health_status(running.channel, service, TIMEOUT_S) == SERVING
    listed = await call(running, LIST_MODELS, b"", AUTH)
    assert listed.code == OK and listed.reply is not None
    assert apb.ListModelsResponse.FromString(listed.reply).models[0].active_version == 1
    assert sample("hyperrec_grpc_requests_in_flight") == hostile.baseline.in_flight == 0
    assert fault_counts() == hostile.baseline.faults, "some call was answered INTERNAL or UNKNOWN"
