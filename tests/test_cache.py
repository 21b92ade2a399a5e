"""The top-N cache over a real server, Redis and channel: a repeated call is a hit with the same answer and no
compute; a new event, another context segment, a model swap or the TTL make it a miss; off by default."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hyperrec.core.bundle import Bundle
from hyperrec.core.cache import CacheSettings, TopNCache, profile_fingerprint
from hyperrec.core.domain import ScoredItem, Strategy
from hyperrec.core.profile import Profile
from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import admin_pb2_grpc as apb_grpc
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from tests.helpers import publish_toy, sample
from tests.serving import TEST_SECRET, Running, request, running_server

ADMIN = "cache-admin-token-0123456789"


def hits() -> float:
    return sample("hyperrec_cache_requests_total", {"result": "hit"})


def misses() -> float:
    return sample("hyperrec_cache_requests_total", {"result": "miss"})


def computed() -> float:
    """Calls that went through retrieval (the compute stage)."""
    return sample("hyperrec_stage_duration_seconds_count", {"stage": "retrieval"})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    publish_toy(tmp_path, model_name="toy", seed=1)
    publish_toy(tmp_path, model_name="toy", seed=2)
    return tmp_path


def fan(bundle: Bundle, row: int) -> Profile:
    """A stored vector for this version, and recent items that any version can fold in."""
    return Profile(
        user_vector=bundle.item_embeddings[row].copy(),
        embedding_space=bundle.manifest.embedding_space,
        recent_items=(bundle.item_ids[row], bundle.item_ids[row + 1]),
    )


@pytest.fixture
async def cached(repo: Path, redis_url: str) -> AsyncIterator[Running]:
    async with running_server(
        repo, "toy", model_version=1, redis_url=redis_url, profile_secret=TEST_SECRET, cache_ttl_s=60,
        admin_token=ADMIN,
    ) as running:  # fmt: skip
        bundle = running.app.slot.active
        assert bundle is not None
        await running.app.store.put_many({"alice": fan(bundle, 7)})
        yield running


def items(reply: pb.RecommendResponse) -> list[tuple[str, float]]:
    return [(i.item_id, i.score) for i in reply.items]


async def test_a_repeated_call_is_answered_from_the_cache_without_computing(cached: Running) -> None:
    first = await cached.stub.Recommend(request("alice", 5, device_type=pb.DEVICE_TYPE_MOBILE), timeout=10)
    before = (hits(), misses(), computed())
    again = await cached.stub.Recommend(request("alice", 5, device_type=pb.DEVICE_TYPE_MOBILE), timeout=10)
    assert (hits(), misses(), computed()) == (before[0] + 1, before[1], before[2])
    assert items(again) == items(first) and again.strategy == first.strategy == pb.STRATEGY_PERSONALIZED
    assert again.model_version == "1"


async def test_another_segment_k_or_exclusion_is_a_miss(cached: Running) -> None:
    await cached.stub.Recommend(request("alice", 5, device_type=pb.DEVICE_TYPE_MOBILE), timeout=10)
    for other in (
        request("alice", 5, device_type=pb.DEVICE_TYPE_TV),
        request("alice", 6, device_type=pb.DEVICE_TYPE_MOBILE),
        request("alice", 5, device_type=pb.DEVICE_TYPE_MOBILE, exclude=["item-00007"]),
    ):
        before = misses()
        reply = await cached.stub.Recommend(other, timeout=10)
        assert misses() == before + 1
        assert "item-00007" not in [i.item_id for i in reply.items] or not other.exclude_item_ids


async def test_a_new_event_of_the_user_changes_the_answer_key(cached: Running) -> None:
    await cached.stub.Recommend(request("alice", 5), timeout=10)
    profiles: Any = ppb_grpc.ProfilesStub(cached.channel)
    event = ppb.Event(event_id="e-1", user_id="alice", item_id="item-00100", type=ppb.EVENT_TYPE_PURCHASE)
    assert (await profiles.RecordEvents(ppb.RecordEventsRequest(events=[event]), timeout=10)).accepted == 1
    before = (hits(), misses())
    await cached.stub.Recommend(request("alice", 5), timeout=10)
    assert (hits(), misses()) == (before[0], before[1] + 1)  # the profile changed: recomputed, not served stale


async def test_a_model_swap_is_never_answered_from_the_old_versions_entries(cached: Running) -> None:
    await cached.stub.Recommend(request("alice", 5), timeout=10)
    admin: Any = apb_grpc.ModelAdminStub(cached.channel)
    auth = (("authorization", f"Bearer {ADMIN}"),)
    await admin.ActivateVersion(apb.ActivateVersionRequest(model="toy", version=2), metadata=auth, timeout=60)
    before = misses()
    reply = await cached.stub.Recommend(request("alice", 5), timeout=10)
    assert misses() == before + 1 and reply.model_version == "2"
    assert reply.strategy == pb.STRATEGY_PERSONALIZED  # folded in from the recent items under the new version


async def test_entries_expire_after_the_ttl(repo: Path, redis_url: str) -> None:
    async with running_server(
        repo, "toy", model_version=1, redis_url=redis_url, profile_secret=TEST_SECRET, cache_ttl_s=0.3
    ) as running:
        bundle = running.app.slot.active
        assert bundle is not None
        await running.app.store.put_many({"bob": fan(bundle, 3)})
        await running.stub.Recommend(request("bob", 5), timeout=10)
        await asyncio.sleep(0.5)
        before = misses()
        await running.stub.Recommend(request("bob", 5), timeout=10)
    assert misses() == before + 1


async def test_the_cache_is_off_by_default(repo: Path) -> None:
    async with running_server(repo, "toy", model_version=1) as running:
        bundle = running.app.slot.active
        assert bundle is not None
        await running.app.store.put_many({"carol": fan(bundle, 3)})
        before = (hits(), misses(), computed())
        for _ in range(2):
            await running.stub.Recommend(request("carol", 5), timeout=10)
    assert (hits(), misses()) == before[:2] and computed() == before[2] + 2


def test_only_ranked_personalized_answers_are_kept_and_fingerprints_follow_the_profile() -> None:
    cache = TopNCache(CacheSettings(ttl_s=60, max_entries=10))
    answer = (ScoredItem("a", 1.0, 0.5),)
    for strategy in (Strategy.UNRANKED, Strategy.DEGRADED, Strategy.COLD_START, Strategy.NOT_PERSONALIZED):
        cache.put(("k", strategy.value), answer, strategy)
    assert len(cache) == 0
    cache.put(("k",), answer, Strategy.INTERESTS)
    assert cache.get(("k",)) is not None and len(cache) == 1
    one = Profile(recent_items=("x", "y"))
    assert profile_fingerprint(one) == profile_fingerprint(Profile(recent_items=("x", "y")))
    assert profile_fingerprint(one) != profile_fingerprint(Profile(recent_items=("y", "x")))
    assert profile_fingerprint(one) != profile_fingerprint(Profile(recent_items=("x", "y"), interests=("jazz",)))
