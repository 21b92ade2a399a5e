"""The Recommender service end to end over a real gRPC channel, a real Redis and a real bundle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as aredis
from grpc_reflection.v1alpha import reflection_pb2

from hyperrec.core.bundle import Bundle
from hyperrec.core.profile import Profile
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.memory import InMemoryProfileStore
from hyperrec.profiles.redis_store import RedisProfileStore
from hyperrec.v1 import recommender_pb2 as pb
from tests.conftest import free_port
from tests.helpers import NOT_SERVING, SERVING, health_status, publish_toy, wait_until_async
from tests.serving import TEST_SECRET, Running, request, running_server

N_ITEMS = 400


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    publish_toy(repo, n_items=N_ITEMS, dim=8, seed=3)
    return repo


@pytest.fixture(scope="module")
def toy_bundle(toy_repo: Path) -> Bundle:
    return Bundle.load(toy_repo / "toy" / "1")


def user_profile(bundle: Bundle, row: int) -> Profile:
    """A user whose vector equals item `row`'s embedding: that item should rank first."""
    return Profile(user_vector=bundle.item_embeddings[row].copy(), embedding_space=bundle.manifest.embedding_space)


@pytest.fixture
async def served(toy_repo: Path, toy_bundle: Bundle, redis_url: str) -> AsyncIterator[Running]:
    async with running_server(toy_repo, "toy", redis_url=redis_url, profile_secret=TEST_SECRET) as running:
        await running.app.store.put_many({"alice": user_profile(toy_bundle, 7), "bob": user_profile(toy_bundle, 200)})
        yield running


async def test_personalized_answer_has_k_distinct_items_ordered_by_score(served: Running, toy_bundle: Bundle) -> None:
    reply = await served.stub.Recommend(request("alice", k=20), timeout=5)
    ids = [i.item_id for i in reply.items]
    scores = [i.score for i in reply.items]
    assert reply.strategy == pb.STRATEGY_PERSONALIZED
    assert len(ids) == 20 and len(set(ids)) == 20
    assert scores == sorted(scores, reverse=True)
    assert ids[0] == toy_bundle.item_ids[7]  # the item equal to alice's vector
    assert reply.model_name == "toy" and reply.model_version == "1"
    # Scores are the ranker's: a dot product (plus a zero context term) equal to the retrieval score here.
    np.testing.assert_allclose([i.score for i in reply.items], [i.retrieval_score for i in reply.items], rtol=1e-5)


async def test_excluded_items_never_come_back_and_k_is_still_met(served: Running) -> None:
    first = await served.stub.Recommend(request("alice", k=30), timeout=5)
    excluded = [i.item_id for i in first.items] + ["not-in-catalogue"]
    reply = await served.stub.Recommend(request("alice", k=30, exclude=excluded), timeout=5)
    ids = [i.item_id for i in reply.items]
    assert len(ids) == 30 and not set(ids) & set(excluded)


async def test_two_users_with_different_profiles_get_different_lists(served: Running, toy_bundle: Bundle) -> None:
    a = await served.stub.Recommend(request("alice", k=10), timeout=5)
    b = await served.stub.Recommend(request("bob", k=10), timeout=5)
    assert a.items[0].item_id == toy_bundle.item_ids[7] and b.items[0].item_id == toy_bundle.item_ids[200]
    assert {i.item_id for i in a.items} != {i.item_id for i in b.items}


async def test_unknown_user_gets_cold_start_list(served: Running, toy_bundle: Bundle) -> None:
    reply = await served.stub.Recommend(request("somebody-new", k=5), timeout=5)
    assert reply.strategy == pb.STRATEGY_COLD_START
    assert [i.item_id for i in reply.items] == [toy_bundle.item_ids[i] for i in range(5)]  # global popularity


async def test_cold_start_uses_the_context_segment_list(served: Running, toy_bundle: Bundle) -> None:
    evening = datetime.now(UTC).replace(hour=20, minute=0) - timedelta(days=1)
    ctx = {"device_type": pb.DEVICE_TYPE_MOBILE}
    req = request("somebody-new", k=12, **ctx)
    req.context.event_time.FromDatetime(evening)
    reply = await served.stub.Recommend(req, timeout=5)
    ids = [i.item_id for i in reply.items]
    segment = [toy_bundle.item_ids[i] for i in range(N_ITEMS - 1, N_ITEMS - 11, -1)]
    assert ids[:10] == segment  # the mobile/evening list first...
    assert ids[10:] == [toy_bundle.item_ids[0], toy_bundle.item_ids[1]]  # ...then global popularity


async def test_fold_in_from_recent_items_when_vector_is_from_another_space(served: Running, toy_bundle: Bundle) -> None:
    stale = Profile(
        user_vector=np.ones(8, np.float32), embedding_space="another-model", recent_items=(toy_bundle.item_ids[42],)
    )
    await served.app.store.put("carol", stale)
    asked = request("carol", k=3)
    asked.include_seen_items = True  # the folded-in vector points at the one recent item: it comes first
    reply = await served.stub.Recommend(asked, timeout=5)
    assert reply.strategy == pb.STRATEGY_PERSONALIZED
    assert reply.items[0].item_id == toy_bundle.item_ids[42]
    default = await served.stub.Recommend(request("carol", k=3), timeout=5)  # seen items are left out by default
    assert default.strategy == pb.STRATEGY_PERSONALIZED
    assert toy_bundle.item_ids[42] not in [i.item_id for i in default.items]


async def test_timings_only_when_asked(served: Running) -> None:
    plain = await served.stub.Recommend(request("alice", k=3), timeout=5)
    assert not plain.HasField("timings")
    req = request("alice", k=3)
    req.include_timings = True
    timed = await served.stub.Recommend(req, timeout=5)
    t = timed.timings
    assert t.total_ms > 0 and t.retrieval_ms > 0 and t.ranking_ms > 0
    assert t.total_ms >= t.profile_ms


async def test_request_id_is_echoed_or_made_up(served: Running) -> None:
    req = request("alice", k=1)
    req.request_id = "trace-123"
    assert (await served.stub.Recommend(req, timeout=5)).request_id == "trace-123"
    assert len((await served.stub.Recommend(request("alice", k=1), timeout=5)).request_id) == 32


def _bad_requests() -> list[tuple[str, pb.RecommendRequest, str]]:
    now = datetime.now(UTC)
    cases = [
        ("empty user", request("", k=5), "user_id"),
        ("long user", request("u" * 257, k=5), "user_id"),
        ("k zero", request("alice", k=0), "k"),
        ("k negative", request("alice", k=-3), "k"),
        ("k above max", request("alice", k=101), "k"),
        ("too many exclusions", request("alice", k=5, exclude=[f"i{i}" for i in range(1001)]), "exclude_item_ids"),
        ("unknown device", request("alice", k=5, device_type=99), "context.device_type"),
        ("unknown surface", request("alice", k=5, surface=42), "context.surface"),
        ("bad country", request("alice", k=5, country="Germany"), "context.country"),
        ("offset", request("alice", k=5, utc_offset_minutes=900), "context.utc_offset_minutes"),
    ]
    old = request("alice", k=5)
    old.context.event_time.FromDatetime(datetime(1990, 1, 1, tzinfo=UTC))
    future = request("alice", k=5)
    future.context.event_time.FromDatetime(now + timedelta(days=3))
    huge = request("alice", k=5)
    huge.context.event_time.seconds = 10**15
    long_id = request("alice", k=5)
    long_id.request_id = "r" * 200
    cases += [
        ("ancient event", old, "context.event_time"),
        ("future event", future, "context.event_time"),
        ("unrepresentable event", huge, "context.event_time"),
        ("long request id", long_id, "request_id"),
    ]
    return cases


@pytest.mark.parametrize(("name", "req", "field"), _bad_requests(), ids=[c[0] for c in _bad_requests()])
async def test_bad_input_is_invalid_argument_naming_the_field(
    served: Running, name: str, req: pb.RecommendRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Recommend(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith(f"{field}:")
    assert "request id" in details


async def test_health_goes_not_serving_to_serving_and_recommend_waits_for_a_model(toy_repo: Path) -> None:
    async with running_server(toy_repo, "toy", load=False) as running:
        for service in ("", "hyperrec.v1.Recommender"):
            assert await health_status(running.channel, service) == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.Recommend(request("alice"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await running.app.load_model()
        for service in ("", "hyperrec.v1.Recommender"):
            assert await health_status(running.channel, service) == SERVING
        assert (await running.stub.Recommend(request("alice"), timeout=5)).strategy == pb.STRATEGY_COLD_START


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_services_under_both_protocol_versions(toy_repo: Path, version: str) -> None:
    """buf curl and grpcurl ask grpc.reflection.v1 first; older tools v1alpha. Both answer, with every service."""
    async with running_server(toy_repo, "toy", load=False) as running:
        info = running.channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

        async def asks() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="hyperrec.v1.Recommender")

        replies = [reply async for reply in info(asks(), timeout=5)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"hyperrec.v1.Recommender", "hyperrec.v1.Profiles", "hyperrec.v1.ModelAdmin"} <= names
    assert {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the contract itself, for buf curl


async def test_health_list_reports_every_service_and_follows_the_lifecycle(toy_repo: Path) -> None:
    """grpc.health.v1 Health/List (grpcio's asyncio servicer leaves it unimplemented) lists what Check answers."""
    from grpc_health.v1 import health_pb2

    async with running_server(toy_repo, "toy", load=False) as running:
        listing = running.channel.unary_unary(
            "/grpc.health.v1.Health/List",
            request_serializer=health_pb2.HealthListRequest.SerializeToString,  # type: ignore[attr-defined]
            response_deserializer=health_pb2.HealthListResponse.FromString,  # type: ignore[attr-defined]
        )

        async def statuses() -> dict[str, int]:
            reply = await listing(health_pb2.HealthListRequest(), timeout=5)  # type: ignore[attr-defined]
            return {name: answer.status for name, answer in reply.statuses.items()}

        before = await statuses()
        await running.app.load_model()
        after = await statuses()
        await running.app.transport.enter_graceful_shutdown()
        draining = await statuses()
    services = {"", "hyperrec.v1.Recommender", "hyperrec.v1.Profiles"}
    assert services <= set(before) and all(before[s] == NOT_SERVING for s in services)
    assert set(after) == set(before) and all(after[s] == SERVING for s in services)
    assert set(draining) == set(before) and all(status == NOT_SERVING for status in draining.values())


async def test_redis_down_answers_degraded(toy_repo: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with running_server(toy_repo, "toy", redis_url=url, profile_secret=TEST_SECRET) as running:
        reply = await running.stub.Recommend(request("alice", k=5), timeout=5)
    assert reply.strategy == pb.STRATEGY_DEGRADED and len(reply.items) == 5


async def test_slow_redis_past_the_budget_answers_degraded(toy_repo: Path, redis_url: str) -> None:
    """A real redis-server blocked by DEBUG SLEEP: the profile budget runs out, the answer degrades."""
    async with running_server(
        toy_repo,
        "toy",
        redis_url=redis_url,
        profile_secret=TEST_SECRET,
        profile_budget_ms=50,
        redis_read_timeout_ms=2000,
    ) as running:
        blocker = aredis.Redis.from_url(redis_url)
        sleeper = asyncio.ensure_future(blocker.execute_command("DEBUG", "SLEEP", "0.5"))  # type: ignore[no-untyped-call]
        await wait_until_async(lambda: redis_is_blocked(redis_url), "DEBUG SLEEP to block the redis-server")
        reply = await running.stub.Recommend(request("alice", k=5), timeout=5)
        await sleeper
        await blocker.aclose()
    assert reply.strategy == pb.STRATEGY_DEGRADED


def redis_is_blocked(url: str) -> bool:
    """Whether the redis-server at `url` is busy (a PING gets no answer within 20 ms)."""
    probe = redis.Redis.from_url(url, socket_timeout=0.02)
    try:
        probe.ping()
    except redis.TimeoutError:
        return True
    finally:
        probe.close()
    return False


class BuggyStore(InMemoryProfileStore):
    """A store with a programming error (not a backend failure): it must surface as INTERNAL."""

    def __init__(self) -> None:
        super().__init__(Pseudonymizer(b"buggy-store-secret-0123456789"))

    async def get(self, user_id: str) -> Profile | None:
        raise KeyError("bug in the store")


async def test_unexpected_failure_is_internal_with_request_id_and_logged(
    toy_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(toy_repo, "toy", store=BuggyStore()) as running:
        req = request("alice")
        req.request_id = "req-internal-1"
        with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.Recommend(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details() or ""
    assert "req-internal-1" in details
    assert "bug in the store" not in details  # internals stay in the log
    logged = [r for r in caplog.records if "req-internal-1" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


async def test_expired_deadline_is_deadline_exceeded(served: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Recommend(request("alice"), timeout=0.000001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_redis_store_is_pseudonymous_under_the_server(served: Running, redis_url: str) -> None:
    keys = redis.Redis.from_url(redis_url).keys("*")
    assert keys and not any(b"alice" in k or b"bob" in k for k in keys)
    expected = Pseudonymizer(TEST_SECRET.encode()).user_key("alice")
    assert any(expected.encode() in k for k in keys)
    assert isinstance(served.app.store, RedisProfileStore)


@pytest.mark.parametrize("request_id", ["é-trace", "line\nbreak", "tab\there", "nul\x00byte"])
async def test_request_ids_that_cannot_travel_as_metadata_are_invalid_argument(
    served: Running, request_id: str
) -> None:
    req = request("alice", k=5)
    req.request_id = request_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Recommend(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("request_id: must be printable ASCII")
    trailing = dict(err.value.trailing_metadata() or ())
    assert len(trailing["x-request-id"]) == 32  # one of ours, since the caller's cannot be echoed


async def test_non_finite_stored_vector_falls_back_to_fold_in(served: Running, toy_bundle: Bundle) -> None:
    broken = Profile(
        user_vector=np.full(8, np.nan, np.float32),
        embedding_space=toy_bundle.manifest.embedding_space,
        recent_items=(toy_bundle.item_ids[9],),
    )
    await served.app.store.put("dave", broken)
    asked = request("dave", k=5)
    asked.include_seen_items = True  # the folded-in vector points at the one recent item: it comes first
    reply = await served.stub.Recommend(asked, timeout=5)
    assert reply.strategy == pb.STRATEGY_PERSONALIZED and len(reply.items) == 5
    assert reply.items[0].item_id == toy_bundle.item_ids[9]
    assert all(np.isfinite(i.score) for i in reply.items)


async def test_cold_start_still_returns_k_when_the_popular_lists_are_excluded(
    served: Running, toy_bundle: Bundle
) -> None:
    popular = [toy_bundle.item_ids[i] for i in range(50)]  # the toy bundle's whole global list
    reply = await served.stub.Recommend(request("somebody-new", k=20, exclude=popular), timeout=5)
    ids = [i.item_id for i in reply.items]
    assert reply.strategy == pb.STRATEGY_COLD_START and len(set(ids)) == 20 and not set(ids) & set(popular)


async def test_malformed_stored_profile_answers_degraded_not_internal(served: Running, redis_url: str) -> None:
    key = Pseudonymizer(TEST_SECRET.encode()).user_key("alice")
    redis.Redis.from_url(redis_url).hset(f"hr:{{{key}}}:profile", "upd", "abc")
    reply = await served.stub.Recommend(request("alice", k=5), timeout=5)
    assert reply.strategy == pb.STRATEGY_DEGRADED and len(reply.items) == 5


async def test_deadline_passing_inside_the_pipeline_is_deadline_exceeded(served: Running) -> None:
    """The server's own DEADLINE_EXCEEDED path (the client-side timeout test never reaches it)."""
    import time

    from hyperrec.core.domain import RecommendRequest
    from hyperrec.core.errors import DeadlineExceeded
    from hyperrec.core.pipeline import BundleSlot, PipelineOptions, RecommendPipeline
    from hyperrec.server.status import status_for

    slot = BundleSlot()
    assert served.app.slot.active is not None
    slot.swap(served.app.slot.active)
    pipeline = RecommendPipeline(served.app.store, slot, PipelineOptions(), served.app.components.executor)
    with pytest.raises(DeadlineExceeded) as err:
        await pipeline.recommend(RecommendRequest("alice", 5, request_id="r1"), deadline=time.monotonic() - 1)
    assert status_for(err.value, "r1")[0] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_request_that_expired_while_queued_computes_nothing(
    toy_bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under overload, work waits for a compute thread; once its deadline has passed it must not use the index.

    The index's one search entry point is watched (the compute stage searches every batch with
    `search_excluding_many`); a request with time left must show up there, or the watch is in the wrong place."""
    import time

    from hyperrec.core.compute import Cutoffs, rank_candidates
    from hyperrec.core.domain import RecommendRequest
    from hyperrec.core.errors import DeadlineExceeded

    searched: list[int] = []
    search = toy_bundle.index.search_excluding_many

    def watched(queries: np.ndarray, *args: Any) -> Any:
        searched.append(len(queries))
        return search(queries, *args)

    monkeypatch.setattr(toy_bundle.index, "search_excluding_many", watched)
    uvec = toy_bundle.item_embeddings[0]
    now = datetime.now(UTC)
    rank_candidates(toy_bundle, uvec, RecommendRequest("u", 5), now, 50, Cutoffs(deadline=time.monotonic() + 60))
    assert searched == [1]  # a request with time left searches the index through the watched call
    with pytest.raises(DeadlineExceeded, match="waiting for a compute thread"):
        expired = Cutoffs(deadline=time.monotonic() - 0.1)
        rank_candidates(toy_bundle, uvec, RecommendRequest("u", 5), now, 50, expired)
    assert searched == [1]  # the expired one searched nothing
