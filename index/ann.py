"""Approximate nearest-neighbour search over item embeddings with FAISS.

Rows are item positions 0..n-1 in the bundle's item list (int64, never narrowed).
Scores are inner products. Small catalogues use exact search (IndexFlatIP);
large ones an inverted-file index whose parameters come from the bundle manifest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

FLAT = "flat"
IVF = "ivf"


@dataclass(frozen=True)
class IndexParams:
    """How the index is built and searched; recorded in the bundle manifest."""

    kind: str = FLAT
    nlist: int = 0
    nprobe: int = 0

    @staticmethod
    def choose(n_items: int, flat_threshold: int = 20_000) -> IndexParams:
        """Exact search below `flat_threshold` items, IVF (about 4·sqrt(n) lists) above it."""
        if n_items < flat_threshold:
            return IndexParams(FLAT)
        nlist = int(4 * math.sqrt(n_items))
        return IndexParams(IVF, nlist=nlist, nprobe=max(8, nlist // 32))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "metric": "inner_product", "nlist": self.nlist, "nprobe": self.nprobe}

    @staticmethod
    def from_json(data: dict[str, Any]) -> IndexParams:
        params = IndexParams(str(data["type"]), int(data.get("nlist", 0)), int(data.get("nprobe", 0)))
        if params.kind not in (FLAT, IVF):
            raise ValueError(f"unknown index type {params.kind!r}")
        if data.get("metric", "inner_product") != "inner_product":
            raise ValueError(f"unsupported metric {data.get('metric')!r}")
        if params.kind == IVF and not (0 < params.nprobe <= params.nlist):
            raise ValueError("ivf index needs 0 < nprobe <= nlist")
        return params


def set_threads(n: int) -> None:
    """FAISS OpenMP threads for this process (1 is best for single-query latency on few cores)."""
    faiss.omp_set_num_threads(max(1, n))


ADD_CHUNK = 65_536  # vectors added per FAISS call when building (the unit of build progress)


class AnnIndex:
    """Inner-product search over a fixed item set. Build with `build` or `load`; search is thread-safe."""

    def __init__(self, index: Any, params: IndexParams) -> None:
        self._index = index
        self.params = params
        self._search_params: Any = None
        self._exhaustive_params: Any = None
        if params.kind == IVF:
            self._search_params = faiss.SearchParametersIVF()
            self._search_params.nprobe = params.nprobe
            self._exhaustive_params = faiss.SearchParametersIVF()
            self._exhaustive_params.nprobe = params.nlist

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        params: IndexParams,
        seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> AnnIndex:
        """Index `embeddings` (float32 [n, d]); IVF trains its coarse quantiser on them.

        `on_progress(added, total)` is called after training and after each chunk of added vectors.
        """
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        dim = vectors.shape[1]
        if params.kind == FLAT:
            index: Any = faiss.IndexFlatIP(dim)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(vectors)
        total = len(vectors)
        if on_progress is not None:
            on_progress(0, total)
        for start in range(0, total, ADD_CHUNK):
            index.add(vectors[start : start + ADD_CHUNK])
            if on_progress is not None:
                on_progress(min(start + ADD_CHUNK, total), total)
        return cls(index, params)

    @classmethod
    def load(cls, path: Path, params: IndexParams) -> AnnIndex:
        return cls(faiss.read_index(str(path)), params)

    def save(self, path: Path) -> None:
        faiss.write_index(self._index, str(path))

    def check_params(self) -> None:
        """Raise ValueError when the FAISS index is not what `params` says (kind, metric, list count)."""
        expected = {FLAT: "IndexFlatIP", IVF: "IndexIVFFlat"}[self.params.kind]
        if self.kind_name != expected:
            raise ValueError(f"the file holds {self.kind_name}, the manifest says {self.params.kind} ({expected})")
        if self._index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the index does not use the inner-product metric")
        if self.params.kind == IVF and int(self._index.nlist) != self.params.nlist:
            raise ValueError(f"the index has {self._index.nlist} lists, the manifest says {self.params.nlist}")

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def kind_name(self) -> str:
        """FAISS class name, e.g. IndexIVFFlat."""
        return type(self._index).__name__

    def search(self, queries: np.ndarray, n: int, exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-n rows per query: (scores float32 [b, n], rows int64 [b, n]); missing slots are row -1."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        n = max(1, min(n, self.size))
        params = self._exhaustive_params if exhaustive else self._search_params
        scores, rows = self._index.search(q, n, params=params)
        return scores, rows.astype(np.int64, copy=False)

    def search_excluding(
        self, query: np.ndarray, n: int, excluded_rows: Collection[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n rows for one query that are not in `excluded_rows`.

        Over-fetches by the number of exclusions; when an approximate search still
        comes back short, repeats it exhaustively, so that min(n, size - |excluded|)
        rows always come back.
        """
        excluded = set(excluded_rows)
        want = min(n, self.size - len(excluded))
        if want <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        fetch = want + len(excluded)
        scores, rows = self._keep(*self.search(query, fetch), excluded)
        if len(rows) < want and self.params.kind == IVF:
            scores, rows = self._keep(*self.search(query, fetch, exhaustive=True), excluded)
        return scores[:want], rows[:want]

    @staticmethod
    def _keep(scores: np.ndarray, rows: np.ndarray, excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
        s, r = scores[0], rows[0]
        mask = r >= 0
        if excluded:
            mask &= ~np.isin(r, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
        return s[mask], r[mask]
