"""The serving pipeline's two stages, offline: fold-in retrieval over the full catalogue, then the ranker.

`TwoStageRecommender` follows the evaluation `OfflineRecommender` protocol, so it is
scored exactly like the baselines. Its ranker is any scoring function with the
ONNX contract (the PyTorch `Ranker` while training, ONNX Runtime when
re-evaluating a published bundle).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from hyperrec.core.domain import Context
from hyperrec.core.features import FeatureSpec, assign_segments, encode_context
from hyperrec.core.pipeline import FOLD_IN_DECAY, fold_in
from hyperrec.training.behaviour_features import BehaviourFeatures, replay_states
from hyperrec.training.history_model import latest_histories
from hyperrec.training.interactions import Interactions

# (user [b,d], context [b,c], items [b,n,d], item features [b,n,f] or None) -> scores [b,n]: the ONNX contract.
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]
# Per-item feature matrix [items, f] as of the end of a log (what a bundle published then would hold).
FeaturesFn = Callable[[Interactions], np.ndarray]
IntArray = npt.NDArray[np.int64]
BLOCK = 256  # users retrieved and ranked together


def context_matrix(
    times: npt.NDArray[np.int64], spec: FeatureSpec, segments: npt.NDArray[np.int64] | None = None
) -> npt.NDArray[np.float32]:
    """Context vectors for requests at unix `times` by users in `segments` (device and country unknown here)."""
    out = np.zeros((len(times), spec.context_dim), dtype=np.float32)
    for row, ts in enumerate(times):
        when = datetime.fromtimestamp(int(ts), UTC)
        segment = None if segments is None else int(segments[row])
        encode_context(Context(event_time=when), spec, when, out[row], segment=segment)
    return out


class TwoStageRecommender:
    """Retrieve `candidates` items by inner product with the fold-in user vector, re-rank them, keep k.

    Users without history get the train popularity order (the server's cold start).
    With `score` None it is retrieval alone. Items outside `known` (a bundle that lacks them) never come back.
    """

    def __init__(
        self,
        name: str,
        item_vectors: npt.NDArray[np.float32],
        spec: FeatureSpec,
        score: ScoreFn | None,
        candidates: int = 200,
        history: int = 50,
        decay: float = FOLD_IN_DECAY,
        request_times: npt.NDArray[np.int64] | None = None,
        known: npt.NDArray[np.bool_] | None = None,
        item_features: FeaturesFn | None = None,
        segments: np.ndarray | None = None,
        behaviour: BehaviourFeatures | None = None,
    ) -> None:
        self.name = name
        self._vectors = item_vectors
        self._spec = spec
        self._score = score
        self._candidates = candidates
        self._history_length = history
        self._decay = decay
        self._request_times = request_times
        self._unknown = np.flatnonzero(~known) if known is not None else np.zeros(0, dtype=np.int64)
        self._features_fn = item_features
        self._features: np.ndarray | None = None
        self._segments = segments
        self._behaviour = behaviour
        self._user_weights = self._user_times = np.zeros((0, 0))
        self._histories: IntArray = np.zeros((0, history), dtype=np.int64)
        self._weights = np.zeros((0, history), dtype=np.float32)
        self._popular: IntArray = np.zeros(0, dtype=np.int64)
        self._fit_end = 0

    def fit(self, train: Interactions) -> None:
        """Take each user's latest history from `train` (what their profile holds at the cut-off)."""
        self._histories, self._weights = latest_histories(train, self._history_length)
        self._popular = np.argsort(-np.bincount(train.item, minlength=train.n_items), kind="stable")
        self._fit_end = int(train.timestamp.max()) if len(train) else 0
        self._features = self._features_fn(train) if self._features_fn is not None else None
        if self._behaviour is not None:
            b = self._behaviour
            self._user_weights, self._user_times = replay_states(train, b.columns, b.half_life_s)

    def recommend(self, users: IntArray, k: int, exclude: list[IntArray] | None = None) -> IntArray:
        out = np.full((len(users), k), -1, dtype=np.int64)
        histories, weights = self._histories[users], self._weights[users]
        banned = [
            exclude[row] if exclude is not None else histories[row][histories[row] >= 0] for row in range(len(users))
        ]
        times = self._request_times[users] if self._request_times is not None else np.full(len(users), self._fit_end)
        warm = np.flatnonzero(histories[:, 0] >= 0)
        for row in np.flatnonzero(histories[:, 0] < 0):
            out[row] = _first_allowed(self._popular, banned[row], k)
        for start in range(0, len(warm), BLOCK):
            rows = warm[start : start + BLOCK]
            out[rows] = self._rank_block(
                users[rows], histories[rows], weights[rows], times[rows], [banned[r] for r in rows], k
            )
        return out

    def _rank_block(
        self,
        user_index: IntArray,
        histories: IntArray,
        weights: np.ndarray,
        times: IntArray,
        banned: list[IntArray],
        k: int,
    ) -> IntArray:
        """Retrieve and rank for a block of warm users at once (one matrix product, one ranker call)."""
        users = fold_in(self._vectors, histories, self._decay, engagement=weights)
        scores = users @ self._vectors.T
        for row, items in enumerate(banned):
            scores[row, items] = -np.inf
        scores[:, self._unknown] = -np.inf
        n = min(max(self._candidates, k), scores.shape[1])
        candidates = (
            np.argpartition(-scores, n - 1, axis=1)[:, :n]
            if n < scores.shape[1]
            else (np.tile(np.arange(scores.shape[1]), (len(users), 1)))
        )
        retrieved = np.take_along_axis(scores, candidates, axis=1)
        if self._score is None:
            ranked = retrieved
        else:
            segment_of = None if self._segments is None else assign_segments(self._segments, users)
            context = context_matrix(times, self._spec, segment_of)
            parts = [] if self._features is None else [self._features[candidates]]
            if self._behaviour is not None:
                weights, last = self._user_weights[user_index], self._user_times[user_index]
                parts.append(self._behaviour.features(weights, last, times.astype(np.float64), candidates))
            features = np.concatenate(parts, axis=2) if parts else None
            ranked = self._score(users, context, self._vectors[candidates], features).astype(np.float64)
            ranked[~np.isfinite(retrieved)] = -np.inf
        order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(candidates, order, axis=1)
        top[~np.isfinite(np.take_along_axis(ranked, order, axis=1))] = -1
        if top.shape[1] < k:
            top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-1)
        return top


def _first_allowed(order: IntArray, banned: IntArray, k: int) -> IntArray:
    allowed = order[~np.isin(order, banned)][:k]
    return np.pad(allowed, (0, k - len(allowed)), constant_values=-1)
