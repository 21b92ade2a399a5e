"""Inverted-file search (FAISS IndexIVFFlat): manifest type "ivf".

A coarse quantiser splits the vectors into `nlist` lists; a search probes the `nprobe` lists nearest the query,
and an exhaustive one probes them all.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from hyperrec.index.base import Hits
from hyperrec.index.devices import CPU
from hyperrec.index.faiss_common import FaissIndex
from hyperrec.index.params import IVF, IndexParams
from hyperrec.index.registry import register


@register
class IvfIndex(FaissIndex):
    """IVF-Flat: full vectors in `nlist` lists, `nprobe` probed per search."""

    kind = IVF
    faiss_class = "IndexIVFFlat"

    def __init__(self, index: Any, params: IndexParams, device: str = CPU) -> None:
        super().__init__(index, params, device)
        self._probe = faiss.SearchParametersIVF()
        self._probe.nprobe = params.nprobe
        self._probe_all = faiss.SearchParametersIVF()
        self._probe_all.nprobe = params.nlist

    @classmethod
    def check_manifest(cls, params: IndexParams) -> None:
        if not 0 < params.nprobe <= params.nlist:
            raise ValueError(f"{params.kind} index needs 0 < nprobe <= nlist")

    @classmethod
    def _create(cls, vectors: np.ndarray, params: IndexParams, seed: int) -> Any:
        """An IndexIVFFlat whose coarse quantiser is trained on every vector (k-means seeded by `seed`)."""
        dim = vectors.shape[1]
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        return index

    def _check_shape(self) -> None:
        if int(self._index.nlist) != self.params.nlist:
            raise ValueError(f"the index has {self._index.nlist} lists, the manifest says {self.params.nlist}")

    def _search(self, queries: np.ndarray, n: int) -> Hits:
        return self._run(queries, n, self._probe, self.params.nprobe)

    def _search_exhaustive(self, queries: np.ndarray, n: int) -> Hits:
        """Every list probed."""
        return self._run(queries, n, self._probe_all, self.params.nlist)
