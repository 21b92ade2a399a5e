"""Reference recommenders and the full-catalogue evaluation loop they share with every other model.

Each model learns only from the train `Interactions` passed to `fit` (never from a `Split`), ranks the
whole catalogue for a user, and by default leaves out the items that user already has in train, as
standard full-catalogue evaluation does. Scores are turned into lists by `top_k_items`: ties go to the
lower item index, excluded items are never returned, and lists are padded with -1 when too few remain.

- `MostPopular`: train event counts; the floor any personalised model must clear.
- `ItemKNN`: cosine item-item neighbourhoods over the binary user-item matrix.
- `ImplicitALS`: weighted matrix factorisation (Hu, Koren & Volinsky 2008) from the `implicit` library.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import threadpoolctl  # type: ignore[import-untyped]
from implicit.cpu.als import AlternatingLeastSquares

from hyperrec.training.interactions import Interactions
from hyperrec.training.metrics import evaluate_topk
from hyperrec.training.splits import seen_items

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

# Score cells (users x items) handled at once: bounds memory whatever the number of users or items.
SCORE_BLOCK_CELLS = 4_000_000


class OfflineRecommender(Protocol):
    """What evaluation needs from a model: fit on train events, then top-k item indexes per user."""

    name: str

    def fit(self, train: Interactions) -> None:
        """Learn from the train part only."""
        ...

    def recommend(self, users: IntArray, k: int, exclude: list[IntArray] | None = None) -> IntArray:
        """`[len(users), k]` item indexes, best first, -1 padded; `exclude[i]` never appears in row i.

        `exclude=None` means each user's own train items.
        """
        ...


def user_item_matrix(train: Interactions, binary: bool = False) -> Any:
    """Users x items CSR matrix of event counts (or 1 where any event), float32, from train events."""
    values = np.ones(len(train), dtype=np.float32)
    matrix = sp.csr_matrix((values, (train.user, train.item)), shape=(train.n_users, train.n_items))
    matrix.sum_duplicates()
    if binary:
        matrix.data[:] = 1.0
    return matrix


def top_k_items(scores: FloatArray, k: int, exclude: Sequence[IntArray]) -> IntArray:
    """Row-wise best k item indexes of a `[users, n_items]` score block, skipping each row's excluded items.

    A stable sort of the negated scores makes ties go to the lower item index, so lists are reproducible.
    Excluded items get -inf and come back as -1, as do the missing places when k exceeds the catalogue.
    """
    if k < 1:
        raise ValueError("k must be positive")
    masked = np.array(scores, dtype=np.float32, copy=True)
    rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    if rows.size:
        masked[rows, np.concatenate(exclude).astype(np.int64)] = -np.inf
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k].astype(np.int64)
    order[np.take_along_axis(masked, order, axis=1) == -np.inf] = -1
    if order.shape[1] < k:
        order = np.pad(order, ((0, 0), (0, k - order.shape[1])), constant_values=-1)
    return order


class ScoringRecommender(ABC):
    """A recommender that scores every item for a block of users; subclasses supply `_fit` and `_scores`."""

    name: str = "scoring"

    def __init__(self) -> None:
        self._seen: list[IntArray] | None = None
        self._n_users = 0
        self._n_items = 0

    def fit(self, train: Interactions) -> None:
        """Remember each user's train items (the default exclusions), then learn the model."""
        self._seen = seen_items(train)
        self._n_users = train.n_users
        self._n_items = train.n_items
        self._fit(train)

    def recommend(self, users: IntArray, k: int, exclude: list[IntArray] | None = None) -> IntArray:
        """Top-k per user, scored block by block to bound memory."""
        if self._seen is None:
            raise RuntimeError(f"{self.name}: call fit before recommend")
        users = np.asarray(users, dtype=np.int64)
        if users.size and (users.min() < 0 or users.max() >= self._n_users):
            raise ValueError("user index out of range")
        if exclude is not None and len(exclude) != len(users):
            raise ValueError("need one exclusion array per user")
        seen = self._seen
        step = max(1, SCORE_BLOCK_CELLS // max(1, self._n_items))
        blocks = []
        for start in range(0, len(users), step):
            block = users[start : start + step]
            block_exclude = [seen[u] for u in block] if exclude is None else exclude[start : start + step]
            blocks.append(top_k_items(self._scores(block), k, block_exclude))
        return np.concatenate(blocks) if blocks else np.zeros((0, k), dtype=np.int64)

    @abstractmethod
    def _fit(self, train: Interactions) -> None:
        """Learn from the train events."""

    @abstractmethod
    def _scores(self, users: IntArray) -> FloatArray:
        """`[len(users), n_items]` scores, higher is better."""


class MostPopular(ScoringRecommender):
    """Everyone gets the items with the most train events, in order of that count."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "most_popular"
        self.counts: FloatArray = np.zeros(0, dtype=np.float32)

    def _fit(self, train: Interactions) -> None:
        """Count events per item in train (all event types alike)."""
        self.counts = np.bincount(train.item, minlength=train.n_items).astype(np.float32)

    def _scores(self, users: IntArray) -> FloatArray:
        """The same counts for every user."""
        return np.broadcast_to(self.counts, (len(users), self.counts.size))


def _top_neighbours(similarity: FloatArray, n: int) -> tuple[IntArray, IntArray]:
    """(row, column) of the n largest positive entries of each row of a dense block (ties: any of them)."""
    if n < similarity.shape[1]:
        columns = np.argpartition(-similarity, n - 1, axis=1)[:, :n]
    else:
        columns = np.broadcast_to(np.arange(similarity.shape[1]), similarity.shape)
    rows = np.broadcast_to(np.arange(similarity.shape[0])[:, None], columns.shape)
    positive = np.take_along_axis(similarity, columns, axis=1) > 0
    return rows[positive].astype(np.int64), columns[positive].astype(np.int64)


class ItemKNN(ScoringRecommender):
    """Item-based neighbourhood model: a user's score for j sums the similarities of j to the user's items.

    Similarity is the cosine between item columns of the binary train user-item matrix, optionally shrunk
    (co-occurrences / ((|i| |j|)^(1/2) + shrink)), keeping each item's `neighbours` most similar items.
    The item-item matrix is built `block_cells` dense cells at a time: a dense block makes the per-row
    top-N selection an `argpartition`, far faster than sorting tens of millions of sparse entries.
    """

    def __init__(self, neighbours: int = 100, shrink: float = 0.0, block_cells: int = 16_000_000) -> None:
        super().__init__()
        if neighbours < 1 or shrink < 0 or block_cells < 1:
            raise ValueError("neighbours and block_cells must be positive and shrink non-negative")
        self.name = "item_knn"
        self.neighbours = neighbours
        self.shrink = shrink
        self.block_cells = block_cells
        self.user_items: Any = None
        self.similarity: Any = None

    def _fit(self, train: Interactions) -> None:
        """Build the pruned item-item similarity matrix, one block of item rows at a time (bounded memory)."""
        self.user_items = user_item_matrix(train, binary=True)
        item_users = self.user_items.T.tocsr()
        norms = np.sqrt(np.asarray(item_users.sum(axis=1), dtype=np.float32).ravel())
        step = max(1, self.block_cells // max(1, train.n_items))
        pruned = [self._similarity_block(item_users, norms, start, step) for start in range(0, train.n_items, step)]
        shape = (train.n_items, train.n_items)
        self.similarity = sp.vstack(pruned, format="csr") if pruned else sp.csr_matrix(shape, dtype=np.float32)

    def _similarity_block(self, item_users: Any, norms: FloatArray, start: int, step: int) -> Any:
        """Cosine rows for items [start, start + step), self-similarity removed, top neighbours kept."""
        stop = min(start + step, item_users.shape[0])
        co = np.asarray((item_users[start:stop] @ item_users.T).toarray(), dtype=np.float32)
        denominator = norms[start:stop, None] * norms[None, :] + np.float32(self.shrink)
        similarity = np.divide(co, denominator, out=np.zeros_like(co), where=denominator > 0)
        similarity[np.arange(stop - start), np.arange(start, stop)] = 0.0
        rows, cols = _top_neighbours(similarity, self.neighbours)
        values = similarity[rows, cols]
        return sp.csr_matrix((values, (rows, cols)), shape=similarity.shape, dtype=np.float32)

    def _scores(self, users: IntArray) -> FloatArray:
        """Sum over the user's train items of each item's neighbour similarities."""
        return np.asarray((self.user_items[users] @ self.similarity).toarray(), dtype=np.float32)


def default_threads() -> int:
    """At most two threads: the development machines have two cores, and more only adds contention."""
    return max(1, min(2, os.cpu_count() or 1))


class ImplicitALS(ScoringRecommender):
    """Implicit-feedback ALS on confidences 1 + alpha * (train event count), scored as user . item factors.

    Defaults are the best of a small grid on MovieLens-small leave-last-out validation (all ratings as
    interactions). The confidence matrix is built here and handed to `implicit` with its own alpha left at 1, because
    `implicit` reads the matrix values as the confidences themselves (and subtracts the 1 internally).
    """

    def __init__(
        self,
        factors: int = 128,
        regularization: float = 10.0,
        iterations: int = 15,
        alpha: float = 1.0,
        random_state: int = 0,
        num_threads: int | None = None,
        show_progress: bool = False,
    ) -> None:
        super().__init__()
        self.name = "implicit_als"
        self.factors = factors
        self.regularization = regularization
        self.iterations = iterations
        self.alpha = alpha
        self.random_state = random_state
        self.num_threads = default_threads() if num_threads is None else num_threads
        self.show_progress = show_progress
        self.user_factors: FloatArray = np.zeros((0, factors), dtype=np.float32)
        self.item_factors: FloatArray = np.zeros((0, factors), dtype=np.float32)

    def confidence_matrix(self, train: Interactions) -> Any:
        """Users x items CSR of 1 + alpha * count where the user has events (absent entries mean confidence 1)."""
        matrix = user_item_matrix(train)
        matrix.data = (1.0 + self.alpha * matrix.data).astype(np.float32)
        return matrix

    def _fit(self, train: Interactions) -> None:
        """Factorise the confidence matrix; BLAS is held to one thread, as `implicit` requires for speed."""
        with threadpoolctl.threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=1.0,
                iterations=self.iterations,
                random_state=self.random_state,
                num_threads=self.num_threads,
            )
            model.fit(self.confidence_matrix(train), show_progress=self.show_progress)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)

    def _scores(self, users: IntArray) -> FloatArray:
        """Dot products of the users' factors with every item's factors."""
        scores: FloatArray = self.user_factors[users] @ self.item_factors.T
        return scores


def relevant_sets(test: Interactions, users: IntArray, seen: Sequence[IntArray] | None = None) -> list[IntArray]:
    """Each user's distinct test items, less the items in `seen[user]` (which cannot be recommended)."""
    test_items = test.items_by_user()
    out = []
    for u in users:
        items = np.unique(test_items[u])
        out.append(items if seen is None else np.setdiff1d(items, seen[u], assume_unique=True))
    return out


def evaluate_recommender(
    model: OfflineRecommender,
    split_train: Interactions,
    test: Interactions,
    ks: Sequence[int] = (10, 20, 50),
    exclude_seen: bool = True,
    warm_only: bool = False,
) -> dict[str, float]:
    """Full-catalogue top-k metrics of an already fitted model on the users that have test events.

    With `exclude_seen`, each user's train items are filtered from their list and removed from their
    relevant set (they could never be hit); users left with no relevant item are not averaged. With
    `warm_only`, users without train events (possible under a temporal split) are skipped. Returns
    `evaluate_topk`'s dictionary ("ndcg@10", "recall@20", "coverage@50", ..., "n_users").
    """
    users = np.unique(test.user)
    if warm_only:
        users = users[np.bincount(split_train.user, minlength=split_train.n_users)[users] > 0]
    seen = seen_items(split_train)
    relevant = relevant_sets(test, users, seen if exclude_seen else None)
    empty = np.zeros(0, dtype=np.int64)
    exclude = [seen[u] for u in users] if exclude_seen else [empty for _ in users]
    top = model.recommend(users, max(ks), exclude) if len(users) else np.zeros((0, max(ks)), dtype=np.int64)
    return evaluate_topk(top, relevant, ks, n_items=split_train.n_items)
