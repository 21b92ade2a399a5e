"""Overload admission, the ranking budget, per-method and per-stage metrics, JSON logs with request ids and
OpenTelemetry spans, over a real server, a real channel, a real Redis and real ONNX Runtime."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from hyperrec.core.bundle import Bundle, publish_bundle
from hyperrec.core.compute import Cutoffs, rank_candidates
from hyperrec.core.domain import RecommendRequest
from hyperrec.core.features import default_feature_spec
from hyperrec.core.logs import RequestIdFilter, formatter
from hyperrec.core.pipeline import REPLY_MARGIN_S, PipelineOptions, RecommendPipeline
from hyperrec.core.profile import Profile
from hyperrec.core.ranker import RankingRun
from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import admin_pb2_grpc as apb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from tests.helpers import SERVING, health_status, make_contents, make_ranker_onnx, sample, wait_until_async
from tests.serving import TEST_SECRET, Running, request, running_server

RECOMMEND = "/hyperrec.v1.Recommender/Recommend"
ADMIN = "hardening-admin-token-0123"


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ranker that adds a context term to the inner product, so ranked scores differ from retrieval scores."""
    repo = tmp_path_factory.mktemp("repo")
    spec = default_feature_spec(8)
    ranker = make_ranker_onnx(8, spec.context_dim, np.full(spec.context_dim, 0.25, np.float32))
    publish_bundle(repo, make_contents(n_items=300, dim=8, seed=5, spec=spec, ranker=ranker))
    return repo


@pytest.fixture(scope="module")
def toy_bundle(toy_repo: Path) -> Bundle:
    return Bundle.load(toy_repo / "toy" / "1")


def fan_of(bundle: Bundle, row: int) -> Profile:
    return Profile(user_vector=bundle.item_embeddings[row].copy(), embedding_space=bundle.manifest.embedding_space)


# --- overload -------------------------------------------------------------------------------------------------


@pytest.fixture
async def limited(toy_repo: Path, toy_bundle: Bundle, redis_url: str) -> AsyncIterator[Running]:
    async with running_server(
        toy_repo, "toy", redis_url=redis_url, profile_secret=TEST_SECRET, max_in_flight=2, admin_token=ADMIN
    ) as running:
        await running.app.store.put_many({"alice": fan_of(toy_bundle, 7)})
        yield running


@contextmanager
def paused_redis(url: str, pause_ms: int) -> Iterator[None]:
    """Every Redis client's commands wait for `pause_ms` (CLIENT PAUSE ALL) while the block runs."""
    pauser = redis.Redis.from_url(url)
    try:
        pauser.client_pause(pause_ms, all=True)
        yield
    finally:
        pauser.close()


async def until_in_flight(n: int) -> None:
    """Wait (polling the gauge the server exports) until `n` calls are in flight."""
    await wait_until_async(lambda: sample("hyperrec_grpc_requests_in_flight") >= n, f"{n} calls in flight", 5, 0.01)


async def test_calls_beyond_the_in_flight_limit_are_refused_at_once_and_admitted_ones_complete(
    limited: Running, redis_url: str
) -> None:
    """Two calls are held in flight by a paused Redis (a real stall: every profile read waits); the third is
    refused RESOURCE_EXHAUSTED while they are still waiting, and the two then answer normally."""
    refused_before = sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "RESOURCE_EXHAUSTED"})
    pauser = redis.Redis.from_url(redis_url)
    pauser.client_pause(1500, all=True)
    try:
        held = [asyncio.ensure_future(limited.stub.Recommend(request("alice", 5), timeout=10)) for _ in range(2)]
        await until_in_flight(2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await limited.stub.Recommend(request("alice", 5), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 calls already in flight" in (err.value.details() or "")
        assert not any(call.done() for call in held)  # refused while the admitted calls were still waiting

        # Health and the admin service are not counted against the limit: operators can still act.
        assert await health_status(limited.channel) == SERVING
        admin: Any = apb_grpc.ModelAdminStub(limited.channel)
        models = await admin.ListModels(apb.ListModelsRequest(), metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert models.models[0].active_version == 1
    finally:
        answers = await asyncio.gather(*held)
    assert [a.strategy for a in answers] == [pb.STRATEGY_PERSONALIZED] * 2
    assert all(a.items[0].item_id == "item-00007" for a in answers)
    assert sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "RESOURCE_EXHAUSTED"}) == (
        refused_before + 1
    )
    assert sample("hyperrec_grpc_requests_in_flight") == 0
    # Capacity is back: the next call is admitted.
    assert (await limited.stub.Recommend(request("alice", 5), timeout=10)).strategy == pb.STRATEGY_PERSONALIZED


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    order: int  # the order in which the calls ended (0 first)


async def outcomes(calls: list[Awaitable[Any]]) -> list[Outcome]:
    """Run `calls` concurrently; how each ended, numbered in the order they ended."""
    ended = itertools.count()

    async def one(call: Awaitable[Any]) -> Outcome:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "", next(ended))
        return Outcome(grpc.StatusCode.OK, "", next(ended))

    return await asyncio.gather(*(one(c) for c in calls))


@pytest.fixture
async def held(toy_repo: Path, toy_bundle: Bundle, redis_url: str) -> AsyncIterator[Running]:
    """A server whose profile reads wait out a Redis pause instead of giving up (budget and timeout 10 s)."""
    async with running_server(
        toy_repo,
        "toy",
        redis_url=redis_url,
        profile_secret=TEST_SECRET,
        redis_read_timeout_ms=10_000,
        profile_budget_ms=10_000,
        max_in_flight=8,
        compute_threads=1,
    ) as running:
        await running.app.store.put_many({"alice": fan_of(toy_bundle, 7)})
        yield running


async def test_a_burst_of_2000_calls_is_refused_at_the_door_while_the_admitted_ones_wait(
    held: Running, redis_url: str
) -> None:
    """2,000 calls sent at once while the eight admitted ones are held by a paused Redis: every other call is
    refused RESOURCE_EXHAUSTED (none dropped CANCELLED by grpc-core, none left to time out), and every refusal
    comes back before any admitted call answers: they were refused on arrival, not after waiting."""
    refused_before = sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "RESOURCE_EXHAUSTED"})
    with paused_redis(redis_url, 4000):  # ample for 1,992 refusals on a slow machine; they take well under that
        ended = await outcomes([held.stub.Recommend(request("alice", 5), timeout=30) for _ in range(2000)])
    codes = Counter(o.code for o in ended)
    assert codes == {grpc.StatusCode.OK: 8, grpc.StatusCode.RESOURCE_EXHAUSTED: 1992}, codes
    refusals = [o for o in ended if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all("8 calls already in flight" in o.details for o in refusals)
    assert max(o.order for o in refusals) < min(o.order for o in ended if o.code == grpc.StatusCode.OK)
    assert sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "RESOURCE_EXHAUSTED"}) == (
        refused_before + 1992
    )
    assert sample("hyperrec_grpc_requests_in_flight") == 0


async def test_a_call_whose_deadline_the_queue_cannot_meet_is_refused_at_arrival(held: Running, redis_url: str) -> None:
    """One compute thread and calls that each took about a second (a paused Redis): with two calls in progress,
    a third one expects about three seconds. With one second left it is refused at once, saying why; with ten
    seconds left it is admitted and answered."""
    with paused_redis(redis_url, 1000):  # two calls that take about 1 s each set the service time
        await asyncio.gather(*(held.stub.Recommend(request("alice", 5), timeout=30) for _ in range(2)))
    service = held.app.transport.gate.limit.service_time
    assert service is not None and service >= 0.5
    with paused_redis(redis_url, 1500):
        ahead = [asyncio.ensure_future(held.stub.Recommend(request("alice", 5), timeout=30)) for _ in range(2)]
        await until_in_flight(2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await held.stub.Recommend(request("alice", 5), timeout=1.0)
        patient = asyncio.ensure_future(held.stub.Recommend(request("alice", 5), timeout=10 * service + 10))
        answers = await asyncio.gather(*ahead, patient)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 calls ahead would take about" in (err.value.details() or "")
    assert "before the deadline" in (err.value.details() or "")
    assert [a.strategy for a in answers] == [pb.STRATEGY_PERSONALIZED] * 3


# --- ranking budget -------------------------------------------------------------------------------------------


def retrieval_ordered(reply: pb.RecommendResponse) -> bool:
    scores = [i.score for i in reply.items]
    return all(i.score == i.retrieval_score for i in reply.items) and scores == sorted(scores, reverse=True)


async def test_past_the_ranking_budget_the_answer_keeps_retrieval_order_and_says_unranked(
    toy_repo: Path, toy_bundle: Bundle
) -> None:
    """A budget far shorter than retrieval takes: ranking never starts, the answer is the retrieval order."""
    async with running_server(toy_repo, "toy", ranking_budget_ms=1e-6) as running:
        await running.app.store.put_many({"alice": fan_of(toy_bundle, 7)})
        before = sample("hyperrec_ranking_fallbacks_total", {"reason": "budget"})
        reply = await running.stub.Recommend(request("alice", 10), timeout=10)
    assert reply.strategy == pb.STRATEGY_UNRANKED
    assert len(reply.items) == 10 and reply.items[0].item_id == "item-00007"  # the nearest item still comes first
    assert retrieval_ordered(reply)
    assert sample("hyperrec_ranking_fallbacks_total", {"reason": "budget"}) == before + 1
    assert sample("hyperrec_recommendations_total", {"strategy": "unranked", "model_version": "1"}) >= 1


async def test_within_the_budget_answers_are_ranked(toy_repo: Path, toy_bundle: Bundle) -> None:
    async with running_server(toy_repo, "toy", ranking_budget_ms=60_000) as running:
        await running.app.store.put_many({"alice": fan_of(toy_bundle, 7)})
        reply = await running.stub.Recommend(request("alice", 10), timeout=10)
    assert reply.strategy == pb.STRATEGY_PERSONALIZED
    assert all(i.score != i.retrieval_score for i in reply.items)  # the context term was added: ranked


def test_a_ranking_run_stopped_by_its_budget_falls_back_to_retrieval_order(toy_bundle: Bundle) -> None:
    """The stop handle is ONNX Runtime's terminate flag: a stopped run raises inside ORT, and the stage answers
    in retrieval order with the reason that set the cut-off."""
    uvec = toy_bundle.item_embeddings[7]
    req = RecommendRequest("alice", 5)
    now = datetime.now(UTC)
    ranked = rank_candidates(toy_bundle, uvec, req, now, 50, Cutoffs())
    assert ranked.fallback is None
    for by_deadline, reason in ((False, "budget"), (True, "deadline")):
        run = RankingRun()
        run.stop()  # as the event loop does when the cut-off passes during the run
        cut = Cutoffs(deadline=None, rank_by=time.monotonic() + 60, rank_by_deadline=by_deadline)
        stopped = rank_candidates(toy_bundle, uvec, req, now, 50, cut, run=run)
        assert stopped.fallback == reason
        assert stopped.items[0].item_id == "item-00007"
        assert all(i.score == i.retrieval_score for i in stopped.items)
        assert stopped.ranking_ms >= 0


def test_the_ranking_cut_off_is_the_budget_or_just_before_the_deadline(toy_bundle: Bundle) -> None:
    options = PipelineOptions(ranking_budget_s=0.1)
    recommender = RecommendPipeline(store=None, slot=None, options=options, executor=None)  # type: ignore[arg-type]
    arrived = time.monotonic()
    far = recommender._cutoffs(arrived, arrived + 10)
    assert far.rank_by == pytest.approx(arrived + 0.1) and not far.rank_by_deadline
    near = recommender._cutoffs(arrived, arrived + 0.05)
    assert near.rank_by == pytest.approx(arrived + 0.05 - REPLY_MARGIN_S) and near.rank_by_deadline
    assert recommender._cutoffs(arrived, None).rank_by == pytest.approx(arrived + 0.1)


# --- metrics --------------------------------------------------------------------------------------------------


async def test_each_call_counts_by_method_and_code_with_its_duration_and_stage_times(
    toy_repo: Path, toy_bundle: Bundle
) -> None:
    async with running_server(toy_repo, "toy") as running:
        await running.app.store.put_many({"alice": fan_of(toy_bundle, 7)})
        ok = sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "OK"})
        bad = sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "INVALID_ARGUMENT"})
        calls = sample("hyperrec_grpc_request_duration_seconds_count", {"method": RECOMMEND})
        queued = sample("hyperrec_grpc_queue_duration_seconds_count", {"method": RECOMMEND})
        stages = {s: sample("hyperrec_stage_duration_seconds_count", {"stage": s}) for s in STAGES}
        await running.stub.Recommend(request("alice", 5), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Recommend(request("alice", 0), timeout=10)
        assert sample("hyperrec_grpc_concurrency_limit") == 64  # the adaptive limit starts at max_in_flight
    assert sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "OK"}) == ok + 1
    assert sample("hyperrec_grpc_requests_total", {"method": RECOMMEND, "code": "INVALID_ARGUMENT"}) == bad + 1
    assert sample("hyperrec_grpc_request_duration_seconds_count", {"method": RECOMMEND}) == calls + 2
    assert sample("hyperrec_grpc_queue_duration_seconds_count", {"method": RECOMMEND}) == queued + 2
    for stage in STAGES:  # the invalid call stops before any stage
        assert sample("hyperrec_stage_duration_seconds_count", {"stage": stage}) == stages[stage] + 1, stage


STAGES = ("profile", "retrieval", "ranking", "total")


# --- logs -----------------------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines into a buffer, as `log_format = json` sets it up."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(formatter("json"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)


async def test_json_logs_carry_the_request_id_of_the_call_being_served(
    toy_repo: Path, toy_bundle: Bundle, json_log: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    """Concurrent calls on one event loop each log their own id (the ranking fallback logs a DEBUG record)."""
    caplog.set_level(logging.DEBUG, logger="hyperrec.core.pipeline")  # restored after the test
    async with running_server(toy_repo, "toy", ranking_budget_ms=1e-6) as running:
        await running.app.store.put_many({"alice": fan_of(toy_bundle, 7)})
        ids = [f"req-json-{i}" for i in range(6)]
        calls = [running.stub.Recommend(pb.RecommendRequest(user_id="alice", k=3, request_id=r)) for r in ids]
        await asyncio.gather(*calls)
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    fallbacks = [r for r in records if "retrieval order" in r["message"]]
    assert sorted(r["request_id"] for r in fallbacks) == ids
    for record in fallbacks:
        assert record["request_id"] in record["message"]  # the message names the request it is about
        assert {"time", "level", "logger", "message", "request_id"} <= set(record)
        assert record["level"] == "DEBUG"


# --- tracing --------------------------------------------------------------------------------------------------


async def test_each_recommend_is_a_server_span_with_a_child_span_per_stage(toy_repo: Path, toy_bundle: Bundle) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process; other tests' spans go here too, harmlessly
    async with running_server(toy_repo, "toy") as running:
        await running.app.store.put_many({"alice": fan_of(toy_bundle, 7)})
        exporter.clear()
        await running.stub.Recommend(request("alice", 5), timeout=10)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans[RECOMMEND]
    assert root.kind == trace.SpanKind.SERVER
    assert root.attributes is not None and root.attributes["hyperrec.strategy"] == "personalized"
    assert root.attributes["hyperrec.model_version"] == "1"
    for stage in ("profile", "retrieval", "ranking"):
        child = spans[stage]
        assert child.parent is not None and child.parent.span_id == root.context.span_id, stage
        assert child.context.trace_id == root.context.trace_id
        assert child.start_time is not None and child.end_time is not None
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time  # type: ignore[operator]
    assert spans["retrieval"].end_time <= spans["ranking"].start_time  # type: ignore[operator]


# --- connection age -------------------------------------------------------------------------------------------


async def test_connections_are_closed_after_their_maximum_age_and_clients_reconnect(toy_repo: Path) -> None:
    """The server sends GOAWAY once a connection is older than max_connection_age_s: the idle client channel
    leaves READY (so it will re-resolve and reconnect), and the next call succeeds on a new connection."""
    async with running_server(toy_repo, "toy", max_connection_age_s=0.5) as running:
        await running.stub.Recommend(request("someone", 3), timeout=10)
        assert running.channel.get_state() == grpc.ChannelConnectivity.READY
        await asyncio.wait_for(running.channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=10)
        assert running.channel.get_state() != grpc.ChannelConnectivity.READY
        reply = await running.stub.Recommend(request("someone", 3), timeout=10)
    assert reply.strategy == pb.STRATEGY_COLD_START


async def test_without_a_maximum_age_an_idle_connection_stays_open(toy_repo: Path) -> None:
    async with running_server(toy_repo, "toy", max_connection_age_s=0) as running:
        await running.stub.Recommend(request("someone", 3), timeout=10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(running.channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=2)


def test_serve_with_log_format_json_writes_one_json_object_per_line(tmp_path: Path) -> None:
    """A real `hyperrec serve` process: its log lines are JSON objects (here those of a start-up that fails)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", "0", "--model-repo", str(tmp_path)]
    done = subprocess.run(
        [*cmd, "--model-name", "nosuch", "--log-format", "json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # every line is JSON
    assert any("listening on" in r["message"] for r in records), done.stderr
    assert any(r["logger"] == "stderr" and "nosuch" in r["message"] for r in records)  # main's own error line
    assert all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    assert all(r["request_id"] is None for r in records)  # logged outside any call
