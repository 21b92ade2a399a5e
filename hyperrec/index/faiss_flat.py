"""Exact inner-product search (FAISS IndexFlatIP): manifest type "flat"."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from hyperrec.index.base import Hits
from hyperrec.index.faiss_common import FaissIndex
from hyperrec.index.params import FLAT, IndexParams
from hyperrec.index.registry import register


@register
class FlatIndex(FaissIndex):
    """Every vector compared with every query: exact, with nothing to train or tune."""

    kind = FLAT
    faiss_class = "IndexFlatIP"

    @classmethod
    def _create(cls, vectors: np.ndarray, params: IndexParams, seed: int) -> Any:
        return faiss.IndexFlatIP(vectors.shape[1])

    def _search(self, queries: np.ndarray, n: int) -> Hits:
        return self._run(queries, n)

    def _search_exhaustive(self, queries: np.ndarray, n: int) -> Hits:
        """The ordinary search already is."""
        return self._run(queries, n)
