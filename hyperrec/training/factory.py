"""The model factory: load a real interaction log, split it, train, evaluate against baselines, publish.

    load → split (temporal or leave-last-out) → retrieval (hybrid items, fold-in users)
         → ranker on retrieved candidates (early stopping on validation NDCG@10)
         → test: baselines, retrieval alone, two-stage, ANN recall vs exact
         → ONNX export + parity gate → bundle published atomically → report (JSON + markdown)

Models are selected on the validation part; the test part is scored once, with
every model (baselines included) seeing train + validation as history.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import hyperrec
from hyperrec import index as ann
from hyperrec.core.behaviour import BEHAVIOUR_FEATURES
from hyperrec.core.bundle import Bundle, BundleContents, ColdStart, publish_bundle, segment_key
from hyperrec.core.features import FeatureSpec, assign_segments, default_feature_spec
from hyperrec.core.pipeline import fold_in
from hyperrec.core.profile import Profile, ProfileSettings
from hyperrec.index import IVF, IndexParams
from hyperrec.training import progress
from hyperrec.training.backfill import build_profiles
from hyperrec.training.baselines import ImplicitALS, ItemKNN, MostPopular, OfflineRecommender, evaluate_recommender
from hyperrec.training.behaviour_features import BehaviourFeatures, fit_behaviour_features
from hyperrec.training.export import check_parity, export_ranker_onnx
from hyperrec.training.history_model import RetrievalConfig, latest_histories, train_retrieval
from hyperrec.training.interactions import Interactions, LoadReport
from hyperrec.training.item_features import fit_item_features
from hyperrec.training.loaders import load_dataset
from hyperrec.training.ranker_fit import RankerConfig, RankerFit, fit_ranker, torch_scorer
from hyperrec.training.segments import fit_segments, with_segment_block
from hyperrec.training.splits import Split, filter_min_history, leave_last_out_split, temporal_split, training_view
from hyperrec.training.train import SEGMENT_COLD_START_SIZE, cold_start_from_events, top_items
from hyperrec.training.two_stage import TwoStageRecommender

log = logging.getLogger(__name__)

SPLITS = ("temporal", "leave-last")


@dataclass(frozen=True)
class FactoryConfig:
    """Everything that decides a factory run; recorded in the bundle manifest."""

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    split: str = "temporal"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    min_user_events: int = 0
    ks: tuple[int, ...] = (10, 20, 50)
    flat_threshold: int = 20_000
    country_buckets: int = 16
    parity_tolerance: float = 1e-4
    # ALS and item-kNN settings tuned on ml-latest-small validation parts (see docs/benchmarks.md).
    als_factors: int = 128
    als_iterations: int = 15
    als_regularization: float = 10.0
    als_alpha: float = 1.0
    knn_neighbours: int = 100
    item_features: bool = True
    segments: int = 8  # behavioural segments (K-Means over users' vectors); 0 turns the feature off
    behaviour_features: bool = True  # users' decayed category affinities per candidate (needs item categories)
    retrain_on_all: bool = True  # publish a model retrained on train + validation (the test part stays unseen)
    affinity_half_life_days: float = 14.0  # must equal the server's affinity_half_life_days


@dataclass(frozen=True)
class FactoryResult:
    version_dir: Path
    report: dict[str, Any]
    profiles: Mapping[str, Profile]


def data_fingerprint(data: Interactions) -> str:
    """SHA-256 over the events and the catalogue ids: the same log always gives the same fingerprint."""
    digest = hashlib.sha256()
    for column in (data.user, data.item, data.timestamp, data.event_type, data.value):
        digest.update(np.ascontiguousarray(column).tobytes())
    digest.update("\x1f".join(data.user_ids).encode())
    digest.update("\x1f".join(data.catalog.item_ids).encode())
    return digest.hexdigest()


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"{hyperrec.__version__}+{commit}"


def make_split(data: Interactions, cfg: FactoryConfig) -> Split:
    if cfg.split == "temporal":
        return temporal_split(data, cfg.validation_fraction, cfg.test_fraction)
    if cfg.split == "leave-last":
        return leave_last_out_split(data)
    raise ValueError(f"unknown split {cfg.split!r}; use one of {', '.join(SPLITS)}")


class PopularityFallback:
    """A baseline that answers users without history by popularity, as any deployed system (and ours) does.

    Without it item-kNN and ALS return arbitrary lists for cold users, which flatters whoever has a fallback.
    """

    def __init__(self, model: OfflineRecommender) -> None:
        self.name = model.name
        self._model = model
        self._popular = MostPopular()
        self._warm = np.zeros(0, dtype=bool)

    def fit(self, train: Interactions) -> None:
        self._model.fit(train)
        self._popular.fit(train)
        self._warm = np.bincount(train.user, minlength=train.n_users) > 0

    def recommend(self, users: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> np.ndarray:
        out = self._popular.recommend(users, k, exclude)
        warm = self._warm[users]
        if warm.any():
            chosen = None if exclude is None else [e for e, w in zip(exclude, warm, strict=True) if w]
            out[warm] = self._model.recommend(users[warm], k, chosen)
        return out


def baselines(cfg: FactoryConfig) -> list[OfflineRecommender]:
    return [
        MostPopular(),
        PopularityFallback(ItemKNN(neighbours=cfg.knn_neighbours)),
        PopularityFallback(ImplicitALS(cfg.als_factors, cfg.als_regularization, cfg.als_iterations, cfg.als_alpha)),
    ]


def ann_recall(item_vectors: np.ndarray, users: np.ndarray, params: IndexParams, n: int) -> float:
    """Share of the exact top-n (inner product) that the index returns, averaged over `users` vectors."""
    if len(users) == 0:
        return float("nan")
    index = ann.build(item_vectors, params)
    _, approx = index.search(users, n)
    exact = np.argsort(-(users @ item_vectors.T), axis=1)[:, :n]
    return float(np.mean([len(set(a) & set(e)) / n for a, e in zip(approx, exact, strict=True)]))


def ann_report(vectors: np.ndarray, probe: np.ndarray, params: IndexParams, n: int) -> dict[str, Any]:
    """Recall of the published index against exact search, and of an IVF index when the published one is exact."""
    report: dict[str, Any] = {"index": params.to_json(), f"recall@{n}": ann_recall(vectors, probe, params, n)}
    ivf = IndexParams.choose(len(vectors), flat_threshold=0)
    if params.kind != IVF and len(vectors) >= 39 * ivf.nlist:  # FAISS wants ~39 training points per list
        report["ivf_for_comparison"] = {"index": ivf.to_json(), f"recall@{n}": ann_recall(vectors, probe, ivf, n)}
    return report


Metrics = dict[str, dict[str, float]]


def evaluate_models(split: Split, models: list[OfflineRecommender], cfg: FactoryConfig) -> tuple[Metrics, Metrics]:
    """Fit each model once on train + validation and score it on test: over all test users, and over those
    with history. "seconds" covers the fit and the all-users scoring."""
    history = training_view(split, with_validation=True)
    results: Metrics = {}
    warm: Metrics = {}
    for model in models:
        started = time.perf_counter()
        model.fit(history)
        results[model.name] = evaluate_recommender(model, history, split.test, cfg.ks)
        results[model.name]["seconds"] = time.perf_counter() - started
        warm[model.name] = evaluate_recommender(model, history, split.test, cfg.ks, warm_only=True)
        log.info(
            "test %s: ndcg@10 %.4f recall@20 %.4f",
            model.name,
            results[model.name]["ndcg@10"],
            results[model.name]["recall@20"],
        )
    return results, warm


@dataclass(frozen=True)
class TrainedModels:
    retrieval: Any
    item_spec: Any
    centroids: np.ndarray | None
    behaviour: BehaviourFeatures | None
    spec: FeatureSpec
    fit: RankerFit


def train_models(
    train: Interactions,
    validation: Interactions | None,
    item_categories: Sequence[Sequence[str]],
    cfg: FactoryConfig,
    timings: dict[str, float],
) -> TrainedModels:
    """Retrieval, item and behaviour feature statistics, segments and the ranker, all learned from `train`.

    With `validation`, the ranker stops early on it; without, it trains exactly `cfg.ranker.epochs` epochs.
    """
    clock = time.perf_counter()
    retrieval = train_retrieval(train, cfg.retrieval)
    timings["retrieval"] = time.perf_counter() - clock
    item_spec = fit_item_features(train) if cfg.item_features else None
    spec = default_feature_spec(cfg.retrieval.embedding_dim, cfg.country_buckets)
    if item_spec is not None:
        spec = replace(spec, item_features=item_spec.names, item_feature_stats=item_spec.stats_json())
    centroids = train_segments(train, retrieval.item_vectors, cfg)
    if centroids is not None:
        spec = with_segment_block(spec, len(centroids))
    behaviour = None
    if cfg.behaviour_features and any(item_categories):
        half_life_s = cfg.affinity_half_life_days * 86_400.0
        behaviour = fit_behaviour_features(train, item_categories, half_life_s, seed=cfg.ranker.seed)
        spec = replace(
            spec,
            behaviour_features=BEHAVIOUR_FEATURES,
            behaviour_stats=behaviour.stats,
            affinity_half_life_s=half_life_s,
        )
    clock = time.perf_counter()
    fit = fit_ranker(train, validation, retrieval.item_vectors, spec, cfg.ranker, item_spec, centroids, behaviour)
    timings["ranker"] = time.perf_counter() - clock
    return TrainedModels(retrieval, item_spec, centroids, behaviour, spec, fit)


def run_factory(
    dataset: str, repo: Path, model_name: str, cfg: FactoryConfig | None = None, drop_malformed: bool = False
) -> FactoryResult:
    """Load, split, train, evaluate and publish; the report says what beat what."""
    cfg = cfg or FactoryConfig()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    data, load_report = load_dataset(dataset, drop_malformed=drop_malformed)
    if cfg.min_user_events:
        data = filter_min_history(data, cfg.min_user_events)
    split = make_split(data, cfg)
    timings["load_and_split"] = time.perf_counter() - clock

    trained = train_models(split.train, split.validation, data.catalog.categories, cfg, timings)
    retrieval, item_spec, centroids, behaviour, spec, fit = (
        trained.retrieval,
        trained.item_spec,
        trained.centroids,
        trained.behaviour,
        trained.spec,
        trained.fit,
    )

    clock = time.perf_counter()
    vectors = retrieval.item_vectors
    features_at_end = item_spec.matrix if item_spec is not None else None
    ours = [
        TwoStageRecommender("retrieval", vectors, spec, None, cfg.ranker.candidates, cfg.retrieval.history),
        TwoStageRecommender(
            "two_stage",
            vectors,
            spec,
            torch_scorer(fit.ranker),
            cfg.ranker.candidates,
            cfg.retrieval.history,
            item_features=features_at_end,
            segments=centroids,
            behaviour=behaviour,
        ),
    ]
    results, warm_results = evaluate_models(split, [*baselines(cfg), *ours], cfg)
    timings["evaluation"] = time.perf_counter() - clock

    history = training_view(split, with_validation=True)
    published = fit.ranker
    if cfg.retrain_on_all:
        # The published model learns from train + validation with what validation chose (the ranker's epochs);
        # the test part stays unseen, so `hyperrec evaluate` on the same data remains an honest re-score.
        clock = time.perf_counter()
        final_ranker = replace(cfg.ranker, epochs=fit.best_epoch)
        trained = train_models(history, None, data.catalog.categories, replace(cfg, ranker=final_ranker), {})
        item_spec, centroids, spec = trained.item_spec, trained.centroids, trained.spec
        vectors, published = trained.retrieval.item_vectors, trained.fit.ranker
        timings["retrain_on_train_and_validation"] = time.perf_counter() - clock
    histories, weights = latest_histories(history, cfg.retrieval.history)
    warm = np.flatnonzero(histories[:, 0] >= 0)[:1000]
    probe = fold_in(vectors, histories[warm], engagement=weights[warm])
    index_params = IndexParams.choose(data.n_items, cfg.flat_threshold)
    recall = ann_report(vectors, probe, index_params, min(cfg.ranker.candidates, data.n_items))

    clock = time.perf_counter()
    onnx_bytes = export_ranker_onnx(published, spec.embedding_dim, spec.context_dim)
    parity = check_parity(
        published,
        onnx_bytes,
        spec.embedding_dim,
        spec.context_dim,
        tolerance=cfg.parity_tolerance,
        seed=cfg.ranker.seed,
    )
    timings["export"] = time.perf_counter() - clock

    report = build_report(dataset, data, load_report, split, cfg, results, recall, fit, parity, timings)
    report["metrics_warm_users"] = warm_results
    report["published_model"] = {
        "trained_on": "train+validation" if cfg.retrain_on_all else "train",
        "ranker_epochs": fit.best_epoch,
        "note": "the metrics above score the same procedure trained on train only; the test part is never learned",
    }
    space = uuid.uuid4().hex
    contents = BundleContents(
        model_name=model_name,
        item_ids=data.catalog.item_ids,
        item_embeddings=vectors,
        ranker_onnx=onnx_bytes,
        feature_spec=spec,
        cold_start=real_cold_start(history, vectors, centroids),
        index_params=index_params,
        embedding_space=space,
        training=report,
        item_features=item_spec.matrix(history) if item_spec is not None else None,
        segments=centroids,
        item_categories=data.catalog.categories,
    )
    version_dir = publish_bundle(repo, contents, progress.counter("index build", " vectors"))
    settings = ProfileSettings(half_life_s=cfg.affinity_half_life_days * 86_400.0)
    profiles = dict(build_profiles(history, Bundle.load(version_dir), settings))  # as `hyperrec profiles load`
    return FactoryResult(version_dir, report, profiles)


def train_segments(train: Interactions, vectors: np.ndarray, cfg: FactoryConfig) -> np.ndarray | None:
    """K-Means centroids of the train users' fold-in vectors at the end of train (None when turned off)."""
    if not cfg.segments:
        return None
    histories, weights = latest_histories(train, cfg.retrieval.history)
    warm = histories[:, 0] >= 0
    users = fold_in(vectors, histories[warm], engagement=weights[warm])
    if len(users) < cfg.segments:
        return None
    return fit_segments(users, cfg.segments, cfg.retrieval.seed)


def real_cold_start(history: Interactions, vectors: np.ndarray, centroids: np.ndarray | None) -> ColdStart:
    """Popularity lists from the history; these logs carry no device, so context lists are by daypart only.

    With behavioural segments, each segment also gets the popular items of its users (each user assigned by
    the fold-in of their latest history): the list a user without history but with declared interests starts
    from (`segment=<k>`).
    """
    hours = (history.timestamp // 3600) % 24
    devices = np.zeros(len(history), dtype=np.int64)  # DeviceType.UNSPECIFIED
    lists = cold_start_from_events(history.catalog.item_ids, history.item, devices, hours)
    if centroids is None:
        return lists
    histories, weights = latest_histories(history, 50)
    warm = histories[:, 0] >= 0
    segment_of = np.full(history.n_users, -1, dtype=np.int64)
    segment_of[warm] = assign_segments(centroids, fold_in(vectors, histories[warm], engagement=weights[warm]))
    by_segment = dict(lists.segments)
    for k in range(len(centroids)):
        events = segment_of[history.user] == k
        if events.any():
            by_segment[segment_key(k)] = top_items(
                history.catalog.item_ids, history.item[events], SEGMENT_COLD_START_SIZE
            )
    return replace(lists, segments=by_segment)


def build_report(
    dataset: str,
    data: Interactions,
    load_report: LoadReport,
    split: Split,
    cfg: FactoryConfig,
    results: dict[str, dict[str, float]],
    recall: dict[str, Any],
    fit: Any,
    parity: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    baseline_names = [n for n in results if n not in ("retrieval", "two_stage")]
    verdict = {
        metric: {
            "two_stage": results["two_stage"][metric],
            "best_baseline": max(baseline_names, key=lambda n: results[n][metric]),
            "beats_every_baseline": all(results["two_stage"][metric] > results[n][metric] for n in baseline_names),
        }
        for metric in ("ndcg@10", "recall@20")
    }
    return {
        "dataset": dataset,
        "data": {
            "users": data.n_users,
            "items": data.n_items,
            "events": len(data),
            "fingerprint": data_fingerprint(data),
            "load": {
                "rows_read": load_report.rows_read,
                "rows_kept": load_report.rows_kept,
                "dropped": load_report.dropped,
            },
            "feedback": "every event (rating) counts as one implicit interaction",
        },
        "split": {"kind": cfg.split, **{k: v for k, v in split.description.items()}},
        "config": asdict(cfg),
        "code_version": code_version(),
        "metrics": results,
        "verdict": verdict,
        "ann": recall,
        "ranker": {
            "best_epoch": fit.best_epoch,
            "validation_ndcg@10": list(fit.validation_ndcg),
            "retrieval_validation_ndcg@10": fit.retrieval_validation_ndcg,
        },
        "parity_max_abs_diff": parity,
        "timings_s": timings,
    }


def markdown_table(report: Mapping[str, Any], ks: tuple[int, ...] = (10, 20, 50)) -> str:
    """The report's test metrics as a markdown table, one row per model."""
    metrics = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "precision", "map", "hit_rate", "coverage")]
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, values in report["metrics"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


__all__ = ["SPLITS", "FactoryConfig", "FactoryResult", "FeatureSpec", "markdown_table", "run_factory"]
