"""Train embeddings and the ranker, build cold-start lists and profiles, and publish a bundle.

`train_and_publish` is the whole pipeline: train on all but each user's last
event (that event measures hit rate), export the ranker to ONNX, refuse to
publish unless the export matches PyTorch (`check_parity`), then write the
bundle with `hyperrec.core.bundle.publish_bundle`. Context features come from
`hyperrec.core.features.encode_contexts` with the bundle's own feature spec, so the
server encodes requests exactly as training did. Everything is seeded from the
config: the same data and config give the same model.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from hyperrec.core.bundle import BundleContents, ColdStart, publish_bundle
from hyperrec.core.domain import DeviceType
from hyperrec.core.features import FeatureSpec, daypart, default_feature_spec, encode_contexts
from hyperrec.core.profile import Profile
from hyperrec.index import IndexParams
from hyperrec.training import progress
from hyperrec.training.export import check_parity, export_ranker_onnx
from hyperrec.training.history_model import recent_distinct
from hyperrec.training.networks import DEFAULT_HIDDEN, JointModel, Ranker, torch_threads
from hyperrec.training.synthetic import SyntheticData

log = logging.getLogger(__name__)

GLOBAL_COLD_START_SIZE = 1000
SEGMENT_COLD_START_SIZE = 200
#: Retrieval candidates the ranker re-orders when measuring the ranked hit rate.
EVAL_CANDIDATES = 200
#: Daypart of every local hour, computed once with the serving function so both sides agree.
_DAYPART_OF_HOUR: tuple[str, ...] = tuple(daypart(datetime(2000, 1, 1, hour)) for hour in range(24))


@dataclass(frozen=True)
class TrainConfig:
    """Model size, optimisation and publishing settings; the defaults train the demo in well under a minute.

    negatives: per-event items the ranker's sampled softmax scores against the positive.
    retrieval_negatives: items per batch the embeddings' sampled softmax shares across the batch.
    embedding_l2: weight of the squared-norm penalty on each batch's user and item vectors (curbs overfitting).
    flat_threshold: catalogue size from which the bundle uses an IVF index (see IndexParams.choose).
    threads: torch intra-op threads while training (restored afterwards).
    """

    embedding_dim: int = 32
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    epochs: int = 8
    batch_size: int = 1024
    learning_rate: float = 5e-3
    negatives: int = 10
    retrieval_negatives: int = 256
    embedding_l2: float = 1e-2
    seed: int = 0
    country_buckets: int = 16
    flat_threshold: int = 20_000
    recent_items: int = 50
    threads: int = 2
    eval_k: int = 20
    parity_tolerance: float = 1e-4


@dataclass(frozen=True)
class TrainResult:
    """What training produced: embeddings (rows follow the data's item and user order), the ranker, metrics."""

    item_embeddings: npt.NDArray[np.float32]
    user_embeddings: npt.NDArray[np.float32]
    ranker: Ranker
    feature_spec: FeatureSpec
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishResult:
    """A published bundle version and everything made on the way; `timings` are seconds per stage."""

    version_dir: Path
    train: TrainResult
    profiles: Mapping[str, Profile]
    embedding_space: str
    parity_max_abs_diff: float
    timings: Mapping[str, float]

    @property
    def version(self) -> int:
        """The version number the repository assigned."""
        return int(self.version_dir.name)


def train(data: SyntheticData, config: TrainConfig | None = None) -> TrainResult:
    """Train user and item embeddings and the ranker jointly; measure hit rate on each user's last event."""
    cfg = config or TrainConfig()
    started = time.perf_counter()
    spec = default_feature_spec(cfg.embedding_dim, cfg.country_buckets)
    context = encode_contexts(data.contexts(), spec, data.end_time)
    train_rows, held_out = temporal_split(data)
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = JointModel(data.n_users, data.n_items, cfg.embedding_dim, spec.context_dim, cfg.hidden)
        losses = _fit(model, data, context, train_rows, cfg)
        model.eval()
        user_emb = model.user_embedding.weight.detach().numpy().astype(np.float32, copy=True)
        item_emb = model.item_embedding.weight.detach().numpy().astype(np.float32, copy=True)
        metrics = dict(losses)
        metrics.update(evaluate(data, context, train_rows, held_out, user_emb, item_emb, model.ranker, cfg.eval_k))
    metrics["train_seconds"] = time.perf_counter() - started
    log.info("trained in %.1fs: %s", metrics["train_seconds"], _format_metrics(metrics))
    return TrainResult(item_emb, user_emb, model.ranker, spec, metrics)


def temporal_split(data: SyntheticData) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(training event rows, held-out rows): every user's latest event is held out, the rest train."""
    bounds = data.user_bounds()
    has_events = bounds[1:] > bounds[:-1]
    held_out = (bounds[1:] - 1)[has_events]
    mask = np.ones(data.n_events, dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask).astype(np.int64), held_out.astype(np.int64)


def evaluate(
    data: SyntheticData,
    context: npt.NDArray[np.float32],
    train_rows: npt.NDArray[np.int64],
    held_out: npt.NDArray[np.int64],
    user_emb: npt.NDArray[np.float32],
    item_emb: npt.NDArray[np.float32],
    ranker: Ranker,
    k: int = 20,
) -> dict[str, float]:
    """Hit rate@k of the held-out events for popularity, inner-product retrieval, and retrieval + ranker.

    The ranked variant re-orders the top EVAL_CANDIDATES retrieved items with
    the ranker in the held-out event's context, as the server does.
    """
    users = data.event_user[held_out]
    targets = data.event_item[held_out]
    popular = np.argsort(-np.bincount(data.event_item[train_rows], minlength=data.n_items), kind="stable")[:k]
    scores = torch.from_numpy(user_emb[users]) @ torch.from_numpy(item_emb).T
    n_candidates = min(EVAL_CANDIDATES, data.n_items)
    candidates = torch.topk(scores, n_candidates, dim=1).indices
    with torch.no_grad():
        ranked = ranker(
            torch.from_numpy(user_emb[users]),
            torch.from_numpy(context[held_out]),
            torch.from_numpy(item_emb)[candidates],
        )
    reordered = torch.gather(candidates, 1, torch.topk(ranked, min(k, n_candidates), dim=1).indices)
    return {
        f"hit_rate@{k}_popularity": float(np.isin(targets, popular).mean()),
        f"hit_rate@{k}_retrieval": _hit_rate(candidates[:, :k].numpy(), targets),
        f"hit_rate@{k}_ranked": _hit_rate(reordered.numpy(), targets),
        "eval_users": float(len(held_out)),
    }


def build_cold_start(
    data: SyntheticData,
    now_timestamp: float | None = None,
    global_size: int = GLOBAL_COLD_START_SIZE,
    segment_size: int = SEGMENT_COLD_START_SIZE,
) -> ColdStart:
    """Cold-start lists from the synthetic events at or before `now_timestamp` (default: the end of the data)."""
    now = float(data.end_time.timestamp()) if now_timestamp is None else now_timestamp
    rows = np.flatnonzero(data.event_ts <= now)
    return cold_start_from_events(
        data.item_ids,
        data.event_item[rows],
        data.event_device[rows],
        data.local_hours()[rows],
        global_size,
        segment_size,
    )


def cold_start_from_events(
    item_ids: Sequence[str],
    items: npt.NDArray[np.int64],
    devices: npt.NDArray[np.int64],
    local_hours: npt.NDArray[np.int64],
    global_size: int = GLOBAL_COLD_START_SIZE,
    segment_size: int = SEGMENT_COLD_START_SIZE,
) -> ColdStart:
    """Most popular items overall, per (device, daypart) and per device, scored by share of interactions.

    Arrays are aligned per event. Segment keys follow ColdStart's scheme:
    "device=mobile|daypart=evening" and "device=mobile", with the daypart of the local hour.
    """
    dayparts = np.array(_DAYPART_OF_HOUR)[local_hours]
    segments: dict[str, tuple[tuple[str, float], ...]] = {}
    for device in DeviceType:
        on_device = devices == device
        if not on_device.any():
            continue
        name = device.name.lower()
        segments[f"device={name}"] = top_items(item_ids, items[on_device], segment_size)
        for part in sorted(set(dayparts[on_device].tolist())):
            in_part = on_device & (dayparts == part)
            segments[f"device={name}|daypart={part}"] = top_items(item_ids, items[in_part], segment_size)
    return ColdStart(global_items=top_items(item_ids, items, global_size), segments=segments)


def build_profiles(
    data: SyntheticData, result: TrainResult, embedding_space: str, recent_items: int = 50
) -> dict[str, Profile]:
    """One profile per user with events: the trained user vector and the latest distinct items, newest first."""
    bounds = data.user_bounds()
    profiles: dict[str, Profile] = {}
    for user, user_id in enumerate(data.user_ids):
        lo, hi = int(bounds[user]), int(bounds[user + 1])
        if lo == hi:
            continue
        recent = recent_distinct(data.event_item[lo:hi], recent_items)
        profiles[user_id] = Profile(
            user_vector=result.user_embeddings[user].copy(),
            embedding_space=embedding_space,
            recent_items=tuple(data.item_ids[int(row)] for row in recent),
            updated_at=float(data.event_ts[hi - 1]),
        )
    return profiles


def train_and_publish(
    data: SyntheticData, repo: Path, model_name: str, config: TrainConfig | None = None
) -> PublishResult:
    """Train, export, check ONNX parity, and publish a new bundle version of `model_name` under `repo`.

    ParityError propagates and nothing is published when the export disagrees with PyTorch.
    """
    cfg = config or TrainConfig()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _stage(timings, "train"):
        result = train(data, cfg)
    context_dim = result.feature_spec.context_dim
    with _stage(timings, "export"):
        onnx_bytes = export_ranker_onnx(result.ranker, cfg.embedding_dim, context_dim)
    with _stage(timings, "parity"):
        diff = check_parity(
            result.ranker, onnx_bytes, cfg.embedding_dim, context_dim, tolerance=cfg.parity_tolerance, seed=cfg.seed
        )
    embedding_space = uuid.uuid4().hex
    with _stage(timings, "publish"):
        contents = BundleContents(
            model_name=model_name,
            item_ids=data.item_ids,
            item_embeddings=result.item_embeddings,
            ranker_onnx=onnx_bytes,
            feature_spec=result.feature_spec,
            cold_start=build_cold_start(data),
            index_params=IndexParams.choose(data.n_items, cfg.flat_threshold),
            embedding_space=embedding_space,
            training=training_metadata(data, cfg, result, diff),
            item_categories=[(data.category_names[c],) for c in data.item_category],
        )
        version_dir = publish_bundle(Path(repo), contents, progress.counter("index build", " vectors"))
    with _stage(timings, "profiles"):
        profiles = build_profiles(data, result, embedding_space, cfg.recent_items)
    timings["total"] = time.perf_counter() - started
    log.info("published %s in %.1fs (%s)", version_dir, timings["total"], _format_metrics(timings))
    return PublishResult(version_dir, result, profiles, embedding_space, diff, timings)


def training_metadata(data: SyntheticData, config: TrainConfig, result: TrainResult, parity: float) -> dict[str, Any]:
    """The manifest's `training` record: how the bundle was made, JSON-serialisable."""
    return {
        "trainer": __name__,
        "config": asdict(config),
        "data": {
            "source": "synthetic",
            "generator": asdict(data.config),
            "users": data.n_users,
            "items": data.n_items,
            "events": data.n_events,
        },
        "metrics": dict(result.metrics),
        "parity_max_abs_diff": parity,
        "seed": config.seed,
        "torch_version": torch.__version__,
    }


def _fit(
    model: JointModel,
    data: SyntheticData,
    context: npt.NDArray[np.float32],
    train_rows: npt.NDArray[np.int64],
    cfg: TrainConfig,
) -> dict[str, float]:
    """Minimise retrieval loss + ranking loss with Adam; return the last epoch's mean losses.

    Batches, their order and all negatives come from one numpy Generator seeded
    from the config, so a run is reproducible.
    """
    rng = np.random.default_rng(cfg.seed)
    users = torch.from_numpy(data.event_user)
    items = torch.from_numpy(data.event_item)
    contexts = torch.from_numpy(context)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    model.train()
    means = {"loss": float("nan"), "retrieval_loss": float("nan"), "ranking_loss": float("nan")}
    for epoch in range(cfg.epochs):
        totals = np.zeros(2)
        order = rng.permutation(train_rows)
        batches = range(0, len(order), cfg.batch_size)
        for start in batches:
            rows = torch.from_numpy(order[start : start + cfg.batch_size])
            shared = torch.from_numpy(rng.integers(0, data.n_items, cfg.retrieval_negatives))
            per_event = torch.from_numpy(rng.integers(0, data.n_items, (len(rows), cfg.negatives)))
            retrieval = model.retrieval_loss(users[rows], items[rows], shared)
            ranking = model.ranking_loss(users[rows], contexts[rows], items[rows], per_event)
            penalty = model.embedding_penalty(users[rows], items[rows])
            optimizer.zero_grad()
            torch.autograd.backward(retrieval + ranking + cfg.embedding_l2 * penalty)
            optimizer.step()
            totals += (retrieval.item(), ranking.item())
        totals /= max(1, len(batches))
        means = {"loss": float(totals.sum()), "retrieval_loss": float(totals[0]), "ranking_loss": float(totals[1])}
        log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, _format_metrics(means))
    return means


def _hit_rate(top: npt.NDArray[np.int64], targets: npt.NDArray[np.int64]) -> float:
    """Share of rows whose target is among that row's top items."""
    return float((top == targets[:, None]).any(axis=1).mean()) if len(targets) else 0.0


def top_items(item_ids: Sequence[str], items: npt.NDArray[np.int64], size: int) -> tuple[tuple[str, float], ...]:
    """The `size` most frequent items among `items` with their share of them, best first (ties: lower row)."""
    if len(items) == 0:
        return ()
    counts = np.bincount(items, minlength=len(item_ids))
    order = np.argsort(-counts, kind="stable")[:size]
    order = order[counts[order] > 0]
    return tuple((item_ids[int(row)], float(counts[row] / len(items))) for row in order)


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall-clock seconds the block takes under `name`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - started


def _format_metrics(values: Mapping[str, float]) -> str:
    """Compact `name=value` text for logs."""
    return " ".join(f"{name}={value:.4g}" for name, value in values.items())
