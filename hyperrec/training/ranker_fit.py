"""Train the context-aware ranker on retrieved candidates, with early stopping on validation NDCG.

For recent train events, the fold-in user vector retrieves the top candidates
(the user's history excluded); the ranker learns to put the true item above hard
negatives drawn from those candidates, in the event's context. After every epoch
the two-stage pipeline is scored on the validation split; the best epoch wins.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from hyperrec.core.features import FeatureSpec, assign_segments
from hyperrec.core.pipeline import fold_in
from hyperrec.training.baselines import evaluate_recommender
from hyperrec.training.behaviour_features import BehaviourFeatures, replay_states
from hyperrec.training.history_model import event_histories
from hyperrec.training.interactions import Interactions
from hyperrec.training.item_features import ItemFeatureSpec, ItemHistory
from hyperrec.training.networks import DEFAULT_HIDDEN, Ranker
from hyperrec.training.progress import progress
from hyperrec.training.two_stage import ScoreFn, TwoStageRecommender, context_matrix

log = logging.getLogger(__name__)

EXAMPLE_BLOCK = 1024  # events whose candidate scores are held in memory at once


@dataclass(frozen=True)
class RankerConfig:
    """Ranker size, data and optimisation."""

    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    events: int = 20_000
    candidates: int = 500  # the server's default `candidates`: train and evaluate the ranker on what is served
    hard_negatives: int = 20
    epochs: int = 10
    patience: int = 2
    batch_size: int = 256
    learning_rate: float = 1e-3
    history: int = 50
    seed: int = 0


@dataclass(frozen=True)
class RankerFit:
    """The best ranker and its validation curve (NDCG@10 of the two-stage pipeline per epoch).

    best_epoch 0 means no trained epoch beat retrieval order on validation, so the published ranker keeps it.
    """

    ranker: Ranker
    best_epoch: int
    validation_ndcg: tuple[float, ...]
    retrieval_validation_ndcg: float


def start_from_retrieval_order(ranker: Ranker) -> None:
    """Zero the MLP's output layer: the ranker then scores exactly u·v (its residual), the retrieval order."""
    last = ranker.mlp[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def torch_scorer(ranker: Ranker) -> ScoreFn:
    """A PyTorch ranker as a numpy scoring function with the ONNX contract."""

    def score(
        user: np.ndarray, context: np.ndarray, items: np.ndarray, item_features: np.ndarray | None = None
    ) -> np.ndarray:
        tensors = [torch.from_numpy(a) for a in (user, context, items)]
        if item_features is not None:
            tensors.append(torch.from_numpy(item_features))
        with torch.no_grad():
            out = ranker(*tensors)
        return np.asarray(out.numpy(), dtype=np.float32)

    return score


@dataclass(frozen=True)
class RankerExamples:
    """Per training event: user vector, context, [positive, hard negatives...] item indexes and, when the
    ranker takes them, those items' features as of the event's time."""

    users: npt.NDArray[np.float32]
    contexts: npt.NDArray[np.float32]
    items: npt.NDArray[np.int64]
    item_features: npt.NDArray[np.float32] | None = None


def build_examples(
    train: Interactions,
    item_vectors: np.ndarray,
    spec: FeatureSpec,
    cfg: RankerConfig,
    rng: np.random.Generator,
    item_spec: ItemFeatureSpec | None = None,
    segments: np.ndarray | None = None,
    behaviour: BehaviourFeatures | None = None,
) -> RankerExamples:
    """Hard-negative examples from the most recent train events that have a history.

    Candidates are retrieved for blocks of events so memory stays bounded whatever the catalogue size.
    """
    histories, weights = event_histories(train, cfg.history)
    rows = np.flatnonzero(histories[:, 0] >= 0)[-cfg.events :]
    users = fold_in(item_vectors, histories[rows], engagement=weights[rows])
    positives = train.item[rows]
    negatives = np.empty((len(rows), cfg.hard_negatives), dtype=np.int64)
    n = min(cfg.candidates, item_vectors.shape[0] - 1)
    for start in range(0, len(rows), EXAMPLE_BLOCK):
        block = slice(start, start + EXAMPLE_BLOCK)
        scores = users[block] @ item_vectors.T
        for i, row in enumerate(rows[block]):
            scores[i, histories[row][histories[row] >= 0]] = -np.inf
        scores[np.arange(len(scores)), positives[block]] = -np.inf  # never a negative of itself
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        picks = np.argsort(rng.random(top.shape), axis=1)[:, : cfg.hard_negatives]
        negatives[block] = np.take_along_axis(top, picks, axis=1)
    items = np.concatenate([positives[:, None], negatives], axis=1)
    parts = []
    if item_spec is not None:
        times = np.repeat(train.timestamp[rows], items.shape[1])
        flat = item_spec.at(ItemHistory(train), items.reshape(-1), times)
        parts.append(flat.reshape(items.shape[0], items.shape[1], item_spec.width))
    if behaviour is not None:
        affinity, last_at = replay_states(train, behaviour.columns, behaviour.half_life_s, rows)
        parts.append(behaviour.features(affinity, last_at, train.timestamp[rows].astype(np.float64), items))
    features = np.concatenate(parts, axis=2) if parts else None
    segment_of = None if segments is None else assign_segments(segments, users)
    return RankerExamples(users, context_matrix(train.timestamp[rows], spec, segment_of), items, features)


def fit_ranker(
    train: Interactions,
    validation: Interactions | None,
    item_vectors: npt.NDArray[np.float32],
    spec: FeatureSpec,
    config: RankerConfig | None = None,
    item_spec: ItemFeatureSpec | None = None,
    segments: np.ndarray | None = None,
    behaviour: BehaviourFeatures | None = None,
) -> RankerFit:
    """Train with softmax over [positive, hard negatives]; keep the epoch with the best validation NDCG@10.

    Without `validation` (the final fit on train + validation) it trains exactly `epochs` epochs; 0 keeps the
    untrained ranker, which scores in retrieval order.
    """
    cfg = config or RankerConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    examples = build_examples(train, item_vectors, spec, cfg, rng, item_spec, segments, behaviour)
    width = (item_spec.width if item_spec else 0) + (behaviour.width if behaviour else 0)
    ranker = Ranker(spec.embedding_dim, spec.context_dim, cfg.hidden, width)
    start_from_retrieval_order(ranker)
    optimizer = torch.optim.Adam(ranker.parameters(), lr=cfg.learning_rate)
    vectors = torch.from_numpy(item_vectors)
    if validation is None:
        for _ in progress(range(cfg.epochs), "ranker epochs", unit=" epochs"):
            _train_epoch(ranker, optimizer, examples, vectors, rng, cfg.batch_size)
        ranker.eval()
        return RankerFit(ranker, cfg.epochs, (), float("nan"))
    baseline = _validation_ndcg(None, train, validation, item_vectors, spec, cfg, item_spec, segments, behaviour)
    # Epoch 0 is the untrained ranker, which keeps retrieval order: a ranker that never beats it is not kept.
    best_state, best_score, best_epoch, curve = copy.deepcopy(ranker.state_dict()), baseline, 0, []
    for epoch in progress(range(1, cfg.epochs + 1), "ranker epochs", unit=" epochs"):
        _train_epoch(ranker, optimizer, examples, vectors, rng, cfg.batch_size)
        ranker.eval()
        score = _validation_ndcg(ranker, train, validation, item_vectors, spec, cfg, item_spec, segments, behaviour)
        curve.append(score)
        log.info("ranker epoch %d: validation ndcg@10 %.4f (retrieval alone %.4f)", epoch, score, baseline)
        if score > best_score:
            best_state, best_score, best_epoch = copy.deepcopy(ranker.state_dict()), score, epoch
        elif epoch - max(best_epoch, 1) >= cfg.patience:
            break
    ranker.load_state_dict(best_state)
    ranker.eval()
    return RankerFit(ranker, best_epoch, tuple(curve), baseline)


def _train_epoch(
    ranker: Ranker,
    optimizer: torch.optim.Optimizer,
    examples: RankerExamples,
    vectors: torch.Tensor,
    rng: np.random.Generator,
    batch_size: int,
) -> None:
    """One pass over the examples in random order: softmax of the positive against its hard negatives."""
    ranker.train()
    order = rng.permutation(len(examples.items))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = [
            torch.from_numpy(examples.users[rows]),
            torch.from_numpy(examples.contexts[rows]),
            vectors[torch.from_numpy(examples.items[rows])],
        ]
        if examples.item_features is not None:
            inputs.append(torch.from_numpy(examples.item_features[rows]))
        scores = ranker(*inputs)
        loss = nn.functional.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def _validation_ndcg(
    ranker: Ranker | None,
    train: Interactions,
    validation: Interactions,
    item_vectors: npt.NDArray[np.float32],
    spec: FeatureSpec,
    cfg: RankerConfig,
    item_spec: ItemFeatureSpec | None,
    segments: np.ndarray | None,
    behaviour: BehaviourFeatures | None,
) -> float:
    score = torch_scorer(ranker) if ranker is not None else None
    features = item_spec.matrix if item_spec is not None else None
    model = TwoStageRecommender(
        "validation",
        item_vectors,
        spec,
        score,
        cfg.candidates,
        cfg.history,
        item_features=features,
        segments=segments,
        behaviour=behaviour,
    )
    model.fit(train)
    return float(evaluate_recommender(model, train, validation, ks=(10,))["ndcg@10"])
