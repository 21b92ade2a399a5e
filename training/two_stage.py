"""The serving pipeline's two stages, offline: fold-in retrieval over the full catalogue, then the ranker.

`TwoStageRecommender` follows the evaluation `Recommender` protocol, so it is
scored exactly like the baselines. Its ranker is any scoring function with the
ONNX contract (the PyTorch `Ranker` while training, ONNX Runtime when
re-evaluating a published bundle).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from hyperrec.domain import Context
from hyperrec.features import FeatureSpec, encode_context
from hyperrec.pipeline import FOLD_IN_DECAY
from training.history_model import latest_histories
from training.interactions import Interactions

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
IntArray = npt.NDArray[np.int64]


def context_matrix(times: npt.NDArray[np.int64], spec: FeatureSpec) -> npt.NDArray[np.float32]:
    """Context vectors for requests at unix `times` (device and country unknown, as in these logs)."""
    out = np.zeros((len(times), spec.context_dim), dtype=np.float32)
    for row, ts in enumerate(times):
        when = datetime.fromtimestamp(int(ts), UTC)
        encode_context(Context(event_time=when), spec, when, out[row])
    return out


def fold_in_numpy(item_vectors: np.ndarray, histories: IntArray, decay: float) -> npt.NDArray[np.float32]:
    """The server's fold-in (decayed average of recent items, newest first, -1 padded) for many users."""
    weights = (decay ** np.arange(histories.shape[1], dtype=np.float32))[None, :] * (histories >= 0)
    vectors = item_vectors[np.clip(histories, 0, None)]
    total = np.maximum(weights.sum(axis=1, keepdims=True), 1e-6)
    out: npt.NDArray[np.float32] = ((weights[:, :, None] * vectors).sum(axis=1) / total).astype(np.float32)
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
        self._histories: IntArray = np.zeros((0, history), dtype=np.int64)
        self._popular: IntArray = np.zeros(0, dtype=np.int64)
        self._fit_end = 0

    def fit(self, train: Interactions) -> None:
        """Take each user's latest history from `train` (what their profile holds at the cut-off)."""
        self._histories = latest_histories(train, self._history_length)
        self._popular = np.argsort(-np.bincount(train.item, minlength=train.n_items), kind="stable")
        self._fit_end = int(train.timestamp.max()) if len(train) else 0

    def recommend(self, users: IntArray, k: int, exclude: list[IntArray] | None = None) -> IntArray:
        out = np.full((len(users), k), -1, dtype=np.int64)
        histories = self._histories[users]
        warm = histories[:, 0] >= 0
        user_vectors = fold_in_numpy(self._vectors, histories, self._decay)
        times = self._request_times[users] if self._request_times is not None else np.full(len(users), self._fit_end)
        for row in range(len(users)):
            banned = exclude[row] if exclude is not None else histories[row][histories[row] >= 0]
            if not warm[row]:
                out[row] = _first_allowed(self._popular, banned, k)
                continue
            out[row] = self._rank_one(user_vectors[row], int(times[row]), banned, k)
        return out

    def _rank_one(self, user: np.ndarray, when: int, banned: IntArray, k: int) -> IntArray:
        scores = self._vectors @ user
        scores[banned] = -np.inf
        scores[self._unknown] = -np.inf
        n = min(max(self._candidates, k), int(np.isfinite(scores).sum()))
        candidates = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
        candidates = candidates[np.isfinite(scores[candidates])]
        if self._score is None:
            order = np.argsort(-scores[candidates], kind="stable")
        else:
            context = context_matrix(np.array([when]), self._spec)
            ranked = self._score(user[None, :], context, self._vectors[candidates][None, :, :])[0]
            order = np.argsort(-ranked, kind="stable")
        top = candidates[order][:k]
        return np.pad(top, (0, k - len(top)), constant_values=-1)


def _first_allowed(order: IntArray, banned: IntArray, k: int) -> IntArray:
    allowed = order[~np.isin(order, banned)][:k]
    return np.pad(allowed, (0, k - len(allowed)), constant_values=-1)
