"""Re-score a published bundle on a dataset: the served two stages (ONNX Runtime ranker) against baselines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hyperrec.core.bundle import Bundle, resolve_version
from hyperrec.training.baselines import OfflineRecommender
from hyperrec.training.behaviour_features import BehaviourFeatures, category_columns
from hyperrec.training.factory import FactoryConfig, baselines, evaluate_models, make_split
from hyperrec.training.loaders import load_dataset
from hyperrec.training.splits import filter_min_history
from hyperrec.training.two_stage import TwoStageRecommender


@dataclass(frozen=True)
class BundleEvaluation:
    version_dir: Path
    metrics: dict[str, dict[str, float]]
    known_items: int
    metrics_warm_users: dict[str, dict[str, float]]


def evaluate_bundle(
    dataset: str,
    repo: Path,
    model_name: str,
    version: int | None = None,
    cfg: FactoryConfig | None = None,
    drop_malformed: bool = False,
) -> BundleEvaluation:
    """Split `dataset` as the manifest records (or as `cfg` says) and score the bundle's two stages and baselines.

    Items of the dataset that the bundle lacks can never be recommended by it (they still count as relevant).
    """
    directory = resolve_version(repo, model_name, version)
    bundle = Bundle.load(directory)
    cfg = cfg or recorded_config(bundle.manifest.training)
    data, _ = load_dataset(dataset, drop_malformed=drop_malformed)
    if cfg.min_user_events:
        data = filter_min_history(data, cfg.min_user_events)
    split = make_split(data, cfg)
    dim = bundle.feature_spec.embedding_dim
    vectors = np.zeros((data.n_items, dim), dtype=np.float32)
    width = bundle.feature_spec.item_feature_dim
    features = np.zeros((data.n_items, width), dtype=np.float32)
    bundle_rows = bundle.item_ids.rows(data.catalog.item_ids)
    known = bundle_rows >= 0
    vectors[known] = bundle.item_embeddings[bundle_rows[known]]
    if bundle.item_features is not None:
        features[known] = bundle.item_features[bundle_rows[known]]
    # The bundle's item features are frozen at its publication, exactly as the server uses them.
    frozen = (lambda _log: features) if width else None
    behaviour = None
    spec = bundle.feature_spec
    if spec.behaviour_features and bundle.categories is not None:
        cats = bundle.categories
        columns = category_columns([cats.of_row(r) if r >= 0 else () for r in bundle_rows.tolist()])
        behaviour = BehaviourFeatures(columns, spec.affinity_half_life_s, spec.behaviour_stats)
    candidates = cfg.ranker.candidates
    ours: list[OfflineRecommender] = [
        TwoStageRecommender("bundle_retrieval", vectors, bundle.feature_spec, None, candidates, known=known),
        TwoStageRecommender(
            "bundle_two_stage",
            vectors,
            bundle.feature_spec,
            bundle.ranker.score,
            candidates,
            known=known,
            item_features=frozen,
            segments=bundle.segments,
            behaviour=behaviour,
        ),
    ]
    metrics, warm = evaluate_models(split, [*baselines(cfg), *ours], cfg)
    return BundleEvaluation(directory, metrics, int(known.sum()), warm)


def recorded_config(training: Mapping[str, Any]) -> FactoryConfig:
    """The split and candidate settings the factory recorded in the manifest (defaults where absent)."""
    recorded = training.get("config", {})
    defaults = FactoryConfig()
    candidates = int(recorded.get("ranker", {}).get("candidates", defaults.ranker.candidates))
    ranker = replace(defaults.ranker, candidates=candidates)
    return replace(
        defaults,
        ranker=ranker,
        split=str(recorded.get("split", defaults.split)),
        validation_fraction=float(recorded.get("validation_fraction", defaults.validation_fraction)),
        test_fraction=float(recorded.get("test_fraction", defaults.test_fraction)),
        min_user_events=int(recorded.get("min_user_events", defaults.min_user_events)),
    )


def summary(result: BundleEvaluation) -> dict[str, Any]:
    return {
        "version_dir": str(result.version_dir),
        "known_items": result.known_items,
        "metrics": result.metrics,
        "metrics_warm_users": result.metrics_warm_users,
    }
