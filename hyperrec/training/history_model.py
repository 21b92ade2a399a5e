"""Retrieval on real interaction logs: a hybrid item tower and a fold-in user tower.

Item vector = id embedding + a projection of the item's categories (multi-hot),
so items without interactions still get a vector from their metadata.
User vector = the decayed, engagement-weighted average of the vectors of the user's
most recent distinct items (weight FOLD_IN_DECAY**i for the i-th most recent, times
the engagement weight of the item's latest event): exactly what the server folds
from a profile's recent items (`hyperrec.core.pipeline.fold_recent`), so training and
serving agree by construction and new events move the user at once.

Trained with a sampled softmax: each event's true item against the batch's other
items and a shared set of uniformly drawn items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from hyperrec.core.pipeline import FOLD_IN_DECAY
from hyperrec.training.behaviour_features import event_weights
from hyperrec.training.interactions import Interactions, ItemCatalog
from hyperrec.training.networks import torch_threads
from hyperrec.training.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalConfig:
    """Size and optimisation of the retrieval model."""

    embedding_dim: int = 64
    history: int = 50
    epochs: int = 12
    batch_size: int = 512
    learning_rate: float = 3e-3
    shared_negatives: int = 1024
    embedding_l2: float = 1e-4
    temperature: float = 0.1
    seed: int = 0
    threads: int = 2


def category_matrix(catalog: ItemCatalog) -> npt.NDArray[np.float32]:
    """Multi-hot categories per item, rows scaled to unit L2 norm (items without categories: zeros)."""
    vocab = {c: j for j, c in enumerate(catalog.category_vocabulary)}
    out = np.zeros((len(catalog), max(1, len(vocab))), dtype=np.float32)
    for row, cats in enumerate(catalog.categories):
        for c in cats:
            out[row, vocab[c]] = 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    scaled: npt.NDArray[np.float32] = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
    return scaled


class HybridItemTower(nn.Module):
    """Item vectors from ids and categories."""

    def __init__(self, categories: npt.NDArray[np.float32], dim: int) -> None:
        super().__init__()
        self.register_buffer("categories", torch.from_numpy(categories))
        self.ids = nn.Embedding(categories.shape[0], dim)
        nn.init.normal_(self.ids.weight, std=0.01)
        self.meta = nn.Linear(categories.shape[1], dim, bias=False)

    def forward(self, items: Tensor) -> Tensor:
        cats: Tensor = self.categories  # type: ignore[assignment]
        out: Tensor = self.ids(items) + self.meta(cats[items])
        return out

    def all_items(self) -> Tensor:
        return self.forward(torch.arange(self.ids.num_embeddings))


def fold_in(item_vectors: Tensor, history: Tensor, engagement: Tensor) -> Tensor:
    """User vectors from histories [b, L] of item indexes, newest first, -1 padded, and their engagement
    weights [b, L] (as the server does)."""
    mask = (history >= 0).float()
    weights = (FOLD_IN_DECAY ** torch.arange(history.shape[1], dtype=torch.float32)) * mask * engagement
    vectors = item_vectors[history.clamp(min=0)]
    total = weights.sum(dim=1, keepdim=True).clamp(min=1e-6)
    return (weights.unsqueeze(-1) * vectors).sum(dim=1) / total


Histories = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]


def event_histories(data: Interactions, length: int) -> Histories:
    """For each event, the user's previous distinct items, newest first, -1 padded: [events, length]; and the
    engagement weight of each item's latest event (0 in padding)."""
    weights = event_weights(data)
    out = np.full((len(data), length), -1, dtype=np.int64)
    out_w = np.zeros((len(data), length), dtype=np.float32)
    recent: dict[int, list[tuple[int, float]]] = {}
    for row in range(len(data)):
        user, item = int(data.user[row]), int(data.item[row])
        past = recent.setdefault(user, [])
        out[row, : len(past)] = [i for i, _ in past]
        out_w[row, : len(past)] = [w for _, w in past]
        past[:] = [entry for entry in past if entry[0] != item]
        past.insert(0, (item, float(weights[row])))
        del past[length:]
    return out, out_w


def recent_distinct(items_in_time_order: npt.NDArray[np.int64], length: int) -> npt.NDArray[np.int64]:
    """The last `length` distinct items of one user's events, newest first (what a profile's recent list holds)."""
    newest_first = items_in_time_order[::-1]
    _, first = np.unique(newest_first, return_index=True)
    distinct: npt.NDArray[np.int64] = newest_first[np.sort(first)][:length]
    return distinct


def latest_histories(data: Interactions, length: int) -> Histories:
    """Each user's last distinct items at the end of `data`, newest first, -1 padded: [users, length]; and the
    engagement weight of each item's latest event."""
    weights = event_weights(data)
    out = np.full((data.n_users, length), -1, dtype=np.int64)
    out_w = np.zeros((data.n_users, length), dtype=np.float32)
    order = np.argsort(data.user, kind="stable")  # per user, in log (time) order
    bounds = np.searchsorted(data.user[order], np.arange(data.n_users + 1))
    for user in range(data.n_users):
        rows = order[bounds[user] : bounds[user + 1]][::-1]  # newest first
        seen: set[int] = set()
        slot = 0
        for row in rows:
            item = int(data.item[row])
            if item in seen:
                continue
            seen.add(item)
            out[user, slot], out_w[user, slot] = item, weights[row]
            slot += 1
            if slot == length:
                break
    return out, out_w


@dataclass(frozen=True)
class RetrievalModel:
    """Trained item vectors (float32 [items, dim]) and the training curve."""

    item_vectors: npt.NDArray[np.float32]
    losses: tuple[float, ...]

    def user_vectors(self, histories: Histories) -> npt.NDArray[np.float32]:
        items, weights = histories
        with torch.no_grad():
            vecs = fold_in(torch.from_numpy(self.item_vectors), torch.from_numpy(items), torch.from_numpy(weights))
        return vecs.numpy().astype(np.float32)


def train_retrieval(train: Interactions, config: RetrievalConfig | None = None) -> RetrievalModel:
    """Fit the hybrid item tower so that fold-in of each event's history scores its item highest."""
    cfg = config or RetrievalConfig()
    histories, weights = event_histories(train, cfg.history)
    usable = np.flatnonzero(histories[:, 0] >= 0)  # events with at least one earlier item
    rng = np.random.default_rng(cfg.seed)
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = HybridItemTower(category_matrix(train.catalog), cfg.embedding_dim)
        losses = _fit(tower, train, (histories, weights), usable, cfg, rng)
        with torch.no_grad():
            vectors = tower.all_items().numpy().astype(np.float32)
    return RetrievalModel(vectors, tuple(losses))


def _fit(
    tower: HybridItemTower,
    train: Interactions,
    histories: Histories,
    usable: npt.NDArray[np.int64],
    cfg: RetrievalConfig,
    rng: np.random.Generator,
) -> list[float]:
    optimizer = torch.optim.Adam(tower.parameters(), lr=cfg.learning_rate)
    hist_t = torch.from_numpy(histories[0])
    weight_t = torch.from_numpy(histories[1])
    items_t = torch.from_numpy(train.item)
    losses: list[float] = []
    for epoch in progress(range(cfg.epochs), "retrieval epochs", unit=" epochs"):
        order = rng.permutation(usable)
        total, batches = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            rows = torch.from_numpy(order[start : start + cfg.batch_size])
            positives = items_t[rows]
            shared = torch.from_numpy(rng.integers(0, train.n_items, cfg.shared_negatives))
            candidates = torch.cat([positives, shared])
            needed = torch.unique(torch.cat([candidates, hist_t[rows].flatten().clamp(min=0)]))
            table = torch.zeros(train.n_items, cfg.embedding_dim)
            table[needed] = tower(needed)
            users = fold_in(table, hist_t[rows], weight_t[rows])
            logits = users @ table[candidates].T / cfg.temperature
            # A batch item equal to the positive is not a negative.
            same = positives.unsqueeze(1) == candidates.unsqueeze(0)
            same[torch.arange(len(rows)), torch.arange(len(rows))] = False
            logits = logits.masked_fill(same, float("-inf"))
            loss = nn.functional.cross_entropy(logits, torch.arange(len(rows)))
            loss = loss + cfg.embedding_l2 * table[needed].pow(2).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.item())
            batches += 1
        losses.append(total / max(1, batches))
        log.info("retrieval epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    return losses
