"""Dynamic micro-batching over real FAISS and ONNX Runtime: a batch answers exactly what each call would alone;
calls coalesce while the compute thread is busy; a lone call never waits; batch limits, bundles, deadlines and
ranking cut-offs hold per call."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hyperrec.core.batching import BatchSettings, MicroBatcher
from hyperrec.core.bundle import Bundle, publish_bundle
from hyperrec.core.compute import Cutoffs, Ranked, Work, rank_batch, rank_candidates
from hyperrec.core.domain import Context, DeviceType, RecommendRequest
from hyperrec.core.errors import DeadlineExceeded
from hyperrec.core.features import default_feature_spec
from hyperrec.core.profile import Profile
from hyperrec.index import IndexParams
from hyperrec.v1 import recommender_pb2 as pb
from tests.helpers import make_contents, make_ranker_onnx, publish_toy, sample, wait_until_async
from tests.serving import request, running_server

DIM = 8
NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)


def _bundle(repo: Path, seed: int, index: IndexParams | None = None) -> Bundle:
    """A ranker with a context term, so ranked scores differ from retrieval scores and depend on the context."""
    spec = default_feature_spec(DIM)
    ranker = make_ranker_onnx(DIM, spec.context_dim, np.linspace(-1, 1, spec.context_dim).astype(np.float32))
    contents = make_contents(n_items=2000, dim=DIM, seed=seed, spec=spec, ranker=ranker, index_params=index)
    return Bundle.load(publish_bundle(repo, contents))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return _bundle(tmp_path_factory.mktemp("batch-ivf"), 1, IndexParams("ivf", nlist=32, nprobe=4))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return _bundle(tmp_path_factory.mktemp("batch-other"), 2)


def works(bundle: Bundle, n: int, seed: int = 0) -> list[Work]:
    """Requests that differ in user vector, k, context and exclusions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        uvec = bundle.item_embeddings[int(rng.integers(bundle.index.size))] + rng.normal(0, 0.1, DIM)
        exclude = tuple(bundle.item_ids[int(r)] for r in rng.integers(0, bundle.index.size, size=i * 7))
        req = RecommendRequest(
            f"u{i}", k=int(rng.integers(1, 30)), context=Context(device=DeviceType(i % 5)), exclude=exclude
        )
        out.append(Work(uvec.astype(np.float32), req, NOW))
    return out


def answer(r: Ranked) -> list[tuple[str, float, float]]:
    return [(i.item_id, round(i.score, 4), round(i.retrieval_score, 4)) for i in r.items]


def test_a_batch_answers_exactly_what_each_call_gets_alone(bundle: Bundle) -> None:
    batch = works(bundle, 12)
    # One call with a given candidate set (a declared-interest user) rides along with the ANN ones.
    rows = np.arange(40, 140, dtype=np.int64)
    batch.append(
        Work(batch[0].uvec, RecommendRequest("pool", k=5, exclude=(bundle.item_ids[41],)), NOW, Cutoffs(), None, rows)
    )
    together = rank_batch(bundle, batch, 100)
    assert all(isinstance(r, Ranked) and r.batch_size == len(batch) for r in together)
    for work, joint in zip(batch, together, strict=True):
        assert isinstance(joint, Ranked)
        alone = rank_candidates(bundle, work.uvec, work.req, work.now, 100, Cutoffs(), None, work.candidate_rows)
        assert answer(joint) == answer(alone), work.req.user_id
        assert len(joint.items) == work.req.k
        assert not set(work.req.exclude) & {i.item_id for i in joint.items}
        assert joint.fallback is None and all(i.score != i.retrieval_score for i in joint.items)  # ranked
    assert {i.item_id for i in together[-1].items} <= {bundle.item_ids[r] for r in rows}  # type: ignore[union-attr]


def test_one_call_past_its_deadline_fails_and_the_rest_of_the_batch_is_answered(bundle: Bundle) -> None:
    batch = works(bundle, 3)
    batch[1] = Work(batch[1].uvec, batch[1].req, NOW, Cutoffs(deadline=time.monotonic() - 1))
    late = time.monotonic() - 1  # its ranking cut-off has passed: retrieval order for this one only
    batch[2] = Work(batch[2].uvec, batch[2].req, NOW, Cutoffs(rank_by=late, rank_by_deadline=True))
    first, expired, unranked = rank_batch(bundle, batch, 100)
    assert isinstance(expired, DeadlineExceeded)
    assert isinstance(first, Ranked) and first.fallback is None
    assert isinstance(unranked, Ranked) and unranked.fallback == "deadline"
    assert all(i.score == i.retrieval_score for i in unranked.items)


def test_a_stopped_batch_run_leaves_every_call_in_retrieval_order_with_its_own_reason(bundle: Bundle) -> None:
    from hyperrec.core.ranker import RankingRun

    later = time.monotonic() + 60
    batch = works(bundle, 2)
    batch[1] = Work(batch[1].uvec, batch[1].req, NOW, Cutoffs(rank_by=later, rank_by_deadline=True))
    run = RankingRun()
    run.stop()  # what the event loop does at the batch's earliest cut-off
    budget, deadline = rank_batch(bundle, batch, 100, run)
    assert isinstance(budget, Ranked) and budget.fallback == "budget"
    assert isinstance(deadline, Ranked) and deadline.fallback == "deadline"


# --- the batcher on the event loop ------------------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


def hold(pool: ThreadPoolExecutor) -> threading.Event:
    """Occupy the pool's thread until the returned event is set (a batch that takes long, for real)."""
    release = threading.Event()
    pool.submit(release.wait, 30)
    return release


def queued(batcher: MicroBatcher) -> int:
    """Calls waiting in the batcher for a compute thread. Read from its private queue: the batcher offers no view
    of it, and these tests must know the calls are waiting before they let the compute thread go."""
    return len(batcher._queue)


async def until_queued(batcher: MicroBatcher, n: int) -> None:
    await wait_until_async(lambda: queued(batcher) == n, f"{n} calls waiting in the batcher", 5, 0.005)


async def busy(
    batcher: MicroBatcher, bundle: Bundle, pool: ThreadPoolExecutor
) -> tuple[asyncio.Future[Ranked], threading.Event]:
    """The only compute thread held busy, then a first call that leaves at once (no batch is running) and queues
    behind it: calls made now wait in the batcher until the event is set and that first batch is done."""
    release = hold(pool)
    primer = asyncio.ensure_future(batcher.rank(bundle, works(bundle, 1, seed=99)[0]))
    await wait_until_async(lambda: batcher._running == 1, "the first call to leave for the compute thread", 5, 0.005)
    return primer, release


async def test_a_lone_call_on_an_idle_server_does_not_wait_for_company(
    bundle: Bundle, one_thread: ThreadPoolExecutor
) -> None:
    batcher = MicroBatcher(one_thread, BatchSettings(max_batch=16, max_wait_s=30.0, workers=1), 100)
    work = works(bundle, 1)[0]
    ranked = await asyncio.wait_for(batcher.rank(bundle, work), timeout=5)  # far below the 30 s max wait
    assert ranked.batch_size == 1


async def test_calls_arriving_while_the_compute_thread_is_busy_run_as_one_batch(
    bundle: Bundle, one_thread: ThreadPoolExecutor
) -> None:
    batcher = MicroBatcher(one_thread, BatchSettings(max_batch=16, max_wait_s=0.0, workers=1), 100)
    batch = works(bundle, 6)
    first, release = await busy(batcher, bundle, one_thread)
    rest = [asyncio.ensure_future(batcher.rank(bundle, w)) for w in batch[1:]]
    await until_queued(batcher, 5)
    assert not any(f.done() for f in rest)
    release.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=10)
    assert answers[0].batch_size == 1
    assert [a.batch_size for a in answers[1:]] == [5] * 5  # the five waiting calls went together
    for work, got in zip(batch[1:], answers[1:], strict=True):
        alone = rank_candidates(bundle, work.uvec, work.req, work.now, 100)
        assert answer(got) == answer(alone)


async def test_batches_respect_max_batch_and_never_mix_bundles(
    bundle: Bundle, other: Bundle, one_thread: ThreadPoolExecutor
) -> None:
    batcher = MicroBatcher(one_thread, BatchSettings(max_batch=4, max_wait_s=0.0, workers=1), 100)
    primer, release = await busy(batcher, bundle, one_thread)
    ours = [asyncio.ensure_future(batcher.rank(bundle, w)) for w in works(bundle, 10)]
    theirs = [asyncio.ensure_future(batcher.rank(other, w)) for w in works(other, 3, seed=5)]
    await until_queued(batcher, 13)
    release.set()
    got = await asyncio.wait_for(asyncio.gather(primer, *ours, *theirs), timeout=10)
    assert [r.batch_size for r in got[1:11]] == [4] * 8 + [2] * 2  # ten of ours: 4 + 4 + 2
    assert [r.batch_size for r in got[11:]] == [3, 3, 3]  # the other bundle's three, on their own
    assert all(i.item_id in other.item_ids for r in got[10:] for i in r.items)


async def test_a_cancelled_call_is_left_out_of_its_batch(bundle: Bundle, one_thread: ThreadPoolExecutor) -> None:
    batcher = MicroBatcher(one_thread, BatchSettings(max_batch=16, max_wait_s=0.0, workers=1), 100)
    primer, release = await busy(batcher, bundle, one_thread)
    calls = [asyncio.ensure_future(batcher.rank(bundle, w)) for w in works(bundle, 3)]
    await until_queued(batcher, 3)
    calls[1].cancel()
    release.set()
    _, first, last = await asyncio.wait_for(asyncio.gather(primer, calls[0], calls[2]), timeout=10)
    assert first.batch_size == last.batch_size == 2


def test_compressed_index_candidates_are_rescored_with_the_real_vectors(tmp_path: Path) -> None:
    """IVF-PQ returns approximate inner products; the answer's retrieval scores are the exact ones."""
    pq = _bundle(tmp_path, 3, IndexParams("ivfpq", nlist=16, nprobe=8, pq_m=4))
    assert not pq.index.exact_scores
    work = works(pq, 1)[0]
    ranked = rank_candidates(pq, work.uvec, work.req, work.now, 100)
    for item in ranked.items:
        row = pq.item_ids.row(item.item_id)
        assert row is not None
        exact = float(pq.item_embeddings[row] @ work.uvec)
        assert item.retrieval_score == pytest.approx(exact, abs=1e-5)


@pytest.mark.parametrize(("overrides", "batched"), [({}, True), ({"batch_max_size": 1}, False)], ids=["default", "off"])
async def test_the_default_server_batches_concurrent_calls_and_size_one_turns_batching_off(
    tmp_path: Path, overrides: dict[str, Any], batched: bool
) -> None:
    """Over a real channel, 48 concurrent calls to a server with one compute thread: by default they share batches
    (fewer batches than calls, at most 16 each); with batch_max_size 1 every call is computed alone."""
    publish_toy(tmp_path, model_name="toy", n_items=3000)
    async with running_server(tmp_path, "toy", compute_threads=1, **overrides) as running:
        bundle = running.app.slot.active
        assert bundle is not None
        space = bundle.manifest.embedding_space
        users = {
            f"u{i}": Profile(user_vector=bundle.item_embeddings[i].copy(), embedding_space=space) for i in range(48)
        }
        await running.app.store.put_many(users)
        calls_before, batches_before = sample("hyperrec_batch_size_sum"), sample("hyperrec_batch_size_count")
        over_16 = sample("hyperrec_batch_size_bucket", {"le": "+Inf"}) - sample(
            "hyperrec_batch_size_bucket", {"le": "16.0"}
        )
        replies = await asyncio.gather(*(running.stub.Recommend(request(u, 10), timeout=30) for u in users))
        assert all(r.strategy == pb.STRATEGY_PERSONALIZED and len(r.items) == 10 for r in replies)
        calls = sample("hyperrec_batch_size_sum") - calls_before
        batches = sample("hyperrec_batch_size_count") - batches_before
        assert calls == 48
        assert (batches < 48) if batched else (batches == 48)
        after_16 = sample("hyperrec_batch_size_bucket", {"le": "+Inf"}) - sample(
            "hyperrec_batch_size_bucket", {"le": "16.0"}
        )
        assert after_16 == over_16  # no batch above the default limit
