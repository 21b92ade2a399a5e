"""The profile store failing, stalling and being cancelled: the circuit breaker, degraded answers and recovery.

Unit tests drive `CircuitBreaker` with a fake clock; the rest run a real server against the session's real
redis-server, which is stopped, restarted and put to sleep (DEBUG SLEEP) underneath it.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from hyperrec.core.breaker import BreakerState, CircuitBreaker
from hyperrec.core.bundle import Bundle
from hyperrec.core.profile import Profile
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.redis_store import RedisProfileStore, RedisStoreOptions
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from tests.conftest import RedisProcess
from tests.helpers import publish_toy, wait_until_async
from tests.serving import TEST_SECRET, Running, request, running_server

N_ITEMS = 400

# ---------------------------------------------------------------------------------------------------------------
# CircuitBreaker, with a fake clock
# ---------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list[BreakerState]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, changes: list[BreakerState]) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, open_s=2.0, clock=clock, on_change=changes.append)


def state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state now (a function, so mypy does not narrow it across calls that change it)."""
    return breaker.state


def trip(breaker: CircuitBreaker, failures: int = 3) -> None:
    for _ in range(failures):
        assert breaker.allow()
        breaker.failure()


def test_breaker_opens_after_n_consecutive_failures(breaker: CircuitBreaker, changes: list[BreakerState]) -> None:
    trip(breaker, 2)
    assert state(breaker) == BreakerState.CLOSED and breaker.allow()
    breaker.failure()
    assert state(breaker) == BreakerState.OPEN
    assert changes == [BreakerState.OPEN]


def test_a_success_in_between_resets_the_failure_count(breaker: CircuitBreaker, changes: list[BreakerState]) -> None:
    for _ in range(5):
        trip(breaker, 2)
        assert breaker.allow()
        breaker.success()
    assert state(breaker) == BreakerState.CLOSED and changes == []
    trip(breaker, 3)
    assert state(breaker) == BreakerState.OPEN


def test_open_breaker_refuses_every_call_until_open_s_has_passed(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    for _ in range(10):
        assert not breaker.allow()
        clock.advance(0.19)
    assert state(breaker) == BreakerState.OPEN  # 1.9 s of 2 s
    clock.advance(0.1)
    assert state(breaker) == BreakerState.HALF_OPEN


def test_half_open_lets_exactly_one_probe_through(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(2.0)
    assert breaker.allow()  # the probe
    assert [breaker.allow() for _ in range(20)] == [False] * 20  # everyone else while the probe is out
    assert state(breaker) == BreakerState.HALF_OPEN
    clock.advance(60)  # however long the probe takes
    assert not breaker.allow()


def test_probe_success_closes_the_breaker(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[BreakerState]
) -> None:
    trip(breaker)
    clock.advance(2.5)
    assert breaker.allow()
    breaker.success()
    assert state(breaker) == BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(10))
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    # Closed afresh: it takes the full threshold of new failures to open again.
    trip(breaker, 2)
    assert state(breaker) == BreakerState.CLOSED
    breaker.failure()
    assert state(breaker) == BreakerState.OPEN


def test_probe_failure_reopens_for_another_open_s(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[BreakerState]
) -> None:
    trip(breaker)
    clock.advance(2.0)
    assert breaker.allow()
    clock.advance(0.5)  # the probe took a while
    breaker.failure()
    assert state(breaker) == BreakerState.OPEN and not breaker.allow()
    clock.advance(1.9)  # open_s counts from the probe's failure, not from the first opening
    assert state(breaker) == BreakerState.OPEN and not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()  # the next probe
    assert not breaker.allow()
    breaker.success()
    assert state(breaker) == BreakerState.CLOSED
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_an_abandoned_probe_frees_the_probe_slot(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[BreakerState]
) -> None:
    trip(breaker)
    clock.advance(2.0)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.abandoned()  # the probe's caller gave up: neither success nor failure
    assert state(breaker) == BreakerState.HALF_OPEN
    assert breaker.allow()  # a new probe may go
    assert not breaker.allow()
    breaker.success()
    assert state(breaker) == BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_abandoned_calls_do_not_count_as_failures(breaker: CircuitBreaker) -> None:
    for _ in range(10):
        assert breaker.allow()
        breaker.abandoned()
    assert state(breaker) == BreakerState.CLOSED


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(open_s=0)


# ---------------------------------------------------------------------------------------------------------------
# A real server on the real redis-server
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    publish_toy(repo, n_items=N_ITEMS, dim=8, seed=5, categories=5)
    return repo


def degraded(reason: str) -> float:
    value = REGISTRY.get_sample_value("hyperrec_profile_store_degraded_total", {"reason": reason})
    return value or 0.0


def breaker_gauge() -> float | None:
    return REGISTRY.get_sample_value("hyperrec_profile_store_breaker_state")


def click(user: str, item: str, event_id: str) -> ppb.Event:
    return ppb.Event(event_id=event_id, user_id=user, item_id=item, type=ppb.EVENT_TYPE_CLICK)


def bundle_of(running: Running) -> Bundle:
    bundle = running.app.slot.active
    assert bundle is not None
    return bundle


@pytest.fixture
def redis_restored(redis_process: RedisProcess) -> Iterator[RedisProcess]:
    """The session's redis-server, running again after the test whatever happened in it."""
    try:
        yield redis_process
    finally:
        if redis_process.proc is None:
            redis_process.start()


async def test_redis_outage_degrades_fast_then_recovers_without_restart(
    toy_repo: Path, redis_url: str, redis_restored: RedisProcess
) -> None:
    user = "outage-user"
    async with running_server(
        toy_repo, "toy", redis_url=redis_url, profile_secret=TEST_SECRET, breaker_failures=3, breaker_open_s=0.5
    ) as running:
        profiles = ppb_grpc.ProfilesStub(running.channel)
        target = bundle_of(running).item_ids[7]
        recorded = await profiles.RecordEvents(ppb.RecordEventsRequest(events=[click(user, target, "e-1")]), timeout=5)
        assert recorded.accepted == 1
        asked = request(user, k=5)
        asked.include_seen_items = True  # the clicked item itself comes first: the event reached the profile
        reply = await running.stub.Recommend(asked, timeout=5)
        assert reply.strategy == pb.STRATEGY_PERSONALIZED and reply.items[0].item_id == target
        assert breaker_gauge() == 0

        before = {reason: degraded(reason) for reason in ("error", "timeout", "circuit_open")}
        redis_restored.stop()
        # Every answer during the outage is a non-personalized one, never an error.
        replies = [await running.stub.Recommend(request(user, k=5), timeout=5) for _ in range(30)]
        replies += await asyncio.gather(*(running.stub.Recommend(request(user, k=5), timeout=5) for _ in range(40)))
        assert {r.strategy for r in replies} == {pb.STRATEGY_DEGRADED}
        assert all(len(r.items) == 5 for r in replies)
        delta = {reason: degraded(reason) - before[reason] for reason in before}
        assert sum(delta.values()) == len(replies)  # each degraded answer counted once, with its reason
        assert delta["error"] + delta["timeout"] >= 3  # the failures that opened the breaker...
        assert delta["circuit_open"] >= len(replies) / 2  # ...after which most requests skip Redis entirely
        assert breaker_gauge() == BreakerState.OPEN

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await profiles.RecordEvents(ppb.RecordEventsRequest(events=[click(user, target, "e-2")]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        redis_restored.start()  # same port, empty: profiles do not survive (no persistence)
        answers: list[pb.RecommendResponse] = []

        async def not_degraded() -> bool:
            answers.append(await running.stub.Recommend(request(user, k=5), timeout=5))
            return answers[-1].strategy != pb.STRATEGY_DEGRADED

        await wait_until_async(not_degraded, "the server to go back to the restarted Redis", timeout_s=10)
        assert answers[-1].strategy == pb.STRATEGY_COLD_START
        assert breaker_gauge() == BreakerState.CLOSED

        recorded = await profiles.RecordEvents(ppb.RecordEventsRequest(events=[click(user, target, "e-3")]), timeout=5)
        assert recorded.accepted == 1
        asked = request(user, k=5)
        asked.include_seen_items = True  # the clicked item itself comes first: the event reached the profile
        reply = await running.stub.Recommend(asked, timeout=5)
        assert reply.strategy == pb.STRATEGY_PERSONALIZED and reply.items[0].item_id == target
        assert breaker_gauge() == BreakerState.CLOSED


# ---------------------------------------------------------------------------------------------------------------
# Cancelled commands must not hand their replies to the next caller (redis-py issues 2624 / 2665)
# ---------------------------------------------------------------------------------------------------------------


async def test_cancelled_reads_never_hand_their_reply_to_another_caller(redis_url: str) -> None:
    """Thousands of reads, most cut short by tiny timeouts, on a pool of 8 connections: every read that completes
    returns its own user's profile. A connection whose command was cancelled after it went out still has the
    reply on its way; reused as it is, the next caller would read that reply instead of its own."""
    secret = b"cancellation-test-secret-0123456789"
    options = RedisStoreOptions(url=redis_url, max_connections=8, read_timeout_s=2.0)
    store = RedisProfileStore(options, Pseudonymizer(secret))
    raw = redis.Redis.from_url(redis_url)
    users = [f"user-{u:03d}" for u in range(300)]
    try:
        await store.put_many({u: Profile(recent_items=(f"marker-{u}",), updated_at=1.0) for u in users})
        assert await store.get(users[0]) is not None  # loads the read script, so every read below is one EVALSHA
        raw.config_resetstat()
        rng = random.Random(2624)
        cancelled = completed = 0
        wrong: list[tuple[str, Profile | None]] = []
        errors: list[BaseException] = []

        async def get(user: str, limit_s: float | None) -> None:
            nonlocal cancelled, completed
            try:
                got = await (store.get(user) if limit_s is None else asyncio.wait_for(store.get(user), limit_s))
            except TimeoutError:
                cancelled += 1
                return
            except Exception as exc:
                errors.append(exc)
                return
            completed += 1
            if got is None or got.recent_items != (f"marker-{user}",):
                wrong.append((user, got))

        # As many reads at a time as the pool has connections: more would be cancelled waiting for one.
        for _ in range(400):
            limits = [None if rng.random() < 0.3 else rng.uniform(0.0001, 0.002) for _ in range(8)]
            await asyncio.gather(*(get(rng.choice(users), limit) for limit in limits))
        executed = int(raw.info("commandstats")["cmdstat_evalsha"]["calls"])
        assert not wrong, f"{len(wrong)} reads returned another user's profile, e.g. {wrong[:3]}"
        assert not errors, f"{len(errors)} reads failed, e.g. {errors[:3]!r}"
        assert completed >= 1000
        assert cancelled >= 100, f"only {cancelled} of 3200 reads were cancelled: the test proves nothing"
        # Reads Redis ran whose caller never took the reply: cancelled after the command went out.
        assert executed - completed >= 30, f"only {executed - completed} reads were cancelled in flight"

        # Afterwards every connection of the pool answers for the right user.
        for user in users:
            got = await store.get(user)
            assert got is not None and got.recent_items == (f"marker-{user}",)
    finally:
        raw.close()
        await store.close()


class CompletionCountingStore(RedisProfileStore):
    """The Redis store, counting the reads that returned a profile to their caller."""

    completed = 0

    async def get(self, user_id: str) -> Profile | None:
        profile = await super().get(user_id)
        self.completed += 1
        return profile


async def test_recommend_calls_cut_by_deadlines_leave_every_user_their_own_profile(
    toy_repo: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Recommend calls whose deadlines pass while their profile read is out on the wire, then plain calls:
    every user still gets the items of their own profile (each user's vector is one item's embedding)."""
    options = RedisStoreOptions(url=redis_url, max_connections=8, read_timeout_s=2.0)
    store = CompletionCountingStore(options, Pseudonymizer(TEST_SECRET.encode()))
    raw = redis.Redis.from_url(redis_url)
    async with running_server(
        toy_repo,
        "toy",
        store=store,
        redis_url=redis_url,
        profile_secret=TEST_SECRET,
        profile_budget_ms=2000,  # only the callers' deadlines cut reads short here
        breaker_failures=10_000,
        compute_threads=8,  # the 4 concurrent calls never queue, so none is refused at arrival: all reach Redis
    ) as running:
        bundle = bundle_of(running)
        rows = {f"deadline-user-{u:02d}": 9 * u + 4 for u in range(40)}
        space = bundle.manifest.embedding_space
        await store.put_many(
            {u: Profile(user_vector=bundle.item_embeddings[r].copy(), embedding_space=space) for u, r in rows.items()}
        )
        users = list(rows)
        assert await store.get(users[0]) is not None  # loads the read script: one EVALSHA per read from here on
        raw.config_resetstat()
        store.completed = 0
        rng = random.Random(2665)
        codes: dict[grpc.StatusCode, int] = {}

        async def hurried(user: str) -> None:
            try:
                await running.stub.Recommend(request(user, k=3), timeout=rng.uniform(0.001, 0.003))
                codes[grpc.StatusCode.OK] = codes.get(grpc.StatusCode.OK, 0) + 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code()] = codes.get(exc.code(), 0) + 1

        def cut_in_flight() -> int:
            """Reads Redis ran whose caller never took the reply: cancelled after the command went out."""
            return int(raw.info("commandstats")["cmdstat_evalsha"]["calls"]) - store.completed

        # A few calls at a time (with many in flight, every deadline passes before the server reads anything),
        # until enough reads were cut in flight or a bounded number of calls was made.
        calls = 0
        while calls < 2000 or (cut_in_flight() < 20 and calls < 8000):
            for _ in range(100):
                await asyncio.gather(*(hurried(rng.choice(users)) for _ in range(4)))
            calls += 400
        in_flight = cut_in_flight()
        raw.close()
        # grpc reports a few deadline-cut calls as CANCELLED rather than DEADLINE_EXCEEDED; the gate refuses some at
        # arrival (RESOURCE_EXHAUSTED) when the calls ahead would outlast their deadline; anything else is wrong.
        expected = {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
        expected.add(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert set(codes) <= expected, codes
        for user, row in rows.items():
            reply = await running.stub.Recommend(request(user, k=3), timeout=5)
            assert reply.strategy == pb.STRATEGY_PERSONALIZED, user
            assert reply.items[0].item_id == bundle.item_ids[row], f"{user} got another user's recommendations"
        # No call whose deadline passed was aborted again after grpc ended it (grpcio logs each such abort as an
        # ExecuteBatchError traceback: a log full of them under overload, for calls the client already dropped).
        assert not [r for r in caplog.records if "ExecuteBatchError" in r.getMessage()]
        # Last, as it counts on cut reads' replies never being read: that the storm did cut reads in flight.
        assert in_flight >= 20, f"only {in_flight} of {calls} reads were cut in flight ({codes})"


# ---------------------------------------------------------------------------------------------------------------
# A slow Redis
# ---------------------------------------------------------------------------------------------------------------


async def test_redis_slower_than_the_budget_degrades_with_reason_timeout(toy_repo: Path, redis_url: str) -> None:
    user = "slow-redis-user"
    async with running_server(
        toy_repo, "toy", redis_url=redis_url, profile_secret=TEST_SECRET, profile_budget_ms=50, breaker_failures=5
    ) as running:
        bundle = bundle_of(running)
        vector = np.asarray(bundle.item_embeddings[21], dtype=np.float32)
        await running.app.store.put(user, Profile(user_vector=vector, embedding_space=bundle.manifest.embedding_space))
        reply = await running.stub.Recommend(request(user, k=5), timeout=5)
        assert reply.strategy == pb.STRATEGY_PERSONALIZED
        before = degraded("timeout")

        def block_redis() -> None:
            blocker = redis.Redis.from_url(redis_url)
            try:
                blocker.execute_command("DEBUG", "SLEEP", "0.5")  # type: ignore[no-untyped-call]
            finally:
                blocker.close()

        sleeper = threading.Thread(target=block_redis, daemon=True)
        sleeper.start()
        try:
            # Bounded by the sleep: any Recommend sent while Redis sleeps runs out of its budget.
            while sleeper.is_alive():
                reply = await running.stub.Recommend(request(user, k=5), timeout=5)
                if reply.strategy == pb.STRATEGY_DEGRADED:
                    break
        finally:
            await asyncio.to_thread(sleeper.join, 10)
        assert reply.strategy == pb.STRATEGY_DEGRADED and len(reply.items) == 5
        assert degraded("timeout") - before >= 1

        reply = await running.stub.Recommend(request(user, k=5), timeout=5)
        assert reply.strategy == pb.STRATEGY_PERSONALIZED and reply.items[0].item_id == bundle.item_ids[21]


async def test_breaker_call_counts_store_failures_refuses_while_open_and_frees_the_probe_on_other_errors() -> None:
    from hyperrec.core.breaker import CircuitOpen
    from hyperrec.core.errors import ProfileStoreError

    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, open_s=1.0, clock=lambda: now[0], failures=(ProfileStoreError,))
    made: list[str] = []

    async def failing() -> str:
        made.append("failing")
        raise ProfileStoreError("down")

    async def buggy() -> str:
        made.append("buggy")
        raise KeyError("a bug, not the store")

    async def fine() -> str:
        made.append("fine")
        return "answer"

    for _ in range(2):
        with pytest.raises(ProfileStoreError):
            await breaker.call(failing)
    assert state(breaker) == BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await breaker.call(fine)
    assert made == ["failing", "failing"]  # refused calls are never made
    now[0] = 1.5
    with pytest.raises(KeyError):
        await breaker.call(buggy)  # the probe: not the store's fault, so the probe slot is freed
    assert state(breaker) == BreakerState.HALF_OPEN
    assert await breaker.call(fine) == "answer" and state(breaker) == BreakerState.CLOSED
