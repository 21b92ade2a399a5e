"""Model versions swapping under load, over a real channel: 20 clients call Recommend without pause while the
watcher picks up a new version, rejects a corrupt one and ignores a partial directory, and an operator rolls
back through the admin API. No call may fail, and every answer must come wholly from one version.

Each version's bundle is made distinguishable: its item ids carry the version ("v2-item-00042"), its embeddings
come from their own seed, and its ranker adds its own constant for desktop requests (score - retrieval_score).
So an answer that mixed one version's index or catalogue with another's ranker would show.

Latencies are recorded per phase and printed (run with -s); they are not asserted on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from hyperrec.core.bundle import EMBEDDINGS, MANIFEST, RANKER, Bundle, BundleContents, ColdStart, publish_bundle
from hyperrec.core.errors import BundleError
from hyperrec.core.features import default_feature_spec
from hyperrec.core.pipeline import fold_in
from hyperrec.core.profile import Profile
from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import admin_pb2_grpc as apb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from tests.helpers import SERVING, health_status, make_contents, make_ranker_onnx, wait_until_async
from tests.serving import Running, request, running_server

ADMIN_TOKEN = "admin-token-0123456789"
AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
MODEL = "toy"
N_ITEMS = 300
DIM = 8
K = 10
CLIENTS = 20
PERSONALIZED_USERS = CLIENTS // 2
# What each version's ranker adds to a desktop request's score: score - retrieval_score names the ranker.
CONTEXT_TERM = {1: 0.5, 2: 1.5, 3: 2.5}
WINDOW_S = 0.5  # a swap window lasts until the new version is first seen, plus this
STEADY_S = 1.5  # time spent in each steady phase
MIN_CALLS = 50  # calls each phase must at least hold (20 clients make far more)
SCORE_TOL = 1e-4

RECOMMENDER = "hyperrec.v1.Recommender"


# ---------------------------------------------------------------------------------------------------------------
# Distinguishable versions


@dataclass(frozen=True)
class Version:
    number: int
    contents: BundleContents
    row_of: dict[str, int]

    @property
    def embeddings(self) -> np.ndarray:
        return self.contents.item_embeddings

    @property
    def prefix(self) -> str:
        return f"v{self.number}-"

    def item_id(self, row: int) -> str:
        return str(self.contents.item_ids[row])


def desktop_column() -> int:
    """Position of the device=desktop entry in the default context vector."""
    offset = 0
    for block in default_feature_spec(DIM).blocks:
        if block.source == "device":
            return offset + block.vocabulary.index("desktop")
        offset += block.width
    raise AssertionError("the default feature spec has no device block")


def make_version(number: int) -> Version:
    """A bundle whose item ids, embeddings and ranker all say which version it is."""
    spec = default_feature_spec(DIM)
    weights = np.zeros(spec.context_dim, np.float32)
    weights[desktop_column()] = CONTEXT_TERM[number]
    base = make_contents(
        n_items=N_ITEMS,
        dim=DIM,
        seed=100 + number,
        model_name=MODEL,
        spec=spec,
        ranker=make_ranker_onnx(DIM, spec.context_dim, weights),
    )
    rename = {old: f"v{number}-{old}" for old in base.item_ids}

    def renamed(items: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        return tuple((rename[i], s) for i, s in items)

    cold = ColdStart(
        renamed(base.cold_start.global_items), {k: renamed(v) for k, v in base.cold_start.segments.items()}
    )
    ids = [rename[i] for i in base.item_ids]
    contents = dataclasses.replace(base, item_ids=ids, cold_start=cold)
    return Version(number, contents, {item: row for row, item in enumerate(ids)})


def corrupt_byte(path: Path) -> None:
    """Flip one byte of a data file, keeping its size: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def publish_corrupt(repo: Path, scratch: Path, contents: BundleContents, damaged: str) -> Path:
    """Publish a valid bundle in a scratch repository, damage `damaged`, then move it in as the next version.

    The damage happens before the version appears under its number, so no watcher pass can see it intact."""
    built = publish_bundle(scratch, contents)
    corrupt_byte(built / damaged)
    model_dir = repo / MODEL
    target = model_dir / str(max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1)
    os.rename(built, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Users and the answers each version owes them


def personalized_user(j: int) -> str:
    return f"fan-{j}"


def cold_user(j: int) -> str:
    return f"newcomer-{j}"


def profile_for(j: int, first: Version, all_versions: Sequence[Version]) -> Profile:
    """A stored vector in version 1's space (item `row` of version 1), and recent items named in every version,
    so fold-in keeps the user personalized after a swap (ids a bundle does not know are skipped)."""
    row, second = 7 + 29 * j, 11 + 29 * j
    recent = tuple(v.item_id(r) for r in (row, second) for v in all_versions)
    return Profile(
        user_vector=first.embeddings[row].copy(),
        embedding_space=first.contents.embedding_space,
        recent_items=recent,
    )


def served_vector(version: Version, profile: Profile) -> np.ndarray:
    """The user vector `version` must retrieve with: the stored one in its own space, else the fold-in."""
    if profile.embedding_space == version.contents.embedding_space:
        assert profile.user_vector is not None
        return np.asarray(profile.user_vector, np.float32)
    rows = np.array([[version.row_of.get(i, -1) for i in profile.recent_items]], dtype=np.int64)
    assert (rows >= 0).any()
    return np.asarray(fold_in(version.embeddings, rows)[0], np.float32)


@dataclass(frozen=True)
class Expected:
    strategy: pb.Strategy.ValueType
    ids: tuple[str, ...]
    scores: tuple[float, ...]
    retrieval: tuple[float, ...]


def expected_answers(versions: Sequence[Version], profiles: dict[str, Profile]) -> dict[tuple[str, str], Expected]:
    """(user, version) -> the answer that version alone computes, by brute force on its own files."""
    out: dict[tuple[str, str], Expected] = {}
    for version in versions:
        for user, profile in profiles.items():
            uvec = served_vector(version, profile)
            dots = version.embeddings @ uvec
            seen = set(profile.recent_items)  # left out of a personalized answer by default, as the server does
            ranked = np.where([i in seen for i in version.contents.item_ids], -np.inf, dots)
            top = np.argsort(-ranked, kind="stable")[:K]
            out[(user, str(version.number))] = Expected(
                pb.STRATEGY_PERSONALIZED,
                tuple(version.item_id(int(r)) for r in top),
                tuple(float(dots[r]) + CONTEXT_TERM[version.number] for r in top),
                tuple(float(dots[r]) for r in top),
            )
        popular = version.contents.cold_start.global_items[:K]
        for j in range(CLIENTS - PERSONALIZED_USERS):
            out[(cold_user(j), str(version.number))] = Expected(
                pb.STRATEGY_COLD_START,
                tuple(i for i, _ in popular),
                tuple(s for _, s in popular),
                (0.0,) * len(popular),
            )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Clients


@dataclass(frozen=True)
class Call:
    user: str
    started: float
    ended: float
    code: grpc.StatusCode
    details: str = ""
    version: str = ""
    strategy: pb.Strategy.ValueType = pb.STRATEGY_UNSPECIFIED
    items: tuple[tuple[str, float, float], ...] = ()

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1e3


@dataclass
class Load:
    """Clients calling Recommend in a loop until `stop`, and a health prober."""

    stub: Any
    channel: grpc.aio.Channel  # for the health prober
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    calls: list[Call] = dataclasses.field(default_factory=list)
    health_checks: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    first_seen: dict[str, float] = dataclasses.field(default_factory=dict)  # version -> end of its first answer

    async def client(self, user: str) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                reply = await self.stub.Recommend(request(user, k=K, device_type=pb.DEVICE_TYPE_DESKTOP), timeout=10)
            except grpc.aio.AioRpcError as exc:
                self.calls.append(Call(user, started, time.perf_counter(), exc.code(), exc.details() or ""))
                await asyncio.sleep(0.01)  # a failure is recorded; keep going without spinning
                continue
            ended = time.perf_counter()
            items = tuple((i.item_id, i.score, i.retrieval_score) for i in reply.items)
            self.calls.append(
                Call(user, started, ended, grpc.StatusCode.OK, "", reply.model_version, reply.strategy, items)
            )
            self.first_seen.setdefault(reply.model_version, ended)

    async def prober(self) -> None:
        while not self.stop.is_set():
            try:
                status = await health_status(self.channel, RECOMMENDER)
                outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.aio.AioRpcError as exc:
                outcome = f"rpc {exc.code().name}"
            self.health_checks.append((time.perf_counter(), outcome))
            await asyncio.sleep(0.05)

    def enough_since(self, t: float, clients: int) -> bool:
        """At least MIN_CALLS calls, from every client, started at `t` or later."""
        recent = [c for c in self.calls if c.started >= t]
        return len(recent) >= MIN_CALLS and len({c.user for c in recent}) >= clients

    async def run_for(self, seconds: float, since: float, limit_s: float = 20.0) -> float:
        """Let the clients run `seconds`, then on until every client made calls since `since` and there were at
        least MIN_CALLS of them (a bounded wait, so a slow machine still gets busy phases); returns the time."""
        await asyncio.sleep(seconds)
        deadline = time.perf_counter() + limit_s
        while True:
            now = time.perf_counter()
            if self.enough_since(since, CLIENTS) or now > deadline:
                return now
            await asyncio.sleep(0.02)


async def stop_all(load: Load, tasks: Sequence[asyncio.Task[None]]) -> None:
    load.stop.set()
    _, pending = await asyncio.wait(tasks, timeout=15)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def admin_stub(running: Running) -> Any:  # the generated stub's types describe the sync API; this one is grpc.aio's
    return apb_grpc.ModelAdminStub(running.channel)


async def model_status(running: Running) -> apb.ModelStatus:
    reply = await admin_stub(running).ListModels(apb.ListModelsRequest(), metadata=AUTH, timeout=5)
    model: apb.ModelStatus = reply.models[0]
    return model


async def wait_for_status(
    running: Running, done: Callable[[apb.ModelStatus], bool], timeout_s: float = 15.0
) -> apb.ModelStatus:
    """Poll ListModels until `done(status)` holds; returns that status."""
    seen: list[apb.ModelStatus] = []

    async def reached() -> bool:
        seen.append(await model_status(running))
        return done(seen[-1])

    await wait_until_async(reached, lambda: f"the model status to change; last seen {seen[-1]}", timeout_s)
    return seen[-1]


# ---------------------------------------------------------------------------------------------------------------
# Checking the answers


def answer_problems(call: Call, expected: dict[tuple[str, str], Expected], prefixes: dict[str, str]) -> list[str]:
    """Everything wrong with one answer, judged against the version it says served it."""
    where = f"{call.user} on version {call.version!r}"
    if call.version not in prefixes:
        return [f"{where}: served by a version that must never serve"]
    prefix = prefixes[call.version]
    problems = [f"{where}: item {i!r} is not this version's" for i, _, _ in call.items if not i.startswith(prefix)]
    want = expected[(call.user, call.version)]
    if call.strategy != want.strategy:
        got, wanted = pb.Strategy.Name(call.strategy), pb.Strategy.Name(want.strategy)
        problems.append(f"{where}: strategy {got}, expected {wanted}")
    ids = tuple(i for i, _, _ in call.items)
    if ids != want.ids:
        problems.append(f"{where}: items {ids} differ from the version's own answer {want.ids}")
        return problems
    scores = np.array([s for _, s, _ in call.items])
    retrieval = np.array([r for _, _, r in call.items])
    if not np.allclose(scores, want.scores, atol=SCORE_TOL, rtol=0):
        problems.append(f"{where}: scores {scores.tolist()} differ from the version's ranker {want.scores}")
    if not np.allclose(retrieval, want.retrieval, atol=SCORE_TOL, rtol=0):
        problems.append(f"{where}: retrieval scores {retrieval.tolist()} differ from the version's index")
    if want.strategy == pb.STRATEGY_PERSONALIZED:
        term = CONTEXT_TERM[int(call.version)]
        if not np.allclose(scores - retrieval, term, atol=SCORE_TOL, rtol=0):
            problems.append(f"{where}: score - retrieval_score is {(scores - retrieval).tolist()}, not {term}")
    return problems


def percentiles(latencies: Sequence[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def print_latency(phases: Sequence[tuple[str, float, float]], calls: Sequence[Call]) -> dict[str, list[Call]]:
    by_phase: dict[str, list[Call]] = {}
    print(f"\nRecommend latency under {CLIENTS} concurrent clients (client-side, ms):")
    for name, start, end in phases:
        inside = [c for c in calls if start <= c.started < end]
        by_phase[name] = inside
        if inside:
            p50, p99 = percentiles([c.latency_ms for c in inside])
            span = (min(end, max(c.started for c in inside)) - start) * 1e3
            print(f"  {name:<26} {len(inside):>6} calls over {span:>6.0f} ms   p50 {p50:6.2f}   p99 {p99:6.2f}")
        else:
            print(f"  {name:<26}      0 calls")
    return by_phase


# ---------------------------------------------------------------------------------------------------------------
# The tests


async def test_versions_swap_reject_and_roll_back_under_load_without_a_failed_or_mixed_answer(
    tmp_path: Path,
) -> None:
    repo, scratch = tmp_path / "repo", tmp_path / "scratch"
    versions = [make_version(n) for n in (1, 2, 3)]
    v1, v2, v3 = versions
    publish_bundle(repo, v1.contents)
    profiles = {personalized_user(j): profile_for(j, v1, versions) for j in range(PERSONALIZED_USERS)}
    expected = expected_answers(versions, profiles)
    prefixes = {"1": v1.prefix, "2": v2.prefix}  # the only versions that may ever answer

    # running_server pins admission (min_in_flight = max_in_flight): this test counts what a swap does to answers;
    # the adaptive limit could otherwise shed some of the 20 clients' calls as load (RESOURCE_EXHAUSTED), which
    # tests/test_hardening.py covers. docs/model-repo.md says how an operator keeps swaps refusal-free too.
    async with running_server(repo, MODEL, admin_token=ADMIN_TOKEN, watch_interval_s=0.2) as running:
        running.app.start_watcher()
        await running.app.store.put_many(profiles)
        admin = admin_stub(running)
        load = Load(running.stub, running.channel)
        users = [personalized_user(j) for j in range(PERSONALIZED_USERS)]
        users += [cold_user(j) for j in range(CLIENTS - PERSONALIZED_USERS)]
        tasks = [asyncio.create_task(load.client(user)) for user in users]
        tasks.append(asyncio.create_task(load.prober()))
        try:
            t_begin = time.perf_counter()
            await load.run_for(STEADY_S, t_begin)

            # (1) A new version appears; the watcher loads, warms and swaps it in.
            t_publish = time.perf_counter()
            await asyncio.to_thread(publish_bundle, repo, v2.contents)
            await wait_until_async(lambda: "2" in load.first_seen, "an answer from version 2", interval_s=0.01)
            t_v2_seen = load.first_seen["2"]
            swapped = await wait_for_status(running, lambda m: m.active_version == 2)
            assert swapped.pinned_version == 0
            # The swap window: from the publish until version 2 was first seen plus WINDOW_S.
            t_swap_end = await load.run_for(max(0.0, t_v2_seen + WINDOW_S - time.perf_counter()), t_publish)
            await load.run_for(STEADY_S, t_swap_end)

            # (2) A corrupt version (one byte of its embeddings flipped) and a partial directory (no manifest).
            t_bad = time.perf_counter()
            bad = await asyncio.to_thread(publish_corrupt, repo, scratch, v3.contents, EMBEDDINGS)
            assert bad.name == "3"
            partial = repo / MODEL / "4"
            partial.mkdir()
            (partial / "item_ids.json").write_text(f'["{v3.item_id(0)}"]')
            await wait_for_status(running, lambda m: {3, 4} <= {v.version for v in m.versions})
            await load.run_for(STEADY_S, t_bad)  # more watcher passes: neither may be retried into service
            model = await model_status(running)
            states = {v.version: v for v in model.versions}
            assert model.active_version == 2 and list(model.available_versions) == [1, 2, 3, 4]
            assert states[3].state == apb.VERSION_STATE_FAILED
            assert EMBEDDINGS in states[3].reason and "checksum" in states[3].reason
            assert states[4].state == apb.VERSION_STATE_FAILED and MANIFEST in states[4].reason
            assert await health_status(running.channel, RECOMMENDER) == SERVING

            # (3) The operator rolls back to version 1 through the admin API.
            t_rollback = time.perf_counter()
            rolled = await admin.Rollback(apb.RollbackRequest(model=MODEL), metadata=AUTH, timeout=10)
            t_rolled = time.perf_counter()
            assert rolled.model.active_version == 1 and rolled.model.pinned_version == 1
            t_rollback_end = await load.run_for(WINDOW_S, t_rollback)
            await load.run_for(STEADY_S, t_rollback_end)
            final = await model_status(running)
        finally:
            await stop_all(load, tasks)
        t_end = time.perf_counter()

    calls = list(load.calls)
    phases = [
        ("v1, before the swap", t_begin, t_publish),
        ("swap window (publish v2)", t_publish, t_swap_end),
        ("v2, after the swap", t_swap_end, t_bad),
        ("corrupt + partial versions", t_bad, t_rollback),
        ("rollback window", t_rollback, t_rollback_end),
        ("v1, after the rollback", t_rollback_end, t_end),
    ]
    by_phase = print_latency(phases, calls)

    failed = [c for c in calls if c.code != grpc.StatusCode.OK]
    assert not failed, f"{len(failed)} of {len(calls)} calls failed, e.g. {[(c.code, c.details) for c in failed[:5]]}"
    for name, inside in by_phase.items():
        assert len(inside) >= MIN_CALLS, f"only {len(inside)} calls during {name!r}"
        assert {c.user for c in inside} == set(users), f"not every client called during {name!r}"

    problems = [p for c in calls for p in answer_problems(c, expected, prefixes)]
    assert not problems, f"{len(problems)} inconsistent answers, e.g. {problems[:5]}"

    # Which version answered when: 1 until the publish; 2 from its first answer until the rollback; 1 after it.
    def versions_started(start: float, end: float) -> set[str]:
        return {c.version for c in calls if start <= c.started < end}

    assert versions_started(t_begin, t_publish) == {"1"}
    assert versions_started(t_publish, t_rollback) == {"1", "2"}
    assert versions_started(t_v2_seen, t_rollback) == {"2"}  # once one answer came from 2, no later call saw 1
    assert versions_started(t_bad, t_rollback) == {"2"}  # the rejected versions never served; 2 kept serving
    assert versions_started(t_rolled, t_end) == {"1"}

    assert load.health_checks and {s for _, s in load.health_checks} == {"SERVING"}
    assert final.active_version == 1 and final.pinned_version == 1
    final_states = {v.version: v.state for v in final.versions}
    assert final_states == {
        1: apb.VERSION_STATE_ACTIVE,
        2: apb.VERSION_STATE_READY,
        3: apb.VERSION_STATE_FAILED,
        4: apb.VERSION_STATE_FAILED,
    }


async def test_loading_a_corrupt_version_reports_it_failed_and_keeps_the_active_one(tmp_path: Path) -> None:
    repo, scratch = tmp_path / "repo", tmp_path / "scratch"
    v1, v2 = make_version(1), make_version(2)
    publish_bundle(repo, v1.contents)
    async with running_server(repo, MODEL, admin_token=ADMIN_TOKEN) as running:
        admin = admin_stub(running)
        bad = publish_corrupt(repo, scratch, v2.contents, RANKER)
        assert bad.name == "2"
        for _ in range(2):  # asking again tries again, and fails the same way
            reply = await admin.LoadVersion(apb.LoadVersionRequest(model=MODEL, version=2), metadata=AUTH, timeout=10)
            assert reply.status.version == 2 and reply.status.state == apb.VERSION_STATE_FAILED
            assert RANKER in reply.status.reason and "checksum" in reply.status.reason
        model = await model_status(running)
        assert model.active_version == 1 and model.pinned_version == 0
        assert {v.version: v.state for v in model.versions} == {
            1: apb.VERSION_STATE_ACTIVE,
            2: apb.VERSION_STATE_FAILED,
        }
        assert await running.app.manager.reconcile() == 1  # the watcher's pass does not serve it either
        answer = await running.stub.Recommend(request("someone", k=K, device_type=pb.DEVICE_TYPE_DESKTOP), timeout=5)
        assert answer.model_version == "1" and all(i.item_id.startswith(v1.prefix) for i in answer.items)
        assert await health_status(running.channel, RECOMMENDER) == SERVING


@pytest.mark.parametrize("damaged", [EMBEDDINGS, RANKER])
def test_a_flipped_byte_is_caught_by_the_checksum_alone(tmp_path: Path, damaged: str) -> None:
    """The fixture's corruption keeps the file's size and format: only the manifest's SHA-256 can catch it."""
    built = publish_bundle(tmp_path, make_version(1).contents)
    size = (built / damaged).stat().st_size
    corrupt_byte(built / damaged)
    assert (built / damaged).stat().st_size == size
    with pytest.raises(BundleError) as err:
        Bundle.load(built)
    assert err.value.file == damaged and "checksum" in str(err.value)
