"""Privacy on a real Redis: user ids never stored, logged or exported in clear; profile data always expires.

Canary user ids go through every Profiles and Recommender call; afterwards every Redis key and value, every
captured log record and the Prometheus exposition are searched for them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import prometheus_client
import pytest
import redis

from hyperrec.app.config import load_config
from hyperrec.core.errors import ConfigError
from hyperrec.profiles.keys import Pseudonymizer, user_keys
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from tests.helpers import publish_toy
from tests.serving import TEST_SECRET, request, running_server

CANARIES = ("canary-7f3a@example.com", "canary-user-91b2", "canary-ünïcode-5e0c")
# Every canary, and every event id made from one, contains this; no key, item id, category or number does.
MARK = "canary"


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    publish_toy(repo, n_items=200, dim=8, seed=11, categories=5)
    return repo


def keys_of(user: str) -> dict[str, str]:
    return user_keys(Pseudonymizer(TEST_SECRET.encode()).user_key(user))


def event(user: str, event_id: str, item: str, kind: ppb.EventType.ValueType = ppb.EVENT_TYPE_CLICK) -> ppb.Event:
    return ppb.Event(event_id=event_id, user_id=user, item_id=item, type=kind)


def as_bytes(value: object) -> bytes:
    assert isinstance(value, bytes), value
    return value


def everything_in(raw: redis.Redis) -> list[bytes]:
    """Every key and every piece of every value in the database."""
    blobs: list[bytes] = []
    for key in raw.scan_iter(count=1000):
        blobs.append(as_bytes(key))
        kind = raw.type(key)
        if kind == b"string":
            values: list[object] = [raw.get(key)]
        elif kind == b"hash":
            values = [part for pair in raw.hgetall(key).items() for part in pair]
        elif kind == b"list":
            values = list(raw.lrange(key, 0, -1))
        elif kind == b"zset":
            values = list(raw.zrange(key, 0, -1))
        elif kind == b"set":
            values = list(raw.smembers(key))
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} of {key!r}")
        blobs += [as_bytes(v) for v in values]
    return blobs


def leaks(text: str | bytes) -> list[str]:
    """The canaries (or their common mark) found in `text`."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "backslashreplace")
    needles = [MARK, *CANARIES]
    return [n for n in needles if n.encode("utf-8") in data or n.encode("utf-8").lower() in data.lower()]


async def test_canary_user_ids_appear_in_no_key_value_log_or_metric(
    toy_repo: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kept, opted_out, forgotten = CANARIES
    async with running_server(toy_repo, "toy", redis_url=redis_url, profile_secret=TEST_SECRET) as running:
        profiles = ppb_grpc.ProfilesStub(running.channel)
        bundle = running.app.slot.active
        assert bundle is not None
        items = bundle.item_ids
        batch = [event(user, f"{user}/evt-{i}", items[i]) for user in CANARIES for i in range(3)]
        batch.append(event(kept, f"{kept}/evt-bad", items[0], kind=ppb.EVENT_TYPE_UNSPECIFIED))  # rejected
        reply = await profiles.RecordEvents(ppb.RecordEventsRequest(events=batch), timeout=5)
        assert reply.accepted == 9 and len(reply.rejected) == 1
        retried = await profiles.RecordEvents(ppb.RecordEventsRequest(events=batch[:3]), timeout=5)
        assert retried.duplicates == 3  # the dedupe window holds the (hashed) event ids
        for user in CANARIES:
            await profiles.SetInterests(ppb.SetInterestsRequest(user_id=user, categories=["cat-1", "cat-3"]), timeout=5)
            rec = await running.stub.Recommend(request(user, k=5), timeout=5)
            assert rec.strategy == pb.STRATEGY_PERSONALIZED

        consent = await profiles.SetConsent(ppb.SetConsentRequest(user_id=opted_out, personalization=False), timeout=5)
        assert consent.profile_deleted
        dropped = await profiles.RecordEvents(
            ppb.RecordEventsRequest(events=[event(opted_out, f"{opted_out}/evt-late", items[5])]), timeout=5
        )
        assert dropped.dropped_no_consent == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await profiles.SetInterests(ppb.SetInterestsRequest(user_id=opted_out, categories=["cat-2"]), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        rec = await running.stub.Recommend(request(opted_out, k=5), timeout=5)
        assert rec.strategy == pb.STRATEGY_NOT_PERSONALIZED

        forgot = await profiles.ForgetUser(ppb.ForgetUserRequest(user_id=forgotten), timeout=5)
        assert set(forgot.deleted) == {"profile", "recent_items", "event_ids"}
        rec = await running.stub.Recommend(request(forgotten, k=5), timeout=5)
        assert rec.strategy == pb.STRATEGY_COLD_START
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.Recommend(request(kept, k=0), timeout=5)  # an invalid request on the error path
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    raw = redis.Redis.from_url(redis_url)
    try:
        stored = set(raw.scan_iter(count=1000))
        blobs = everything_in(raw)
    finally:
        raw.close()
    # The scan saw what the calls left behind (so finding nothing means something)...
    assert {keys_of(kept)[k].encode() for k in ("profile", "recent_items", "event_ids")} <= stored
    assert keys_of(opted_out)["consent"].encode() in stored
    assert not {key.encode() for key in keys_of(forgotten).values()} & stored
    # ...and none of it names a user.
    found = [(blob[:80], leaks(blob)) for blob in blobs if leaks(blob)]
    assert not found, f"user ids stored in Redis: {found[:5]}"

    assert caplog.records, "nothing was logged: the log check would prove nothing"
    for record in caplog.records:
        logged = " ".join(
            [record.getMessage(), str(record.msg), repr(record.args), record.exc_text or "", record.stack_info or ""]
        )
        assert not leaks(logged), f"user id logged by {record.name}: {record.getMessage()!r}"
    assert not leaks(caplog.text)

    exposition = prometheus_client.generate_latest()
    assert b"hyperrec_events_total" in exposition
    assert not leaks(exposition), "user id in the Prometheus metrics"


async def test_every_profile_key_expires_within_the_ttl_except_the_opt_out_marker(
    toy_repo: Path, redis_url: str
) -> None:
    ttl = 1234
    user, interested_only = "ttl-user", "ttl-interests-only"
    async with running_server(
        toy_repo, "toy", redis_url=redis_url, profile_secret=TEST_SECRET, profile_ttl_s=ttl
    ) as running:
        profiles = ppb_grpc.ProfilesStub(running.channel)
        bundle = running.app.slot.active
        assert bundle is not None
        events = [event(user, f"ttl-{i}", bundle.item_ids[i]) for i in range(4)]
        assert (await profiles.RecordEvents(ppb.RecordEventsRequest(events=events), timeout=5)).accepted == 4
        for who in (user, interested_only):
            await profiles.SetInterests(ppb.SetInterestsRequest(user_id=who, categories=["cat-0"]), timeout=5)

        raw = redis.Redis.from_url(redis_url)
        try:
            keys = keys_of(user)
            for kind in ("profile", "recent_items", "event_ids"):
                assert 0 < raw.ttl(keys[kind]) <= ttl, kind
            assert 0 < raw.ttl(keys_of(interested_only)["profile"]) <= ttl
            every = list(raw.scan_iter(count=1000))
            assert len(every) == 4
            assert all(0 < raw.ttl(key) <= ttl for key in every)

            consent = ppb.SetConsentRequest(user_id=user, personalization=False)
            assert (await profiles.SetConsent(consent, timeout=5)).profile_deleted
            assert [raw.exists(keys[kind]) for kind in ("profile", "recent_items", "event_ids")] == [0, 0, 0]
            assert raw.ttl(keys["consent"]) == -1  # consent must not lapse by itself
            for key in raw.scan_iter(count=1000):
                if key == keys["consent"].encode():
                    continue
                assert 0 < raw.ttl(key) <= ttl, key

            await profiles.SetConsent(ppb.SetConsentRequest(user_id=user, personalization=True), timeout=5)
            assert not any(raw.exists(key) for key in keys.values())
        finally:
            raw.close()


@pytest.mark.parametrize("secret", [None, ""])
def test_redis_without_a_profile_secret_refuses_to_start(secret: str | None) -> None:
    """test_config covers HYPERREC_REDIS_URL from the environment; this is the keyword path, and an empty secret."""
    with pytest.raises(ConfigError, match="profile_secret"):
        load_config(env={}, redis_url="redis://127.0.0.1:6379/0", profile_secret=secret)
