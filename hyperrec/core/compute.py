"""The compute stage of Recommend: ANN retrieval and ONNX ranking, for one request or a batch of them.

It runs on a compute thread. `rank_batch` serves several requests (of one bundle) with one FAISS search over all
their query vectors and one ONNX Runtime run over all their candidates; `rank_candidates` is the same code for a
single request. The micro-batcher (hyperrec/core/batching.py) decides what goes into a batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from hyperrec.core.behaviour import affinity_arrays, behaviour_raw
from hyperrec.core.bundle import Bundle
from hyperrec.core.domain import RecommendRequest, ScoredItem
from hyperrec.core.errors import DeadlineExceeded, HyperrecError
from hyperrec.core.features import assign_segments, encode_context, standardize
from hyperrec.core.profile import Profile
from hyperrec.core.ranker import RankingRun, RankingStopped


@dataclass(frozen=True)
class Cutoffs:
    """When one request's work must stop (time.monotonic() instants; None: no limit).

    Past `deadline` nothing more is computed (the caller has given up). Ranking must finish by `rank_by`
    (the ranking budget, or just before the deadline): the run is stopped at that instant by the event loop, and
    the answer then keeps retrieval order. `rank_by_deadline` says which of the two set `rank_by`.
    """

    deadline: float | None = None
    rank_by: float | None = None
    rank_by_deadline: bool = False

    @property
    def fallback_reason(self) -> str:
        return "deadline" if self.rank_by_deadline else "budget"


@dataclass(frozen=True)
class Ranked:
    """What the compute stage returns: the top-k items, the stage times, and why ranking fell back (or None)."""

    items: tuple[ScoredItem, ...]
    retrieval_ms: float
    ranking_ms: float
    fallback: str | None = None
    started_ns: int = 0  # wall clock (time.time_ns()) when retrieval began, for the stage spans
    batch_size: int = 1  # requests computed together with this one (itself included)


@dataclass(frozen=True)
class Work:
    """One request's share of a batch: its user vector, request, clock, cut-offs, profile (for behaviour
    features) and, for declared-interest users, a given candidate set replacing the ANN search."""

    uvec: np.ndarray
    req: RecommendRequest
    now: datetime
    cutoffs: Cutoffs = Cutoffs()  # frozen: one shared default is safe
    profile: Profile | None = None
    candidate_rows: np.ndarray | None = None


def candidate_features(bundle: Bundle, profile: Profile | None, rows: np.ndarray, now: datetime) -> np.ndarray | None:
    """The ranker's `item_features` for candidate `rows` [n, F]: the bundle's stored item features, then the
    user's behaviour features (transformed with the training split's statistics); None when the ranker takes none."""
    spec = bundle.feature_spec
    parts = [] if bundle.item_features is None else [bundle.item_features[rows]]
    if spec.behaviour_features and bundle.categories is not None:
        cats = bundle.categories
        weights, times = affinity_arrays(profile.categories if profile else {}, cats.index, len(cats.names))
        raw = behaviour_raw(
            weights[None, :],
            times[None, :],
            np.array([now.timestamp()]),
            cats.columns[rows][None, :, :],
            spec.affinity_half_life_s,
        )[0]
        parts.append(standardize(raw, spec.behaviour_stats, spec.behaviour_features))
    return np.concatenate(parts, axis=1) if parts else None


def retrieval_order(bundle: Bundle, rows: np.ndarray, retrieval_scores: np.ndarray, k: int) -> tuple[ScoredItem, ...]:
    """The top k candidates by retrieval score (ties by row), each scored by its retrieval score."""
    order = np.lexsort((rows, -retrieval_scores))[:k]
    return _answer(bundle, rows[order], retrieval_scores[order], retrieval_scores[order])


def _answer(
    bundle: Bundle, rows: np.ndarray, scores: np.ndarray, retrieval_scores: np.ndarray
) -> tuple[ScoredItem, ...]:
    """The answer's items, in the order given: ids looked up together, scores as Python floats."""
    ids = bundle.item_ids.take(rows)
    return tuple(map(ScoredItem, ids, scores.tolist(), retrieval_scores.tolist()))


def _expired(work: Work) -> bool:
    return work.cutoffs.deadline is not None and time.monotonic() >= work.cutoffs.deadline


def _known_rows(bundle: Bundle, item_ids: Sequence[str]) -> set[int]:
    """Rows of the ids the bundle knows (an excluded id it lacks excludes nothing)."""
    if not item_ids:
        return set()
    rows = bundle.item_ids.rows(item_ids)
    return set(rows[rows >= 0].tolist())


def _excluded_ids(work: Work) -> Sequence[str]:
    """What the answer must leave out: the request's exclusions and, unless it asks for them, the items the user's
    profile says they already engaged with (recent items)."""
    if work.req.include_seen or work.profile is None or not work.profile.recent_items:
        return work.req.exclude
    return (*work.req.exclude, *work.profile.recent_items)


def _retrieve(
    bundle: Bundle, works: Sequence[Work], live: list[int], candidates: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(retrieval scores, rows) per live request: one FAISS search for all ANN requests, inner products for
    given candidate sets."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    excluded = {i: _known_rows(bundle, _excluded_ids(works[i])) for i in live}
    ann = [i for i in live if works[i].candidate_rows is None]
    if ann:
        wants = [max(candidates, works[i].req.k) for i in ann]
        queries = np.stack([works[i].uvec for i in ann])
        found = bundle.index.search_excluding_many(queries, wants, [excluded[i] for i in ann])
        if not bundle.index.exact_scores:  # compressed codes (IVF-PQ): rescore with the real vectors
            found = [(bundle.item_embeddings[rows] @ q, rows) for q, (_, rows) in zip(queries, found, strict=True)]
        out.update(zip(ann, found, strict=True))
    for i in live:
        given = works[i].candidate_rows
        if given is not None:
            rows = np.array([r for r in given if r not in excluded[i]], dtype=np.int64)
            out[i] = (bundle.item_embeddings[rows] @ works[i].uvec, rows)
    return out


def _score(
    bundle: Bundle, works: Sequence[Work], rank: list[int], found: dict[int, tuple[np.ndarray, np.ndarray]], run: Any
) -> np.ndarray:
    """Ranker scores [len(rank), C] for the requests in `rank`, candidates padded to the longest list C (padding
    repeats the first candidate; callers read only each request's own n columns)."""
    width = max(len(found[i][1]) for i in rank)
    padded = np.empty((len(rank), width), dtype=np.int64)
    for b, i in enumerate(rank):
        rows = found[i][1]
        padded[b, : len(rows)] = rows
        padded[b, len(rows) :] = rows[0]
    users = np.stack([works[i].uvec for i in rank]).astype(np.float32, copy=False)
    segments = None if bundle.segments is None else assign_segments(bundle.segments, users)
    contexts = np.stack(
        [
            encode_context(works[i].req.context, bundle.feature_spec, works[i].now, segment=segment)
            for i, segment in zip(rank, [None] * len(rank) if segments is None else segments.tolist(), strict=True)
        ]
    )
    items = bundle.item_embeddings[padded]
    features = [
        candidate_features(bundle, works[i].profile, padded[b], works[i].req.context.event_time or works[i].now)
        for b, i in enumerate(rank)
    ]  # behaviour features as of each request's own time
    stacked = None if features[0] is None else np.stack([f for f in features if f is not None])
    scores: np.ndarray = bundle.ranker.score(users, contexts, items, stacked, run)
    return scores


def rank_batch(
    bundle: Bundle, works: Sequence[Work], candidates: int, run: RankingRun | None = None
) -> list[Ranked | HyperrecError]:
    """Retrieve and rank for every request in `works` (blocking; runs on a compute thread): a Ranked answer or
    the failure (DeadlineExceeded) of each, in order.

    A request whose deadline passed while it waited, or passes during retrieval, fails; one whose ranking cut-off
    has passed when ranking starts keeps retrieval order; if `run` is stopped during the ranking run, every
    request in it keeps retrieval order, with its own reason.
    """
    t0, started_ns = time.perf_counter(), time.time_ns()
    results: list[Ranked | HyperrecError | None] = [None] * len(works)
    live = []
    for i, work in enumerate(works):
        if _expired(work):
            results[i] = DeadlineExceeded("deadline passed while waiting for a compute thread; nothing was computed")
        else:
            live.append(i)
    found = _retrieve(bundle, works, live, candidates) if live else {}
    t1 = time.perf_counter()
    retrieval_ms, size = (t1 - t0) * 1e3, len(works)

    def unranked(i: int, ranking_ms: float, reason: str | None) -> Ranked:
        scores, rows = found[i]
        items = retrieval_order(bundle, rows, scores, works[i].req.k)
        return Ranked(items, retrieval_ms, ranking_ms, reason, started_ns, size)

    rank = []
    now = time.monotonic()
    for i in live:
        cut = works[i].cutoffs
        if cut.deadline is not None and now >= cut.deadline:
            results[i] = DeadlineExceeded("deadline passed after retrieval; ranking skipped")
        elif len(found[i][1]) == 0:
            results[i] = Ranked((), retrieval_ms, 0.0, None, started_ns, size)
        elif cut.rank_by is not None and now >= cut.rank_by:
            results[i] = unranked(i, 0.0, cut.fallback_reason)
        else:
            rank.append(i)
    if rank:
        try:
            scores = _score(bundle, works, rank, found, run)
        except RankingStopped:
            ranking_ms = (time.perf_counter() - t1) * 1e3
            for i in rank:
                results[i] = unranked(i, ranking_ms, works[i].cutoffs.fallback_reason)
        else:
            ranking_ms = (time.perf_counter() - t1) * 1e3
            for b, i in enumerate(rank):
                retrieval_scores, rows = found[i]
                mine = np.where(np.isnan(scores[b, : len(rows)]), -np.inf, scores[b, : len(rows)])
                order = np.lexsort((rows, -retrieval_scores, -mine))[: works[i].req.k]
                items = _answer(bundle, rows[order], mine[order], retrieval_scores[order])
                results[i] = Ranked(items, retrieval_ms, ranking_ms, None, started_ns, size)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def rank_candidates(
    bundle: Bundle,
    uvec: np.ndarray,
    req: RecommendRequest,
    now: datetime,
    candidates: int,
    cutoffs: Cutoffs = Cutoffs(),  # frozen: one shared default is safe
    profile: Profile | None = None,
    candidate_rows: np.ndarray | None = None,
    run: RankingRun | None = None,
) -> Ranked:
    """Retrieve and rank for one user (blocking): `rank_batch` with a batch of one; raises its failure. `run` is
    the ranking run's stop handle (a batch has one for all its requests)."""
    (result,) = rank_batch(bundle, [Work(uvec, req, now, cutoffs, profile, candidate_rows)], candidates, run)
    if isinstance(result, HyperrecError):
        raise result
    return result
