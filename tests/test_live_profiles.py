"""Live profiles end to end: the Profiles RPCs and Recommend over a real gRPC channel, a real server, a real
bundle with item categories and (where stated) a real redis-server."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
import redis

from hyperrec.core.behaviour import engagement_weight, replay
from hyperrec.core.bundle import Bundle
from hyperrec.core.domain import EventType
from hyperrec.core.profile import Profile, StoredEvent
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from tests.helpers import publish_toy
from tests.serving import TEST_SECRET, Running, request, running_server

if TYPE_CHECKING:
    from hyperrec.v1.profiles_pb2_grpc import ProfilesAsyncStub

N_ITEMS = 300
N_CATEGORIES = 5
BACKENDS = ["memory", "redis"]


@pytest.fixture(scope="module")
def cat_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy bundle whose item i is in category cat-{i % 5}, its embedding near that category's centre."""
    repo = tmp_path_factory.mktemp("live-repo")
    publish_toy(repo, n_items=N_ITEMS, dim=8, seed=7, categories=N_CATEGORIES)
    return repo


@pytest.fixture(scope="module")
def cat_bundle(cat_repo: Path) -> Bundle:
    return Bundle.load(cat_repo / "toy" / "1")


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy bundle without item categories."""
    repo = tmp_path_factory.mktemp("plain-repo")
    publish_toy(repo, n_items=100, dim=8, seed=5)
    return repo


@dataclass
class Live:
    running: Running
    profiles: ProfilesAsyncStub
    redis_url: str | None

    async def recommend(self, user: str, k: int = 10, disable_personalization: bool = False) -> pb.RecommendResponse:
        req = request(user, k=k)
        req.disable_personalization = disable_personalization
        reply: pb.RecommendResponse = await self.running.stub.Recommend(req, timeout=5)
        return reply

    async def record(self, events: Sequence[ppb.Event], request_id: str = "") -> ppb.RecordEventsResponse:
        return await self.profiles.RecordEvents(
            ppb.RecordEventsRequest(events=list(events), request_id=request_id), timeout=5
        )

    async def stored(self, user: str) -> Profile | None:
        return await self.running.app.store.get(user)


@asynccontextmanager
async def live_server(repo: Path, redis_url: str | None = None, **overrides: Any) -> AsyncIterator[Live]:
    """A server on `repo` (Redis when a URL is given, else the in-process store), with generous budgets so
    that a slow machine never turns an answer DEGRADED."""
    settings: dict[str, Any] = {"profile_budget_ms": 2000, "redis_read_timeout_ms": 2000, **overrides}
    if redis_url is not None:
        settings.update(redis_url=redis_url, profile_secret=TEST_SECRET)
    async with running_server(repo, "toy", **settings) as running:
        yield Live(running, ppb_grpc.ProfilesStub(running.channel), redis_url)


@pytest.fixture(params=BACKENDS)
async def live(request: pytest.FixtureRequest, cat_repo: Path) -> AsyncIterator[Live]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    async with live_server(cat_repo, url) as server:
        yield server


@pytest.fixture
async def live_redis(cat_repo: Path, redis_url: str) -> AsyncIterator[Live]:
    async with live_server(cat_repo, redis_url) as server:
        yield server


def item(row: int) -> str:
    return f"item-{row:05d}"


def items_in(category: int, count: int, skip: int = 0) -> list[str]:
    """`count` distinct items of cat-{category}, after skipping the first `skip` of them."""
    rows = range(category, N_ITEMS, N_CATEGORIES)
    return [item(r) for r in rows[skip : skip + count]]


def category_of(item_id: str) -> int:
    return int(item_id.removeprefix("item-")) % N_CATEGORIES


def count_in(reply: pb.RecommendResponse, category: int) -> int:
    return sum(1 for i in reply.items if category_of(i.item_id) == category)


def event(
    event_id: str,
    user: str,
    item_id: str,
    kind: ppb.EventType.ValueType = ppb.EVENT_TYPE_CLICK,
    value: float = 0.0,
    at: datetime | None = None,
    context: pb.Context | None = None,
) -> ppb.Event:
    msg = ppb.Event(event_id=event_id, user_id=user, item_id=item_id, type=kind, value=value, context=context)
    if at is not None:
        msg.event_time.FromDatetime(at)
    return msg


def clicks(user: str, item_ids: Sequence[str], prefix: str) -> list[ppb.Event]:
    return [event(f"{prefix}-{n}", user, i) for n, i in enumerate(item_ids)]


def user_keys_in_redis(url: str, user: str) -> set[bytes]:
    """Every key in Redis that belongs to `user` (scanning all keys)."""
    hashed = Pseudonymizer(TEST_SECRET.encode()).user_key(user).encode()
    return {k for k in redis.Redis.from_url(url).scan_iter(count=1000) if hashed in k}


def optout_key(user: str) -> bytes:
    return f"hr:{{{Pseudonymizer(TEST_SECRET.encode()).user_key(user)}}}:optout".encode()


class CommandStats:
    """Counts the commands Redis runs (those inside scripts included) from `reset()` to `calls()`.
    One connection, opened before the reset, so its own handshake is not counted."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)

    def reset(self) -> None:
        self._client.config_resetstat()

    def calls(self) -> dict[str, int]:
        stats = self._client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_")}


def assert_balanced(reply: ppb.RecordEventsResponse, sent: int) -> None:
    assert reply.accepted + reply.duplicates + reply.dropped_no_consent + len(reply.rejected) == sent


async def assert_invalid(call: Any, req: Any, field: str) -> str:
    """The call fails INVALID_ARGUMENT naming `field`; returns the details."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith(f"{field}:"), details
    return details


# 1. Per-event validation


def mixed_batch() -> tuple[list[ppb.Event], dict[int, str]]:
    """Good and bad events of users u1 and u2, and the field each bad one must be rejected for."""
    ancient = datetime(1999, 12, 31, 23, 59, tzinfo=UTC)
    future = datetime.now(UTC) + timedelta(days=3)
    ignored_context_time = pb.Context(country="DE")
    ignored_context_time.event_time.FromDatetime(ancient)  # a context's own event_time is ignored for events
    unknown_device = pb.Context(device_type=pb.DeviceType.ValueType(99))
    events = [
        event("e0", "u1", item(2)),  # good: click
        event("e1", "u1", ""),  # empty item
        event("e2", "u1", item(7), ppb.EVENT_TYPE_PURCHASE),  # good
        event("e3", "u1", item(7), ppb.EVENT_TYPE_UNSPECIFIED),
        event("e4", "u1", item(7), ppb.EVENT_TYPE_DWELL, -1.0),
        event("e5", "u1", item(12), ppb.EVENT_TYPE_DWELL, 60_000.0, context=ignored_context_time),  # good
        event("e6", "u1", item(7), ppb.EVENT_TYPE_RATING, 0.0),
        event("e7", "u1", item(7), ppb.EVENT_TYPE_RATING, 11.0),
        event("e8", "u1", item(17), ppb.EVENT_TYPE_RATING, 10.0),  # good: the highest rating
        event("e9", "u1", item(7), ppb.EVENT_TYPE_CLICK, math.nan),
        event("e10", "u1", item(7), at=ancient),
        event("e11", "u1", item(7), context=pb.Context(country="de")),
        event("", "u1", item(7)),
        event("e13", "u1", item(7), ppb.EventType.ValueType(99)),
        event("e14", "u2", item(3), ppb.EVENT_TYPE_VIEW),  # good: another user
        event("e15", "", item(7)),
        event("e16", "u1", item(7), at=future),
        event("e17", "u1", item(7), context=unknown_device),
        event("e18", "u1", "not-in-catalogue", ppb.EVENT_TYPE_VIEW),  # good: kept, no category
        event("e19", "u1", item(7), ppb.EVENT_TYPE_DWELL, math.inf),
    ]
    bad = {
        1: "item_id",
        3: "type",
        4: "value",
        6: "value",
        7: "value",
        9: "value",
        10: "event_time",
        11: "context.country",
        12: "event_id",
        13: "type",
        15: "user_id",
        16: "event_time",
        17: "context.device_type",
        19: "value",
    }
    return events, bad


async def test_bad_events_are_rejected_one_by_one_and_the_good_ones_stored(live: Live) -> None:
    events, bad = mixed_batch()
    reply = await live.record(events, request_id="batch-1")
    assert {r.index: r.field for r in reply.rejected} == bad
    assert [r.index for r in reply.rejected] == sorted(bad)
    assert all(r.reason for r in reply.rejected)
    assert reply.accepted == len(events) - len(bad) == 6
    assert reply.duplicates == 0 and reply.dropped_no_consent == 0
    assert_balanced(reply, len(events))
    assert reply.request_id == "batch-1"

    u1 = await live.stored("u1")
    assert u1 is not None
    assert u1.recent_items == ("not-in-catalogue", item(17), item(12), item(7), item(2))
    assert u1.recent_weights == (1.0, 4.0, 2.0, 10.0, 2.0)
    assert dict(u1.event_counts) == {"click": 1, "purchase": 1, "dwell": 1, "rating": 1, "view": 1}
    assert set(u1.categories) == {"cat-2"}  # the catalogue items are all of cat-2; the unknown one adds nothing
    assert u1.categories["cat-2"].weight == pytest.approx(2.0 + 10.0 + 2.0 + 4.0)
    u2 = await live.stored("u2")
    assert u2 is not None and u2.recent_items == (item(3),) and dict(u2.event_counts) == {"view": 1}
    assert await live.stored("") is None

    answer = await live.recommend("u1")
    assert answer.strategy == pb.STRATEGY_PERSONALIZED
    assert count_in(answer, 2) >= 8


async def test_a_batch_of_only_bad_events_still_succeeds(live: Live) -> None:
    reply = await live.record([event("", "u1", item(1)), event("x", "u1", "")])
    assert [(r.index, r.field) for r in reply.rejected] == [(0, "event_id"), (1, "item_id")]
    assert reply.accepted == 0
    assert len(reply.request_id) == 32  # made up by the server
    assert await live.stored("u1") is None


# 2. Batch-level errors


async def test_bad_batches_are_invalid_argument_naming_the_field(cat_repo: Path) -> None:
    async with live_server(cat_repo, max_events_per_batch=3) as server:
        call = server.profiles.RecordEvents
        details = await assert_invalid(call, ppb.RecordEventsRequest(), "events")
        assert "empty" in details
        too_many = ppb.RecordEventsRequest(events=clicks("u1", items_in(1, 4), "e"))
        details = await assert_invalid(call, too_many, "events")
        assert "3" in details and "4" in details
        for request_id in ("bad\nid", "é", "r" * 129):
            req = ppb.RecordEventsRequest(events=clicks("u1", items_in(1, 1), "e"), request_id=request_id)
            await assert_invalid(call, req, "request_id")
        assert await server.stored("u1") is None  # nothing of a refused batch was stored

        full = await server.record(clicks("u1", items_in(1, 3), "e"))  # exactly the maximum is fine
        assert full.accepted == 3


# 3. Idempotency


def profile_state(p: Profile | None) -> tuple[Any, ...]:
    assert p is not None
    vector = None if p.user_vector is None else p.user_vector.tobytes()
    return (
        p.recent_items,
        p.recent_weights,
        dict(p.categories),
        dict(p.event_counts),
        p.last_seen,
        p.updated_at,
        vector,
        p.embedding_space,
    )


async def test_a_retried_batch_is_all_duplicates_and_changes_nothing(live_redis: Live) -> None:
    base = datetime.now(UTC) - timedelta(hours=3)
    batch = [
        event("a", "u1", item(1), at=base),
        event("b", "u1", item(6), ppb.EVENT_TYPE_LIKE, at=base + timedelta(minutes=5)),
        event("c", "u1", item(2), ppb.EVENT_TYPE_DWELL, 45_000.0, at=base + timedelta(minutes=1)),
        event("d", "u2", item(3), ppb.EVENT_TYPE_PURCHASE),
    ]
    first = await live_redis.record(batch)
    assert first.accepted == 4 and first.duplicates == 0
    before = profile_state(await live_redis.stored("u1")), profile_state(await live_redis.stored("u2"))
    answer_before = await live_redis.recommend("u1")

    again = await live_redis.record(batch)
    assert again.accepted == 0 and again.duplicates == 4 and not again.rejected
    assert_balanced(again, len(batch))
    after = profile_state(await live_redis.stored("u1")), profile_state(await live_redis.stored("u2"))
    assert after == before
    answer_after = await live_redis.recommend("u1")
    assert [i.item_id for i in answer_after.items] == [i.item_id for i in answer_before.items]

    # A partly retried batch stores only the new event; an id repeated inside one batch counts once.
    partial = await live_redis.record([batch[0], event("e", "u1", item(11)), event("e", "u1", item(16))])
    assert (partial.accepted, partial.duplicates) == (1, 2)
    u1 = await live_redis.stored("u1")
    assert u1 is not None and u1.recent_items == (item(11), item(2), item(6), item(1))  # by arrival, not time
    assert dict(u1.event_counts) == {"click": 2, "like": 1, "dwell": 1}


# 4. Events move the very next Recommend


async def test_clicks_personalize_the_next_recommend_and_shift_it_with_new_interests(live_redis: Live) -> None:
    user = "fresh-user"
    assert (await live_redis.recommend(user)).strategy == pb.STRATEGY_COLD_START

    reply = await live_redis.record(clicks(user, items_in(2, 6), "c2"))
    assert reply.accepted == 6
    first = await live_redis.recommend(user)  # right after the call returns, no waiting
    assert first.strategy == pb.STRATEGY_PERSONALIZED
    assert len(first.items) == 10
    assert count_in(first, 2) >= 8
    stored = await live_redis.stored(user)
    bundle = live_redis.running.app.slot.active
    assert stored is not None and bundle is not None
    assert stored.user_vector is not None and stored.embedding_space == bundle.manifest.embedding_space

    reply = await live_redis.record(clicks(user, items_in(4, 20), "c4"))
    assert reply.accepted == 20
    second = await live_redis.recommend(user)
    assert second.strategy == pb.STRATEGY_PERSONALIZED
    assert count_in(second, 4) > count_in(first, 4)
    assert count_in(second, 4) >= 8
    assert count_in(second, 2) < count_in(first, 2)


async def test_events_on_items_the_model_does_not_know_leave_the_user_cold(live: Live) -> None:
    reply = await live.record(clicks("u1", ["unknown-1", "unknown-2"], "x"))
    assert reply.accepted == 2
    stored = await live.stored("u1")
    assert stored is not None and stored.recent_items == ("unknown-2", "unknown-1") and not stored.categories
    assert stored.user_vector is None
    assert (await live.recommend("u1")).strategy == pb.STRATEGY_COLD_START


# 5. Category affinities equal the reference replay


async def test_stored_affinities_equal_the_replay_of_the_same_events(live: Live) -> None:
    base = datetime.now(UTC).replace(microsecond=123_456) - timedelta(days=30)
    # (hours after base, row, type, value): times out of order, categories interleaved, all weights.
    plan = [
        (100.0, 0, EventType.CLICK, 0.0),
        (5.5, 5, EventType.PURCHASE, 0.0),
        (300.25, 1, EventType.VIEW, 0.0),
        (2.0, 10, EventType.DWELL, 12_345.678),
        (400.0, 2, EventType.RATING, 7.5),
        (0.0, 6, EventType.LIKE, 0.0),
        (350.0, 15, EventType.SHARE, 0.0),
        (200.0, 3, EventType.ADD_TO_CART, 0.0),
        (600.0, 20, EventType.CLICK, 0.0),
        (1.0, 4, EventType.DWELL, 500_000.0),
        (599.999, 11, EventType.RATING, 2.5),
        (42.0, 25, EventType.VIEW, 0.0),
    ]
    sent: list[ppb.Event] = []
    expected: list[StoredEvent] = []
    for n, (hours, row, kind, value) in enumerate(plan):
        at = base + timedelta(hours=hours)
        sent.append(event(f"ev-{n}", "u1", item(row), ppb.EventType.ValueType(int(kind)), value, at=at))
        weight = engagement_weight(kind, value)
        expected.append(StoredEvent(f"ev-{n}", item(row), kind, weight, at.timestamp(), (f"cat-{row % 5}",)))
    for batch in (sent[:5], sent[5:9], sent[9:]):  # three calls
        reply = await live.record(batch)
        assert reply.accepted == len(batch)

    want = replay(expected, live.running.app.store.settings)
    got = await live.stored("u1")
    assert got is not None
    assert set(got.categories) == set(want.categories) == {f"cat-{c}" for c in range(5)}
    for name, stat in want.categories.items():
        assert got.categories[name].at == stat.at, name
        assert abs(got.categories[name].weight - stat.weight) <= 1e-12 * max(1.0, stat.weight), name
    assert dict(got.event_counts) == dict(want.event_counts)
    assert dict(got.event_counts) == {
        "click": 2,
        "purchase": 1,
        "view": 2,
        "dwell": 2,
        "rating": 2,
        "like": 1,
        "share": 1,
        "add_to_cart": 1,
    }
    assert got.last_seen == want.last_seen == (base + timedelta(hours=600)).timestamp()
    assert got.recent_items == want.recent_items and got.recent_weights == want.recent_weights


# 6. Consent


async def test_opting_out_deletes_drops_and_stops_reading_the_profile(live_redis: Live) -> None:
    url = live_redis.redis_url
    assert url is not None
    user = "carol"
    await live_redis.record(clicks(user, items_in(2, 5), "a"))
    assert (await live_redis.recommend(user)).strategy == pb.STRATEGY_PERSONALIZED  # the read script is loaded
    assert user_keys_in_redis(url, user) - {optout_key(user)}

    opted = await live_redis.profiles.SetConsent(ppb.SetConsentRequest(user_id=user, personalization=False))
    assert opted.profile_deleted
    assert user_keys_in_redis(url, user) == {optout_key(user)}
    again = await live_redis.profiles.SetConsent(ppb.SetConsentRequest(user_id=user, personalization=False))
    assert not again.profile_deleted  # nothing left to delete

    dropped = await live_redis.record([*clicks(user, items_in(3, 3), "b"), event("b-x", "other", item(1))])
    assert (dropped.dropped_no_consent, dropped.accepted, dropped.duplicates) == (3, 1, 0)
    assert user_keys_in_redis(url, user) == {optout_key(user)}  # nothing stored, not even the event ids
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live_redis.profiles.SetInterests(ppb.SetInterestsRequest(user_id=user, categories=["cat-1"]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert user_keys_in_redis(url, user) == {optout_key(user)}

    cold = await live_redis.recommend("nobody-at-all")
    stats = CommandStats(url)
    stats.reset()
    answer = await live_redis.recommend(user)
    calls = stats.calls()
    assert answer.strategy == pb.STRATEGY_NOT_PERSONALIZED
    assert [i.item_id for i in answer.items] == [i.item_id for i in cold.items]  # the popular list
    assert calls.get("evalsha") == 1 and calls.get("exists") == 1
    assert "hgetall" not in calls and "lrange" not in calls
    assert set(calls) <= {"evalsha", "exists", "config|resetstat"}, calls

    back = await live_redis.profiles.SetConsent(ppb.SetConsentRequest(user_id=user, personalization=True))
    assert not back.profile_deleted
    assert user_keys_in_redis(url, user) == set()
    assert (await live_redis.recommend(user)).strategy == pb.STRATEGY_COLD_START  # starts from an empty profile
    stored = await live_redis.record(clicks(user, items_in(4, 5), "c"))
    assert stored.accepted == 5
    profile = await live_redis.stored(user)
    assert profile is not None and profile.recent_items == tuple(reversed(items_in(4, 5)))
    assert set(profile.categories) == {"cat-4"}
    personal = await live_redis.recommend(user)
    assert personal.strategy == pb.STRATEGY_PERSONALIZED and count_in(personal, 4) >= 8


async def test_disable_personalization_reads_nothing(live_redis: Live) -> None:
    url = live_redis.redis_url
    assert url is not None
    await live_redis.record(clicks("dora", items_in(1, 5), "a"))
    assert (await live_redis.recommend("dora")).strategy == pb.STRATEGY_PERSONALIZED
    cold = await live_redis.recommend("nobody-at-all")
    stats = CommandStats(url)
    stats.reset()
    answer = await live_redis.recommend("dora", disable_personalization=True)
    calls = stats.calls()
    assert answer.strategy == pb.STRATEGY_NOT_PERSONALIZED
    assert [i.item_id for i in answer.items] == [i.item_id for i in cold.items]
    assert set(calls) <= {"config|resetstat"}, calls


async def test_opting_out_works_the_same_on_both_stores(live: Live) -> None:
    await live.record(clicks("erin", items_in(0, 3), "a"))
    out = await live.profiles.SetConsent(ppb.SetConsentRequest(user_id="erin", personalization=False))
    assert out.profile_deleted
    assert (await live.stored("erin")) == Profile(opted_out=True)
    fresh = await live.profiles.SetConsent(ppb.SetConsentRequest(user_id="newbie", personalization=False))
    assert not fresh.profile_deleted  # nothing existed
    reply = await live.record(clicks("erin", items_in(0, 2, skip=3), "b") + clicks("newbie", items_in(1, 1), "c"))
    assert reply.dropped_no_consent == 3 and reply.accepted == 0
    for user in ("erin", "newbie"):
        assert (await live.recommend(user)).strategy == pb.STRATEGY_NOT_PERSONALIZED
    await live.profiles.SetConsent(ppb.SetConsentRequest(user_id="erin", personalization=True))
    assert await live.stored("erin") is None
    assert (await live.record(clicks("erin", items_in(0, 5), "d"))).accepted == 5
    assert (await live.recommend("erin")).strategy == pb.STRATEGY_PERSONALIZED


# 7. Erasure


async def test_forget_user_erases_every_key_and_says_what_existed(live_redis: Live) -> None:
    url = live_redis.redis_url
    assert url is not None
    user = "dave"
    interests = await live_redis.profiles.SetInterests(ppb.SetInterestsRequest(user_id=user, categories=["cat-0"]))
    assert list(interests.categories) == ["cat-0"]
    await live_redis.record(clicks(user, items_in(1, 3), "a"))
    stored = await live_redis.stored(user)
    assert stored is not None and stored.user_vector is not None and stored.interests == ("cat-0",)
    await live_redis.profiles.SetConsent(ppb.SetConsentRequest(user_id="erin", personalization=False))
    await live_redis.record(clicks("frank", items_in(2, 2), "f"))

    forgot = await live_redis.profiles.ForgetUser(ppb.ForgetUserRequest(user_id=user))
    assert list(forgot.deleted) == ["profile", "recent_items", "event_ids"]
    assert user_keys_in_redis(url, user) == set()
    assert (await live_redis.recommend(user)).strategy == pb.STRATEGY_COLD_START

    forgot = await live_redis.profiles.ForgetUser(ppb.ForgetUserRequest(user_id="erin"))
    assert list(forgot.deleted) == ["consent"]
    assert user_keys_in_redis(url, "erin") == set()
    assert (await live_redis.recommend("erin")).strategy == pb.STRATEGY_COLD_START  # no opt-out any more

    assert user_keys_in_redis(url, "frank")  # other users are untouched
    forgot = await live_redis.profiles.ForgetUser(ppb.ForgetUserRequest(user_id="frank"))
    assert list(forgot.deleted) == ["profile", "recent_items", "event_ids"]
    assert list(redis.Redis.from_url(url).scan_iter()) == []

    nothing = await live_redis.profiles.ForgetUser(ppb.ForgetUserRequest(user_id="never-seen"))
    assert list(nothing.deleted) == []

    # The dedupe window was erased too: the same events are new again.
    again = await live_redis.record(clicks(user, items_in(1, 3), "a"))
    assert again.accepted == 3 and again.duplicates == 0


async def test_forget_user_on_both_stores(live: Live) -> None:
    await live.record(clicks("gina", items_in(3, 2), "a"))
    await live.profiles.SetConsent(ppb.SetConsentRequest(user_id="hank", personalization=False))
    gina = await live.profiles.ForgetUser(ppb.ForgetUserRequest(user_id="gina"))
    hank = await live.profiles.ForgetUser(ppb.ForgetUserRequest(user_id="hank"))
    assert list(gina.deleted) == ["profile", "recent_items", "event_ids"]
    assert list(hank.deleted) == ["consent"]
    assert await live.stored("gina") is None and await live.stored("hank") is None
    assert list((await live.profiles.ForgetUser(ppb.ForgetUserRequest(user_id="gina"))).deleted) == []
    for user in ("gina", "hank"):
        assert (await live.recommend(user)).strategy == pb.STRATEGY_COLD_START


# 8. Onboarding with declared interests


async def test_declared_interests_steer_a_new_user_until_events_take_over(live: Live) -> None:
    user = "newcomer"
    reply = await live.profiles.SetInterests(ppb.SetInterestsRequest(user_id=user, categories=["cat-3"]))
    assert list(reply.categories) == ["cat-3"]
    onboarded = await live.recommend(user)
    assert onboarded.strategy == pb.STRATEGY_INTERESTS
    assert count_in(onboarded, 3) >= 8

    await live.record(clicks(user, items_in(1, 2), "a"))  # fewer than interest_events: a blend
    assert (await live.recommend(user)).strategy == pb.STRATEGY_PERSONALIZED
    await live.record(clicks(user, items_in(1, 3, skip=2), "b"))  # now 5 known items: history only
    personal = await live.recommend(user)
    assert personal.strategy == pb.STRATEGY_PERSONALIZED
    assert count_in(personal, 1) >= 8
    stored = await live.stored(user)
    assert stored is not None and stored.interests == ("cat-3",)  # kept, but no longer steering


async def test_two_interests_and_clearing_them(live: Live) -> None:
    user = "chooser"
    await live.profiles.SetInterests(ppb.SetInterestsRequest(user_id=user, categories=["cat-0", "cat-4"]))
    both = await live.recommend(user, k=20)
    assert both.strategy == pb.STRATEGY_INTERESTS
    assert count_in(both, 0) + count_in(both, 4) >= 16
    cleared = await live.profiles.SetInterests(ppb.SetInterestsRequest(user_id=user, categories=[]))
    assert list(cleared.categories) == []
    assert (await live.recommend(user)).strategy == pb.STRATEGY_COLD_START


async def test_bad_interests_are_refused(live: Live) -> None:
    call = live.profiles.SetInterests
    details = await assert_invalid(call, ppb.SetInterestsRequest(user_id="u1", categories=["cat-9"]), "categories[0]")
    assert "cat-9" in details
    await assert_invalid(call, ppb.SetInterestsRequest(user_id="u1", categories=["cat-1", "nope"]), "categories[1]")
    await assert_invalid(call, ppb.SetInterestsRequest(user_id="u1", categories=["cat-1", ""]), "categories[1]")
    await assert_invalid(call, ppb.SetInterestsRequest(user_id="u1", categories=["cat-2", "cat-2"]), "categories")
    await assert_invalid(call, ppb.SetInterestsRequest(user_id="u1", categories=["cat-1"] * 21), "categories")
    assert await live.stored("u1") is None

    await live.profiles.SetConsent(ppb.SetConsentRequest(user_id="gone", personalization=False))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(ppb.SetInterestsRequest(user_id="gone", categories=["cat-1"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "opted out" in (err.value.details() or "")


async def test_interests_need_a_model_with_categories(plain_repo: Path) -> None:
    async with live_server(plain_repo) as server:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await server.profiles.SetInterests(ppb.SetInterestsRequest(user_id="u1", categories=["cat-1"]), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "categories" in (err.value.details() or "")
        assert await server.stored("u1") is None
        # Events still work on such a model: recent items without category affinities.
        reply = await server.record(clicks("u1", [item(4), item(9)], "a"))
        assert reply.accepted == 2
        stored = await server.stored("u1")
        assert stored is not None and not stored.categories and stored.user_vector is not None
        assert (await server.recommend("u1")).strategy == pb.STRATEGY_PERSONALIZED


async def test_interests_before_a_model_is_loaded_are_unavailable(cat_repo: Path) -> None:
    async with running_server(cat_repo, "toy", load=False) as running:
        stub = ppb_grpc.ProfilesStub(running.channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetInterests(ppb.SetInterestsRequest(user_id="u1", categories=["cat-1"]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# 9. User ids


@pytest.mark.parametrize("user_id", ["", "u" * 257, "é" * 129], ids=["empty", "257-bytes", "258-utf8-bytes"])
async def test_bad_user_ids_are_invalid_argument(live: Live, user_id: str) -> None:
    stub = live.profiles
    await assert_invalid(stub.SetConsent, ppb.SetConsentRequest(user_id=user_id), "user_id")
    await assert_invalid(stub.ForgetUser, ppb.ForgetUserRequest(user_id=user_id), "user_id")
    await assert_invalid(stub.SetInterests, ppb.SetInterestsRequest(user_id=user_id, categories=["cat-1"]), "user_id")
    reply = await live.record([event("e1", user_id, item(1))])
    assert [(r.index, r.field) for r in reply.rejected] == [(0, "user_id")]


async def test_the_longest_user_id_is_accepted(live: Live) -> None:
    user = "é" * 128  # 256 bytes
    assert (await live.record(clicks(user, items_in(2, 5), "a"))).accepted == 5
    assert (await live.recommend(user)).strategy == pb.STRATEGY_PERSONALIZED
    forgot = await live.profiles.ForgetUser(ppb.ForgetUserRequest(user_id=user))
    assert list(forgot.deleted) == ["profile", "recent_items", "event_ids"]


@pytest.fixture(scope="module")
def segmented_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like `cat_repo`, plus 5 behavioural segments (one per category centre) whose cold-start lists hold the
    items of the *next* category, so an answer drawn from a segment list is told apart from retrieval."""
    from dataclasses import replace as with_fields

    from hyperrec.core.bundle import ColdStart, publish_bundle, segment_key
    from hyperrec.training.segments import with_segment_block
    from tests.helpers import make_contents, make_ranker_onnx

    contents = make_contents(n_items=N_ITEMS, dim=8, seed=7, categories=N_CATEGORIES)
    spec = with_segment_block(contents.feature_spec, N_CATEGORIES)
    emb = contents.item_embeddings
    centroids = np.stack([emb[c::N_CATEGORIES].mean(axis=0) for c in range(N_CATEGORIES)]).astype(np.float32)
    lists = {
        segment_key(c): tuple((item(r), 0.01) for r in range((c + 1) % N_CATEGORIES, N_ITEMS, N_CATEGORIES))[:30]
        for c in range(N_CATEGORIES)
    }
    cold = ColdStart(contents.cold_start.global_items, {**contents.cold_start.segments, **lists})
    repo = tmp_path_factory.mktemp("segmented-repo")
    publish_bundle(
        repo,
        with_fields(
            contents,
            feature_spec=spec,
            segments=centroids,
            cold_start=cold,
            ranker_onnx=make_ranker_onnx(8, spec.context_dim),
        ),
    )
    return repo


async def test_declared_interests_start_from_their_segments_popular_items(segmented_repo: Path) -> None:
    async with live_server(segmented_repo) as live:
        await live.profiles.SetInterests(ppb.SetInterestsRequest(user_id="onboarded", categories=["cat-2"]), timeout=5)
        reply = await live.recommend("onboarded", k=10)
        assert reply.strategy == pb.STRATEGY_INTERESTS
        assert count_in(reply, 3) == 10  # segment 2's list: the popular items of its users (here cat-3)
        # When exclusions leave the segment's list unable to fill k, retrieval with the interests takes over.
        req = request("onboarded", k=10, exclude=items_in(3, 25))
        fallback: pb.RecommendResponse = await live.running.stub.Recommend(req, timeout=5)
        assert fallback.strategy == pb.STRATEGY_INTERESTS and count_in(fallback, 2) >= 8


async def test_items_the_user_engaged_with_are_left_out_unless_the_call_asks_for_them(live: Live) -> None:
    """By default a personalized answer leaves out the profile's recent items (what offline evaluation leaves
    out too); include_seen_items lets them back, and the request's own exclusions still hold either way."""
    seen = items_in(2, 5)
    reply = await live.record([event(f"seen-{n}", "watcher", item_id) for n, item_id in enumerate(seen)])
    assert reply.accepted == len(seen)
    default = await live.recommend("watcher", k=20)
    assert default.strategy == pb.STRATEGY_PERSONALIZED and len(default.items) == 20
    assert not set(seen) & {i.item_id for i in default.items}
    asked = request("watcher", k=20)
    asked.include_seen_items = True
    asked.exclude_item_ids.append(seen[0])
    allowed: pb.RecommendResponse = await live.running.stub.Recommend(asked, timeout=5)
    returned = {i.item_id for i in allowed.items}
    assert set(seen[1:]) & returned  # the user's own items sit nearest their folded-in vector
    assert seen[0] not in returned and len(allowed.items) == 20
