"""Graph search (FAISS IndexHNSWFlat): manifest type "hnsw"."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from hyperrec.index.base import Hits
from hyperrec.index.faiss_common import FaissIndex
from hyperrec.index.params import HNSW, IndexParams
from hyperrec.index.registry import register

EXHAUSTIVE_WIDTH = 4  # an exhaustive search keeps this many times more graph candidates than results


@register
class HnswIndex(FaissIndex):
    """HNSW: `hnsw_m` links per node, built with `ef_construction`, searched with at least `ef_search` candidates.

    The graph search keeps ef candidates, so fewer than n would return fewer than n results: ef is at least n.
    """

    kind = HNSW
    faiss_class = "IndexHNSWFlat"
    manifest_fields = ("hnsw_m", "ef_construction", "ef_search")

    @classmethod
    def check_manifest(cls, params: IndexParams) -> None:
        if min(params.hnsw_m, params.ef_construction, params.ef_search) < 1:
            raise ValueError("hnsw index needs positive hnsw_m, ef_construction and ef_search")

    @classmethod
    def _create(cls, vectors: np.ndarray, params: IndexParams, seed: int) -> Any:
        """An empty graph (HNSW trains nothing; `seed` plays no part)."""
        index = faiss.IndexHNSWFlat(vectors.shape[1], params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        return index

    def _search(self, queries: np.ndarray, n: int) -> Hits:
        return self._run(queries, n, _ef(max(self.params.ef_search, n)))

    def _search_exhaustive(self, queries: np.ndarray, n: int) -> Hits:
        """A graph search EXHAUSTIVE_WIDTH times wider than the results asked for."""
        return self._run(queries, n, _ef(max(self.params.ef_search, EXHAUSTIVE_WIDTH * n)))


def _ef(ef_search: int) -> Any:
    """HNSW search-time parameters keeping `ef_search` candidates."""
    params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's own .pyi
    params.efSearch = ef_search
    return params
