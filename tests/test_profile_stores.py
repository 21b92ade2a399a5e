"""The same contract for the in-process and the Redis profile stores, over a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hyperrec.core.behaviour import EVENT_WEIGHTS, replay
from hyperrec.core.domain import EventType
from hyperrec.core.errors import ProfileStoreError
from hyperrec.core.profile import CategoryAffinity, Profile, ProfileSettings, StoredEvent
from hyperrec.core.profile_store import ProfileStore
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.memory import InMemoryProfileStore
from hyperrec.profiles.redis_store import RedisProfileStore, RedisStoreOptions
from tests.conftest import free_port

SECRET = b"contract-test-secret-0123456789"
SETTINGS = ProfileSettings(recent_limit=5, ttl_s=3600)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ProfileStore]:
    if request.param == "memory":
        yield InMemoryProfileStore(Pseudonymizer(SECRET), SETTINGS)
        return
    url = request.getfixturevalue("redis_url")
    redis_store = RedisProfileStore(RedisStoreOptions(url=url, settings=SETTINGS), Pseudonymizer(SECRET))
    yield redis_store
    await redis_store.close()


def profile(seed: int, recent: tuple[str, ...] = ("a", "b")) -> Profile:
    vec = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    return Profile(user_vector=vec, embedding_space="space", recent_items=recent, updated_at=1_700_000_000.5)


async def test_unknown_user_has_no_profile(store: ProfileStore) -> None:
    assert await store.get("nobody") is None


async def test_put_then_get_round_trips(store: ProfileStore) -> None:
    stored = profile(1)
    await store.put("user-1", stored)
    got = await store.get("user-1")
    assert got is not None
    np.testing.assert_array_equal(got.user_vector, stored.user_vector)
    assert got.embedding_space == "space" and got.recent_items == ("a", "b") and got.updated_at == stored.updated_at


async def test_put_replaces_and_caps_recent_items(store: ProfileStore) -> None:
    await store.put("user-1", profile(1, recent=("old",)))
    await store.put("user-1", profile(2, recent=tuple(f"i{i}" for i in range(8))))
    got = await store.get("user-1")
    assert got is not None and got.recent_items == ("i0", "i1", "i2", "i3", "i4")


async def test_users_are_kept_apart(store: ProfileStore) -> None:
    await store.put_many({"a": profile(1, ("x",)), "b": profile(2, ("y",))})
    got_a, got_b = await store.get("a"), await store.get("b")
    assert got_a is not None and got_b is not None
    assert got_a.recent_items == ("x",) and got_b.recent_items == ("y",)


async def test_forget_removes_the_profile_and_says_what_existed(store: ProfileStore) -> None:
    await store.put("user-1", profile(1))
    assert await store.forget("user-1") == ("profile", "recent_items")
    assert await store.get("user-1") is None
    assert await store.forget("user-1") == ()


async def test_profile_without_vector_keeps_recent_items(store: ProfileStore) -> None:
    await store.put("user-1", Profile(recent_items=("r1", "r2"), updated_at=5.0))
    got = await store.get("user-1")
    assert got is not None and got.user_vector is None and got.recent_items == ("r1", "r2")


async def test_redis_keys_are_pseudonymous_and_expire(redis_url: str) -> None:
    store = RedisProfileStore(
        RedisStoreOptions(url=redis_url, settings=ProfileSettings(ttl_s=1234)), Pseudonymizer(SECRET)
    )
    await store.put("alice@example.com", profile(1, recent=("item-1",)))
    await store.close()
    raw = redis.Redis.from_url(redis_url)
    keys = raw.keys("*")
    assert len(keys) == 2
    for key in keys:
        assert b"alice" not in key
        assert 0 < raw.ttl(key) <= 1234
        values = list(raw.hgetall(key).values()) if raw.type(key) == b"hash" else raw.lrange(key, 0, -1)
        assert all(b"alice" not in bytes(v) for v in values)  # type: ignore[arg-type]


async def test_redis_read_is_one_script_call_and_nothing_else(redis_url: str) -> None:
    """A read is one EVALSHA (one round trip) running EXISTS (the opt-out marker), HGETALL and LRANGE."""
    raw = redis.Redis.from_url(redis_url)
    store = RedisProfileStore(RedisStoreOptions(url=redis_url), Pseudonymizer(SECRET))
    await store.put("u", profile(3))
    raw.config_resetstat()
    await store.get("u")
    stats = raw.info("commandstats")
    await store.close()
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_exists"]["calls"] == 1
    assert stats["cmdstat_hgetall"]["calls"] == 1 and stats["cmdstat_lrange"]["calls"] == 1
    assert {k for k in stats if k.startswith("cmdstat_")} <= {
        "cmdstat_evalsha",
        "cmdstat_exists",
        "cmdstat_hgetall",
        "cmdstat_lrange",
        "cmdstat_config|resetstat",
    }


async def test_unreachable_redis_raises_store_error_quickly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    store = RedisProfileStore(RedisStoreOptions(url=url, connect_timeout_s=0.2), Pseudonymizer(SECRET))
    with pytest.raises(ProfileStoreError):
        await store.get("u")
    with pytest.raises(ProfileStoreError):
        await store.ping()
    await store.close()


async def test_a_burst_beyond_the_pool_waits_for_connections_instead_of_failing(redis_url: str) -> None:
    import asyncio

    options = RedisStoreOptions(url=redis_url, max_connections=2, read_timeout_s=2.0)
    store = RedisProfileStore(options, Pseudonymizer(SECRET))
    await store.put("u", profile(5))
    results = await asyncio.gather(*(store.get("u") for _ in range(40)))
    await store.close()
    assert all(r is not None and r.recent_items == ("a", "b") for r in results)


# The live-profile contract: events, the update counter, interests, consent and erasure.

BASE_TIME = 1_700_000_000.0


def event(
    event_id: str,
    item_id: str,
    kind: EventType = EventType.CLICK,
    at: float = BASE_TIME,
    categories: tuple[str, ...] = (),
    weight: float | None = None,
) -> StoredEvent:
    return StoredEvent(event_id, item_id, kind, EVENT_WEIGHTS[kind] if weight is None else weight, at, categories)


async def test_record_drops_event_ids_already_seen(store: ProfileStore) -> None:
    first = await store.record("u", [event("e1", "a"), event("e2", "b")])
    assert not first.opted_out and first.fresh == (True, True)
    retried = await store.record("u", [event("e2", "b"), event("e3", "c")])
    assert retried.fresh == (False, True)
    repeated = await store.record("u", [event("e4", "d"), event("e4", "e")])  # one id twice in a batch
    assert repeated.fresh == (True, False)
    assert (await store.record("other", [event("e1", "a")])).fresh == (True,)  # ids are per user
    got = await store.get("u")
    assert got is not None
    assert got.recent_items == ("d", "c", "b", "a")
    assert dict(got.event_counts) == {"click": 4}
    assert repeated.profile is not None and repeated.profile.recent_items == got.recent_items
    other = await store.get("other")
    assert other is not None and other.recent_items == ("a",)


async def test_recent_items_are_capped_newest_first_with_their_weights(store: ProfileStore) -> None:
    kinds = [EventType.VIEW, EventType.CLICK, EventType.LIKE, EventType.SHARE, EventType.ADD_TO_CART]
    await store.record("u", [event(f"e{n}", f"i{n}", kind) for n, kind in enumerate(kinds)])
    outcome = await store.record("u", [event("e5", "i5", EventType.PURCHASE), event("e6", "i6", weight=0.25)])
    got = await store.get("u")
    assert got is not None and outcome.profile is not None
    assert got.recent_items == outcome.profile.recent_items == ("i6", "i5", "i4", "i3", "i2")  # SETTINGS: 5 kept
    assert got.recent_weights == outcome.profile.recent_weights == (0.25, 10.0, 6.0, 5.0, 4.0)
    assert sum(got.event_counts.values()) == 7  # counters keep counting what the list forgets


async def test_set_vector_writes_only_while_the_profile_is_at_that_update(store: ProfileStore) -> None:
    vector = np.arange(8, dtype=np.float32)
    first = await store.record("u", [event("e1", "a")])
    assert first.seq >= 1
    assert await store.set_vector("u", vector, "space-1", first.seq)
    second = await store.record("u", [event("e2", "b")])
    assert second.seq != first.seq
    assert not await store.set_vector("u", vector * 2, "space-2", first.seq)  # computed from a stale profile
    got = await store.get("u")
    assert got is not None and got.embedding_space == "space-1"
    np.testing.assert_array_equal(got.user_vector, vector)
    duplicate = await store.record("u", [event("e2", "b")])
    assert duplicate.seq == second.seq  # nothing stored, nothing changed
    assert await store.set_vector("u", vector * 3, "space-3", second.seq)
    got = await store.get("u")
    assert got is not None and got.embedding_space == "space-3" and got.recent_items == ("b", "a")
    np.testing.assert_array_equal(got.user_vector, vector * 3)
    assert not await store.set_vector("nobody", vector, "space-1", 1)
    assert await store.get("nobody") is None


async def test_a_refold_from_erased_data_never_lands_on_the_new_profile(store: ProfileStore) -> None:
    """A refold in flight across ForgetUser (or an opt-out and back) carries the old sequence number: refused."""
    old = await store.record("u", [event("e1", "a")])
    assert await store.forget("u")
    new = await store.record("u", [event("e2", "b")])
    assert new.seq != old.seq
    assert not await store.set_vector("u", np.ones(8, np.float32), "space-old", old.seq)
    got = await store.get("u")
    assert got is not None and got.user_vector is None and got.recent_items == ("b",)


async def test_set_vector_never_creates_a_profile(store: ProfileStore) -> None:
    for seq in (0, 1):
        assert not await store.set_vector("nobody", np.ones(8, np.float32), "space", seq)
    assert await store.get("nobody") is None and await store.forget("nobody") == ()


async def test_clearing_interests_of_an_unknown_user_stores_nothing(store: ProfileStore) -> None:
    assert await store.set_interests("new", [])
    assert await store.get("new") is None
    assert await store.set_interests("once", ["a"]) and await store.set_interests("once", [])
    assert await store.get("once") is None and await store.forget("once") == ()


async def test_set_interests_replaces_and_lives_beside_events(store: ProfileStore) -> None:
    assert await store.set_interests("u", ["cat-1", "cat-2"])
    got = await store.get("u")
    assert got is not None and got.interests == ("cat-1", "cat-2") and got.recent_items == ()
    outcome = await store.record("u", [event("e1", "a", categories=("cat-1",))])
    assert outcome.profile is not None and outcome.profile.interests == ("cat-1", "cat-2")
    assert await store.set_interests("u", ["cat-3"])
    got = await store.get("u")
    assert got is not None and got.interests == ("cat-3",) and got.recent_items == ("a",)
    assert set(got.categories) == {"cat-1"}
    assert await store.set_interests("u", [])
    got = await store.get("u")
    assert got is not None and got.interests == () and got.recent_items == ("a",)


async def test_an_opted_out_user_reads_as_opted_out_and_takes_no_writes(store: ProfileStore) -> None:
    await store.record("u", [event("e1", "a", categories=("cat-1",))])
    await store.set_interests("u", ["cat-1"])
    assert await store.set_consent("u", False)  # profile data existed and is gone
    got = await store.get("u")
    assert got is not None and got.opted_out
    assert got.recent_items == () and not got.categories and got.interests == () and got.user_vector is None
    outcome = await store.record("u", [event("e2", "b"), event("e3", "c")])
    assert outcome.opted_out and outcome.fresh == (False, False) and outcome.profile is None
    assert not await store.set_interests("u", ["cat-2"])
    assert not await store.put("u", profile(1))
    assert not await store.set_vector("u", np.ones(8, np.float32), "space", 1)
    still = await store.get("u")
    assert still is not None and still.opted_out and still.recent_items == ()
    assert not await store.set_consent("u", False)  # nothing left to delete

    assert not await store.set_consent("u", True)
    assert await store.get("u") is None  # back in: an empty profile
    again = await store.record("u", [event("e1", "a")])
    assert not again.opted_out and again.fresh == (True,)  # the dedupe window went with the profile
    assert again.profile is not None and again.profile.recent_items == ("a",)


async def test_put_many_skips_opted_out_users_and_counts_the_written(store: ProfileStore) -> None:
    await store.set_consent("b", False)
    written = await store.put_many({"a": profile(1, ("x",)), "b": profile(2, ("y",)), "c": profile(3, ("z",))})
    assert written == 2
    got_a, got_b, got_c = await store.get("a"), await store.get("b"), await store.get("c")
    assert got_a is not None and got_a.recent_items == ("x",)
    assert got_c is not None and got_c.recent_items == ("z",)
    assert got_b is not None and got_b.opted_out and got_b.recent_items == ()
    assert await store.put_many({}) == 0


async def test_forget_reports_each_kind_of_data_that_existed(store: ProfileStore) -> None:
    await store.record("events", [event("e1", "a")])
    await store.set_consent("opted-out", False)
    await store.set_interests("interests-only", ["cat-1"])
    await store.record("opted-out-later", [event("e1", "a")])
    await store.set_consent("opted-out-later", False)
    assert await store.forget("events") == ("profile", "recent_items", "event_ids")
    assert await store.forget("opted-out") == ("consent",)
    assert await store.forget("interests-only") == ("profile",)
    assert await store.forget("opted-out-later") == ("consent",)
    for user in ("events", "opted-out", "interests-only", "opted-out-later"):
        assert await store.get(user) is None
        assert await store.forget(user) == ()
    assert (await store.record("events", [event("e1", "a")])).fresh == (True,)  # its event ids were erased


def parity_batches() -> list[list[StoredEvent]]:
    """One user's events in four batches: categories overlapping, times out of order, retried ids."""
    day = 86_400.0
    return [
        [
            event("e1", "i1", EventType.CLICK, BASE_TIME + 3.25 * day, ("books", "maths")),
            event("e2", "i2", EventType.PURCHASE, BASE_TIME, ("books",)),
            event("e3", "i3", EventType.DWELL, BASE_TIME + 0.1, ("film",), weight=12_345.678 / 30_000.0),
        ],
        [
            event("e4", "i4", EventType.RATING, BASE_TIME + 40 * day, ("film", "maths"), weight=7.3 / 2.5),
            event("e2", "i2", EventType.PURCHASE, BASE_TIME, ("books",)),  # a retry
            event("e5", "i5", EventType.VIEW, BASE_TIME - 17.5 * day, ("books", "film", "garden")),
        ],
        [
            event("e6", "i1", EventType.LIKE, BASE_TIME + 39.999 * day, ("books", "maths")),
            event("e7", "unknown", EventType.SHARE, BASE_TIME + 100 * day),
            event("e8", "i6", EventType.ADD_TO_CART, BASE_TIME - 0.000_001, ("garden",)),
            event("e8", "i6", EventType.ADD_TO_CART, BASE_TIME - 0.000_001, ("garden",)),  # repeated in a batch
        ],
        [event("e9", "i7", EventType.DWELL, BASE_TIME + 2 * day, ("film",), weight=0.0)],
    ]


async def test_memory_and_redis_build_identical_profiles_from_the_same_events(redis_url: str) -> None:
    memory = InMemoryProfileStore(Pseudonymizer(SECRET), SETTINGS)
    in_redis = RedisProfileStore(RedisStoreOptions(url=redis_url, settings=SETTINGS), Pseudonymizer(SECRET))
    try:
        last_seq = {"memory": 0, "redis": 0}
        for batch in parity_batches():
            from_memory, from_redis = await memory.record("u", batch), await in_redis.record("u", batch)
            assert from_memory.fresh == from_redis.fresh
            # seq is an opaque token that only grows (never repeated, even across erasure)
            assert from_memory.seq > last_seq["memory"] and from_redis.seq > last_seq["redis"]
            last_seq = {"memory": from_memory.seq, "redis": from_redis.seq}
        got_memory, got_redis = await memory.get("u"), await in_redis.get("u")
    finally:
        await in_redis.close()
    assert got_memory is not None and got_redis is not None
    assert dict(got_memory.categories) == dict(got_redis.categories)  # bit for bit
    assert set(got_memory.categories) == {"books", "maths", "film", "garden"}
    assert dict(got_memory.event_counts) == dict(got_redis.event_counts)
    assert got_memory.recent_items == got_redis.recent_items == ("i7", "i6", "unknown", "i1", "i5")
    assert got_memory.recent_weights == got_redis.recent_weights
    assert got_memory.last_seen == got_redis.last_seen == BASE_TIME + 100 * 86_400.0
    # ...and both equal the reference replay of the events each store kept.
    kept: dict[str, StoredEvent] = {}
    for batch in parity_batches():
        for e in batch:
            kept.setdefault(e.event_id, e)  # the first of each id, in arrival order
    reference = replay(kept.values(), SETTINGS)
    assert dict(reference.categories) == dict(got_memory.categories)
    assert (
        dict(reference.event_counts)
        == dict(got_memory.event_counts)
        == {
            "click": 1,
            "purchase": 1,
            "dwell": 2,
            "rating": 1,
            "view": 1,
            "like": 1,
            "share": 1,
            "add_to_cart": 1,
        }
    )
    assert reference.recent_weights == got_memory.recent_weights


def test_snapshot_round_trips_every_profile_field(tmp_path: Path) -> None:
    from hyperrec.profiles.snapshot import load_profiles, save_profiles

    full = Profile(
        user_vector=np.arange(4, dtype=np.float32),
        embedding_space="space-9",
        recent_items=("a", "b", "a"),
        recent_weights=(2.0, 0.5, 1.0),
        updated_at=123.5,
        categories={"drama": CategoryAffinity(3.25, 1_700_000_000.0), "näh": CategoryAffinity(0.1, 5.0)},
        event_counts={"click": 2, "rating": 1},
        last_seen=1_700_000_000.0,
        interests=("drama",),
    )
    bare = Profile(recent_items=("z",), updated_at=1.0)  # no vector: kept as such
    path = tmp_path / "profiles.npz"
    save_profiles(path, {"u1": full, "u2": bare})
    got = load_profiles(path)
    assert got["u1"].user_vector is not None and got["u2"].user_vector is None and got["u2"].embedding_space == ""
    np.testing.assert_array_equal(got["u1"].user_vector, full.user_vector)
    for field in ("embedding_space", "recent_items", "recent_weights", "updated_at", "categories", "event_counts"):
        assert getattr(got["u1"], field) == getattr(full, field)
    assert got["u1"].last_seen == full.last_seen and got["u1"].interests == full.interests
    assert got["u2"].recent_items == ("z",) and got["u2"].weights_of_recent() == (1.0,)
