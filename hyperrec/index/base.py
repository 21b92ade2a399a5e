"""The ANN index interface the core relies on, whatever library implements it.

An `AnnIndex` answers inner-product top-n searches over a fixed item set whose rows are the item positions
0..n-1 of a bundle's item list (int64, never narrowed). Each index type of the bundle format is one subclass,
registered for its manifest type in `hyperrec.index.registry`. A subclass supplies the library-specific parts
(build, load, save, checks, and two search primitives: its ordinary search and an exhaustive one); the
exclusion logic every caller needs (over-fetch, filter, retry exhaustively when still short) is written once here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from hyperrec.index.devices import AUTO, CPU
from hyperrec.index.params import IndexParams

Hits = tuple[np.ndarray, np.ndarray]  # (scores float32, rows int64), per query or for a batch


class AnnIndex(ABC):
    """Inner-product search over a fixed item set. Build with `build` or `load`; search is thread-safe.

    `device` is where searches run: "cpu", or "cuda" for a GPU copy. `exact_scores` is False for an index whose
    scores are approximations (compressed codes): callers then rescore the candidates with the real vectors.
    """

    kind: ClassVar[str]  # the manifest's index "type" this class serves
    manifest_fields: ClassVar[tuple[str, ...]] = ()  # IndexParams fields the manifest records for this type only
    exact_scores: ClassVar[bool] = True
    params: IndexParams
    device: str

    @classmethod  # noqa: B027  (not abstract: a type with nothing to check keeps this one)
    def check_manifest(cls, params: IndexParams) -> None:
        """Raise ValueError when `params` (read from a manifest) are not valid for this index type."""

    @classmethod
    @abstractmethod
    def build(
        cls,
        embeddings: np.ndarray,
        params: IndexParams,
        seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        device: str = CPU,
    ) -> Self:
        """Index `embeddings` (float32 [n, d]), training what the type trains with `seed`.

        `on_progress(added, total)` is called after training and after each chunk of added vectors. The result
        stays on the CPU (it is usually only saved into a bundle) unless `device` says otherwise.
        """

    @classmethod
    @abstractmethod
    def load(cls, path: Path, params: IndexParams, device: str = AUTO) -> Self:
        """Read an index file written by `save` and place it on `device` ("auto", "cpu" or "gpu").

        RuntimeError: the file cannot be read. ValueError: `device` is not a choice, or "gpu" cannot be had.
        """

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the index to one file that `load` reads back."""

    @abstractmethod
    def check_params(self) -> None:
        """Raise ValueError when the loaded index is not what `params` says (type, metric, shape parameters)."""

    @abstractmethod
    def log_device(self) -> None:
        """Log at INFO where this index searches and why."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of indexed vectors."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the indexed vectors."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Size of the index as saved (about its memory), in bytes."""

    @property
    @abstractmethod
    def kind_name(self) -> str:
        """The library's name for the index structure, e.g. IndexIVFFlat (logs and metrics)."""

    @abstractmethod
    def _search(self, queries: np.ndarray, n: int) -> Hits:
        """The ordinary top-n search: queries float32 [b, d] contiguous, 1 <= n <= size; rows may be -1."""

    @abstractmethod
    def _search_exhaustive(self, queries: np.ndarray, n: int) -> Hits:
        """A top-n search as complete as the type can make it, for when `_search` came back short."""

    def search(self, queries: np.ndarray, n: int, exhaustive: bool = False) -> Hits:
        """Top-n rows per query: (scores float32 [b, n], rows int64 [b, n]); missing slots are row -1."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        n = max(1, min(n, self.size))
        scores, rows = self._search_exhaustive(q, n) if exhaustive else self._search(q, n)
        return scores, rows.astype(np.int64, copy=False)

    def search_excluding(self, query: np.ndarray, n: int, excluded_rows: Collection[int]) -> Hits:
        """Top-n rows for one query that are not in `excluded_rows`.

        Over-fetches by the number of exclusions; when an approximate search still comes back short, repeats it
        exhaustively (`_search_exhaustive`), so that min(n, size - |excluded|) rows come back.
        """
        return self.search_excluding_many(np.asarray(query)[None, :], [n], [excluded_rows])[0]

    def search_excluding_many(
        self, queries: np.ndarray, wants: Sequence[int], excluded_rows: Sequence[Collection[int]]
    ) -> list[Hits]:
        """`search_excluding` for a batch of queries [b, d] with one search: the i-th query's top wants[i] rows
        not in excluded_rows[i]. Only a query that comes back short is searched again, exhaustively."""
        excluded = [set(e) for e in excluded_rows]
        wanted = [min(n, self.size - len(e)) for n, e in zip(wants, excluded, strict=True)]
        fetch = max(w + len(e) for w, e in zip(wanted, excluded, strict=True))
        if fetch <= 0:
            return [_no_hits() for _ in wanted]
        scores, rows = self.search(queries, fetch)
        out = []
        for i, (want, skip) in enumerate(zip(wanted, excluded, strict=True)):
            if want <= 0:
                out.append(_no_hits())
                continue
            kept_scores, kept_rows = _keep(scores[i], rows[i], skip)
            if len(kept_rows) < want:
                retry_scores, retry_rows = self.search(queries[i], want + len(skip), exhaustive=True)
                kept_scores, kept_rows = _keep(retry_scores[0], retry_rows[0], skip)
            out.append((kept_scores[:want], kept_rows[:want]))
        return out


def _no_hits() -> Hits:
    return np.empty(0, np.float32), np.empty(0, np.int64)


def _keep(scores: np.ndarray, rows: np.ndarray, excluded: set[int]) -> Hits:
    """One query's hits without missing slots (row -1) and excluded rows, in their order."""
    mask = rows >= 0
    if excluded:
        mask &= ~np.isin(rows, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    return scores[mask], rows[mask]
