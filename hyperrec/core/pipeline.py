"""The protocol-neutral recommendation pipeline.

profile → user vector → ANN candidates → context features → ONNX ranking → top k.
The gRPC servicer (and any in-process caller) calls `RecommendPipeline.recommend`.
Each request reads the active bundle reference once, so it never mixes the
index of one model version with the ranker of another.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np

from hyperrec.core import metrics, tracing
from hyperrec.core.batching import BatchSettings, MicroBatcher
from hyperrec.core.breaker import CircuitBreaker
from hyperrec.core.budget import BudgetMissed, MissCause, within_budget
from hyperrec.core.bundle import Bundle
from hyperrec.core.cache import CACHED_STRATEGIES, CacheSettings, TopNCache, cache_key
from hyperrec.core.compute import Cutoffs, Ranked, Work, rank_candidates
from hyperrec.core.domain import (
    Recommendation,
    RecommendRequest,
    RequestLimits,
    ScoredItem,
    StageTimings,
    Strategy,
    validate_request,
)
from hyperrec.core.errors import DeadlineExceeded, ProfileStoreError, ProfileStoreTimeout, Unavailable
from hyperrec.core.features import assign_segments, daypart
from hyperrec.core.profile import Profile
from hyperrec.core.profile_store import ProfileStore

log = logging.getLogger(__name__)

FOLD_IN_DECAY = 0.9
# Time kept, before the caller's deadline, to encode and send the answer: ranking must end before it.
REPLY_MARGIN_S = 0.002
# What a circuit breaker's `call` counts against the profile store (the Profiles RPCs). Recommend's reads judge
# budget misses and store timeouts by the event loop's lateness first (`_profile`, hyperrec/core/budget.py).
STORE_FAILURES: tuple[type[Exception], ...] = (
    ProfileStoreError,
    TimeoutError,
)  # weight of the i-th most recent item is 0.9**i


@dataclass(frozen=True)
class PipelineOptions:
    """Per-request knobs of the pipeline."""

    candidates: int = 500
    limits: RequestLimits = field(default_factory=RequestLimits)
    profile_budget_s: float = 0.05
    interest_events: int = 5
    ranking_budget_s: float = 0.1
    batching: BatchSettings = field(default_factory=BatchSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)


def canary_bucket(user_id: str) -> float:
    """A user's fixed place in [0, 100): users below the canary percentage get the canary version."""
    return (zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % 10_000) / 100.0


class BundleSlot:
    """Holds the active bundle and an optional canary. Each change replaces a single reference (a tuple), so a
    reader always sees one consistent routing."""

    def __init__(self) -> None:
        self._routes: tuple[Bundle | None, Bundle | None, float] = (None, None, 0.0)

    @property
    def active(self) -> Bundle | None:
        return self._routes[0]

    def swap(self, bundle: Bundle) -> Bundle | None:
        previous, canary, share = self._routes
        if canary is bundle:  # promoted: no longer a canary
            canary, share = None, 0.0
        self._routes = (bundle, canary, share)
        return previous

    def set_canary(self, bundle: Bundle | None, percent: float) -> None:
        """Route `percent` of users (by a fixed hash of their id) to `bundle`; None or 0 routes nobody."""
        self._routes = (self._routes[0], bundle, percent if bundle is not None else 0.0)

    def for_user(self, user_id: str) -> Bundle | None:
        """The bundle that answers this user: the canary for a fixed share of users, else the active one."""
        active, canary, share = self._routes
        if canary is not None and share > 0 and canary_bucket(user_id) < share:
            return canary
        return active


def fold_in(
    item_vectors: np.ndarray,
    histories: np.ndarray,
    decay: float = FOLD_IN_DECAY,
    engagement: np.ndarray | None = None,
) -> np.ndarray:
    """User vectors from item histories [users, L] of rows, newest first, -1 where the item is unknown or absent.

    The i-th entry weighs decay**i, times its engagement weight when `engagement` [users, L] is given (unknown
    entries keep their position but add nothing); the result is the weighted average. The server folds
    profiles in with it, the event ingest refolds live profiles with it, and the trainers fold in training
    histories with it.
    """
    weights = (decay ** np.arange(histories.shape[1], dtype=np.float32))[None, :] * (histories >= 0)
    if engagement is not None:
        weights = weights * engagement
    vectors = item_vectors[np.clip(histories, 0, None)]
    total = np.maximum(weights.sum(axis=1, keepdims=True), 1e-6)
    return np.asarray((weights[:, :, None] * vectors).sum(axis=1) / total, dtype=np.float32)


def history_vector(bundle: Bundle, profile: Profile) -> np.ndarray | None:
    """The profile's stored vector when it lives in the bundle's embedding space,
    else a fold-in (decayed, engagement-weighted average) of the recent items the bundle knows, else None."""
    dim = bundle.feature_spec.embedding_dim
    vec = profile.user_vector
    if (
        vec is not None
        and profile.embedding_space == bundle.manifest.embedding_space
        and vec.shape == (dim,)
        and np.isfinite(vec).all()
    ):
        return np.asarray(vec, dtype=np.float32)
    return fold_recent(bundle, profile)


def fold_recent(bundle: Bundle, profile: Profile) -> np.ndarray | None:
    """Fold-in of the profile's recent distinct items that the bundle knows, else None.

    An item seen several times counts once, at its newest position and with its newest event's engagement
    weight: the history the trainers fold (`hyperrec.training.history_model`), so serving matches training.
    """
    seen: set[str] = set()
    items, engagement = [], []
    for item, weight in zip(profile.recent_items, profile.weights_of_recent(), strict=True):
        if item not in seen:
            seen.add(item)
            items.append(item)
            engagement.append(weight)
    rows = bundle.item_ids.rows(items)
    if not (rows >= 0).any():
        return None
    weights = np.asarray(engagement, dtype=np.float32)[None, :]
    folded: np.ndarray = fold_in(bundle.item_embeddings, rows[None, :], engagement=weights)[0]
    return folded


def user_vector(
    bundle: Bundle, profile: Profile | None, interest_events: int = 5
) -> tuple[np.ndarray | None, Strategy]:
    """The vector to retrieve with, and the strategy it stands for.

    History (stored vector or fold-in) makes the answer PERSONALIZED. Declared interests (the mean of the
    declared categories' centroids) stand in for a user without usable history (INTERESTS) and are blended
    in, with a weight falling linearly to zero, until the profile holds `interest_events` items the bundle knows.
    """
    if profile is None:
        return None, Strategy.COLD_START
    history = history_vector(bundle, profile)
    interests = None
    if profile.interests and bundle.categories is not None:
        interests = bundle.categories.centroid_of(profile.interests)
    if interests is None:
        return history, Strategy.PERSONALIZED if history is not None else Strategy.COLD_START
    if history is None:
        return interests, Strategy.INTERESTS
    known = int((bundle.item_ids.rows(profile.recent_items) >= 0).sum())
    share = max(0.0, 1.0 - known / max(interest_events, 1))
    return np.asarray(share * interests + (1.0 - share) * history, dtype=np.float32), Strategy.PERSONALIZED


def cold_start_items(bundle: Bundle, req: RecommendRequest, now: datetime) -> tuple[ScoredItem, ...]:
    """Popular items for the request's device and daypart, minus exclusions.

    When the popularity lists run out, the rest of the catalogue follows in bundle order (score 0), so k
    items come back whenever the catalogue minus the exclusions has k.
    """
    excluded = set(req.exclude)
    local = req.context.local_time(now)
    out: list[ScoredItem] = []
    seen: set[str] = set()
    for item_id, share in bundle.cold_start.candidates(req.context.device.name.lower(), daypart(local)):
        if item_id in excluded:
            continue
        out.append(ScoredItem(item_id, share, 0.0))
        seen.add(item_id)
        if len(out) == req.k:
            return tuple(out)
    for item_id in bundle.item_ids:
        if item_id not in excluded and item_id not in seen:
            out.append(ScoredItem(item_id, 0.0, 0.0))
            if len(out) == req.k:
                break
    return tuple(out)


def segment_candidates(bundle: Bundle, uvec: np.ndarray, req: RecommendRequest) -> np.ndarray | None:
    """Rows of the popular items of the behavioural segment nearest `uvec` (a user's declared interests), or None
    when the bundle has no such list or it cannot fill k after the exclusions (then retrieval runs as usual)."""
    if bundle.segments is None:
        return None
    segment = int(assign_segments(bundle.segments, uvec[None, :])[0])
    excluded = set(req.exclude)
    rows = bundle.item_ids.rows(item for item, _ in bundle.cold_start.for_segment(segment) if item not in excluded)
    return rows if len(rows) >= req.k else None


def record_stage_spans(ranked: Ranked) -> None:
    """The retrieval and ranking spans, from the times measured on the compute thread."""
    if not tracing.enabled():
        return
    retrieved_ns = ranked.started_ns + int(ranked.retrieval_ms * 1e6)
    tracing.record_span("retrieval", ranked.started_ns, retrieved_ns)
    ranking = {"hyperrec.fallback": ranked.fallback} if ranked.fallback else None
    tracing.record_span("ranking", retrieved_ns, retrieved_ns + int(ranked.ranking_ms * 1e6), ranking)


class RecommendPipeline:
    """The pipeline. Construction does no I/O; it needs a store, a bundle slot and an executor."""

    def __init__(
        self,
        store: ProfileStore,
        slot: BundleSlot,
        options: PipelineOptions,
        executor: Executor,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._store = store
        self._slot = slot
        self._options = options
        self._executor = executor
        self._breaker = breaker or CircuitBreaker(failures=STORE_FAILURES)
        self._batcher = MicroBatcher(executor, options.batching, options.candidates)
        self.cache = TopNCache(options.cache)
        self.recent_requests: deque[RecommendRequest] = deque(maxlen=64)  # shapes for warming up new versions

    @property
    def options(self) -> PipelineOptions:
        return self._options

    async def _profile(self, user_id: str) -> tuple[Profile | None, bool]:
        """(profile, degraded). A failing, slow or circuit-broken store degrades instead of failing the call.

        Only the store's own faults count against the breaker: its errors, and budget misses (or its client's
        timeouts) seen while the event loop was on time. A miss caused by the loop's lateness degrades this
        call alone; counting it would open the breaker on a healthy store whenever the server is overloaded.
        """
        if not self._breaker.allow():
            metrics.PROFILE_DEGRADED.labels("circuit_open").inc()
            return None, True
        try:
            profile = await within_budget(
                lambda: self._store.get(user_id), self._options.profile_budget_s, (ProfileStoreTimeout,)
            )
        except BudgetMissed as miss:
            return self._missed(miss)
        except ProfileStoreError as exc:
            self._breaker.failure()
            reason = "timeout" if isinstance(exc, ProfileStoreTimeout) else "error"
            log.warning("profile read degraded (%s): %s", reason, exc)
            metrics.PROFILE_DEGRADED.labels(reason).inc()
            return None, True
        except BaseException:
            self._breaker.abandoned()  # the caller's deadline, or a bug: neither the store's success nor failure
            raise
        self._breaker.success()
        return profile, False

    def _missed(self, miss: BudgetMissed) -> tuple[Profile | None, bool]:
        """Degrade a call whose profile read missed its budget; only a miss of the store's counts against it."""
        metrics.PROFILE_BUDGET_MISSES.labels(miss.cause.value).inc()
        if miss.cause is MissCause.STORE:
            self._breaker.failure()
            log.warning("profile read degraded (timeout): no answer within the profile budget")
            metrics.PROFILE_DEGRADED.labels("timeout").inc()
        else:
            self._breaker.abandoned()
            # DEBUG: under overload many calls may miss; hyperrec_profile_budget_misses_total{cause="local"} counts
            log.debug("profile read degraded (loop_late): %s", miss)
            metrics.PROFILE_DEGRADED.labels("loop_late").inc()
        return None, True

    def _cutoffs(self, arrived: float, deadline: float | None) -> Cutoffs:
        rank_by = arrived + self._options.ranking_budget_s
        if deadline is not None and deadline - REPLY_MARGIN_S < rank_by:
            return Cutoffs(deadline, deadline - REPLY_MARGIN_S, rank_by_deadline=True)
        return Cutoffs(deadline, rank_by)

    async def recommend(self, req: RecommendRequest, deadline: float | None = None) -> Recommendation:
        """Answer one request. `deadline` is a time.monotonic() instant after which no work is done."""
        start = time.perf_counter()
        arrived = time.monotonic()
        now = datetime.now(UTC)
        validate_request(req, self._options.limits, now)
        bundle = self._slot.for_user(req.user_id)
        if bundle is None:
            raise Unavailable("no model version is loaded yet")
        timings = StageTimings()
        uvec, strategy, profile = None, Strategy.NOT_PERSONALIZED, None
        if not req.disable_personalization:
            with tracing.span("profile"):
                profile, degraded = await self._profile(req.user_id)
            if degraded:
                strategy = Strategy.DEGRADED
            elif profile is not None and profile.opted_out:
                strategy = Strategy.NOT_PERSONALIZED
            else:
                uvec, strategy = user_vector(bundle, profile, self._options.interest_events)
            timings.profile_ms = (time.perf_counter() - start) * 1e3
            metrics.STAGE_DURATION.labels("profile").observe(timings.profile_ms / 1e3)
        key, hit = None, None
        if uvec is not None and self.cache.enabled and strategy in CACHED_STRATEGIES:
            key = cache_key(req, profile, bundle.version, req.context.local_time(now))
            hit = self.cache.get(key)
        if uvec is None:
            items = cold_start_items(bundle, req, now)
        elif hit is not None:
            items, strategy = hit.items, hit.strategy
        else:
            self.recent_requests.append(req)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed before retrieval")
            pool = segment_candidates(bundle, uvec, req) if strategy == Strategy.INTERESTS else None
            work = Work(uvec, req, now, self._cutoffs(arrived, deadline), profile, pool)
            ranked = await self._batcher.rank(bundle, work)
            items, timings.retrieval_ms, timings.ranking_ms = ranked.items, ranked.retrieval_ms, ranked.ranking_ms
            metrics.STAGE_DURATION.labels("retrieval").observe(ranked.retrieval_ms / 1e3)
            metrics.STAGE_DURATION.labels("ranking").observe(ranked.ranking_ms / 1e3)
            record_stage_spans(ranked)
            if ranked.fallback is not None:
                strategy = Strategy.UNRANKED
                metrics.RANKING_FALLBACKS.labels(ranked.fallback).inc()
                # DEBUG: under overload every call may fall back; hyperrec_ranking_fallbacks_total counts them
                log.debug("ranking fell back to retrieval order (%s) for request %s", ranked.fallback, req.request_id)
            elif key is not None:
                self.cache.put(key, items, strategy)
        metrics.RECOMMENDATIONS.labels(strategy.value, bundle.version).inc()
        tracing.annotate({"hyperrec.strategy": strategy.value, "hyperrec.model_version": bundle.version})
        timings.total_ms = (time.perf_counter() - start) * 1e3
        metrics.STAGE_DURATION.labels("total").observe(timings.total_ms / 1e3)
        return Recommendation(
            items=items,
            model_name=bundle.model_name,
            model_version=bundle.version,
            strategy=strategy,
            request_id=req.request_id,
            timings=timings if req.include_timings else None,
        )


WARM_ROUND = 8  # warm-up requests per round; rounds continue until their median latency settles


def warm_up(
    bundle: Bundle,
    requests: int,
    candidates: int,
    recorded: Sequence[RecommendRequest] = (),
    seed: int = 0,
) -> float:
    """Run the index and the ranker on the served code path until latency settles, then return the settled
    median in ms (for the log).

    Requests are the `recorded` recent real ones (their k, context and exclusions) when there are any, else a
    synthetic one; the user vectors are near random items of `bundle`. Rounds of WARM_ROUND requests run until a
    round's median is within 10 % of the previous round's, or `requests` have run.
    """
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    shapes = list(recorded) or [RecommendRequest(user_id="warm-up", k=min(10, bundle.index.size))]
    previous, ran = math.inf, 0
    median = 0.0
    while ran < max(1, requests):
        latencies = []
        for _ in range(min(WARM_ROUND, max(1, requests) - ran)):
            request = shapes[int(rng.integers(0, len(shapes)))]
            request = replace(request, k=min(request.k, bundle.index.size))
            base = bundle.item_embeddings[rng.integers(0, bundle.index.size)]
            uvec = (base + rng.normal(0, 0.1, base.shape)).astype(np.float32)
            t = time.perf_counter()
            rank_candidates(bundle, uvec, request, now, candidates)
            latencies.append((time.perf_counter() - t) * 1e3)
            ran += 1
        median = float(np.median(latencies))
        if math.isfinite(previous) and abs(median - previous) <= 0.1 * previous:
            break
        previous = median
    return median
