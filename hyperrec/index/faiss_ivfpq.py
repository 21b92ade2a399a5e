"""Inverted file with product-quantised vectors (FAISS IndexIVFPQ): manifest type "ivfpq".

Searched as IVF-Flat is; each vector is stored as `pq_m` one-byte codes, so scores are approximate and callers
rescore the candidates with the real vectors (`exact_scores` is False).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from hyperrec.index.faiss_ivf import IvfIndex
from hyperrec.index.params import IVFPQ, IndexParams
from hyperrec.index.registry import register

PQ_TRAIN_SAMPLE = 262_144  # vectors IVF-PQ trains its quantisers on (a random sample of the catalogue)


@register
class IvfPqIndex(IvfIndex):
    """IVF-PQ: `nlist` lists of `pq_m`-byte codes (8 bits per sub-vector)."""

    kind = IVFPQ
    faiss_class = "IndexIVFPQ"
    manifest_fields = ("pq_m",)
    exact_scores = False

    @classmethod
    def check_manifest(cls, params: IndexParams) -> None:
        super().check_manifest(params)
        if params.pq_m < 1:
            raise ValueError("ivfpq index needs a positive pq_m")

    @classmethod
    def _create(cls, vectors: np.ndarray, params: IndexParams, seed: int) -> Any:
        """An IndexIVFPQ trained on at most PQ_TRAIN_SAMPLE vectors, drawn with `seed`."""
        dim = vectors.shape[1]
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params.nlist, params.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = vectors if len(vectors) <= PQ_TRAIN_SAMPLE else vectors[rng.choice(len(vectors), PQ_TRAIN_SAMPLE)]
        index.train(sample)
        return index
