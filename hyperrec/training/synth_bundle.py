"""Synthetic bundles for benchmarks: a large catalogue without training.

Item embeddings are clustered random unit vectors; the ranker is the production
`Ranker` architecture with random weights, exported through the same ONNX path
as trained models, so retrieval and ranking cost what they cost in production.
The scores mean nothing: use these bundles to measure speed, never quality.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperrec.core.bundle import BundleContents, ColdStart, publish_bundle
from hyperrec.core.features import default_feature_spec
from hyperrec.core.profile import Profile
from hyperrec.index import IndexParams
from hyperrec.training import progress
from hyperrec.training.export import export_ranker_onnx
from hyperrec.training.networks import Ranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthBundleResult:
    version_dir: Path
    profiles: dict[str, Profile]


def clustered_unit_vectors(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors around `clusters` random centres (ANN indexes behave as on real embeddings)."""
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 200_000
    for start in range(0, n, step):
        stop = min(n, start + step)
        assign = rng.integers(0, clusters, size=stop - start)
        chunk = centres[assign] + rng.normal(scale=0.6, size=(stop - start, dim)).astype(np.float32)
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def make_synth_bundle(
    repo: Path,
    model_name: str,
    n_items: int,
    dim: int = 64,
    n_users: int = 1000,
    seed: int = 0,
    flat_threshold: int = 20_000,
) -> SynthBundleResult:
    """Publish a synthetic bundle of `n_items` items and return it with `n_users` matching profiles."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    clusters = max(16, int(np.sqrt(n_items)))
    emb = clustered_unit_vectors(n_items, dim, clusters, rng)
    ids = [f"s{i:07d}" for i in range(n_items)]
    spec = default_feature_spec(dim)
    ranker = Ranker(dim, spec.context_dim)
    popular = rng.permutation(n_items)[: min(n_items, 1000)]
    shares = np.sort(rng.pareto(1.5, size=len(popular)))[::-1]
    shares = shares / shares.sum()
    space = uuid.uuid4().hex
    contents = BundleContents(
        model_name=model_name,
        item_ids=ids,
        item_embeddings=emb,
        ranker_onnx=export_ranker_onnx(ranker, dim, spec.context_dim),
        feature_spec=spec,
        cold_start=ColdStart(tuple((ids[i], float(s)) for i, s in zip(popular, shares, strict=True))),
        index_params=IndexParams.choose(n_items, flat_threshold),
        embedding_space=space,
        training={"kind": "synthetic, untrained (benchmarks only)", "seed": seed, "clusters": clusters},
    )
    path = publish_bundle(repo, contents, progress.counter("index build", " vectors"))
    users = clustered_unit_vectors(n_users, dim, clusters, rng)
    profiles = {
        f"bench-user-{u:06d}": Profile(user_vector=users[u], embedding_space=space, updated_at=0.0)
        for u in range(n_users)
    }
    log.info("published synthetic bundle %s (%d items, dim %d)", path, n_items, dim)
    return SynthBundleResult(path, profiles)
