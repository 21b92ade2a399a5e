"""The same contract for the in-process and the Redis profile stores, over a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis

from hyperrec.errors import ProfileStoreError
from hyperrec.profiles import Profile, ProfileStore
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.memory import InMemoryProfileStore
from hyperrec.profiles.model import ProfileSettings
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
