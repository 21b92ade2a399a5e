"""Behavioural segments: K-Means over user vectors (hyperrec.index.kmeans), a ranker context feature in the bundle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from hyperrec.core.features import FeatureBlock, FeatureSpec
from hyperrec.index import kmeans


def fit_segments(user_vectors: np.ndarray, n_segments: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """K-Means centroids [n_segments, d] of the users' vectors (L2), reproducible for a seed."""
    vectors = np.ascontiguousarray(user_vectors, dtype=np.float32)
    if len(vectors) < n_segments:
        raise ValueError(f"{len(vectors)} users cannot form {n_segments} segments")
    return kmeans(vectors, n_segments, seed=seed)


def with_segment_block(spec: FeatureSpec, n_segments: int) -> FeatureSpec:
    """The spec with a segment one-hot appended to the context vector."""
    block = FeatureBlock("segment", "segment", "user_vector", buckets=n_segments)
    return replace(spec, blocks=(*spec.blocks, block))
