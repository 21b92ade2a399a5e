"""PyTorch models: item and user embeddings for retrieval, and the context-aware ranker.

Serving retrieves candidates by FAISS inner product between a user vector and
the item embeddings, then scores them with the ranker exported to ONNX. The two
parts are trained together in `JointModel` so the ranker works on exactly the
embeddings the server will hand it:

- `retrieval_loss` is a sampled softmax of the positive item against shared
  uniformly drawn negatives, scored by the plain inner product the index uses.
- `ranking_loss` is a sampled softmax of the ranker's score for the positive
  against per-event negatives scored *in that event's context*, which is what
  lets the ranker learn context effects (a negative is an item that was not
  chosen here and now, not merely by this user).

Negatives are drawn uniformly, so the sampled softmax needs no log-Q correction
and both losses estimate the full softmax over the catalogue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional

DEFAULT_HIDDEN: tuple[int, ...] = (64, 32)
EMBEDDING_INIT_STD = 0.1


class Ranker(nn.Module):
    """Scores candidate items for a user in a context; the ONNX ranker contract.

    forward(user [b, d], context [b, c], items [b, n, d]) -> scores [b, n]: an
    MLP over [u, v, u*v, ctx] for every candidate v, plus u·v as a residual so
    the ranker starts from (and only has to correct) the retrieval score.
    """

    def __init__(
        self, embedding_dim: int, context_dim: int, hidden: tuple[int, ...] = DEFAULT_HIDDEN, item_feature_dim: int = 0
    ) -> None:
        """Build the MLP: input 3·embedding_dim + context_dim (+ item features), ReLU hidden layers, one output."""
        super().__init__()
        self.embedding_dim = embedding_dim
        self.context_dim = context_dim
        self.item_feature_dim = item_feature_dim
        self.hidden = tuple(hidden)
        layers: list[nn.Module] = []
        width = 3 * embedding_dim + context_dim + item_feature_dim
        for size in self.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, user: Tensor, context: Tensor, items: Tensor, item_features: Tensor | None = None) -> Tensor:
        """Scores [b, n] for `items` [b, n, d] given `user` [b, d], `context` [b, c] and, when the ranker
        was built with item features, `item_features` [b, n, f]."""
        n = items.shape[1]
        u = user.unsqueeze(1).expand(-1, n, -1)
        ctx = context.unsqueeze(1).expand(-1, n, -1)
        interaction = u * items
        parts = [u, items, interaction, ctx]
        if self.item_feature_dim:
            if item_features is None:
                raise ValueError("this ranker needs item_features")
            parts.append(item_features)
        features = torch.cat(parts, dim=-1)
        mlp_score: Tensor = self.mlp(features).squeeze(-1)
        return mlp_score + interaction.sum(dim=-1)


class JointModel(nn.Module):
    """User and item embedding tables plus the ranker, trained with one combined loss."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        embedding_dim: int,
        context_dim: int,
        hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    ) -> None:
        """Create small-normal embedding tables and a fresh ranker."""
        super().__init__()
        self.user_embedding = nn.Embedding(n_users, embedding_dim)
        self.item_embedding = nn.Embedding(n_items, embedding_dim)
        nn.init.normal_(self.user_embedding.weight, std=EMBEDDING_INIT_STD)
        nn.init.normal_(self.item_embedding.weight, std=EMBEDDING_INIT_STD)
        self.ranker = Ranker(embedding_dim, context_dim, hidden)

    def retrieval_loss(self, users: Tensor, items: Tensor, negatives: Tensor) -> Tensor:
        """Sampled softmax of u·v_pos against u·v_neg for `negatives` [k] shared by the batch.

        A negative that happens to be the row's own positive is masked out.
        """
        u = self.user_embedding(users)
        pos = (u * self.item_embedding(items)).sum(dim=-1, keepdim=True)
        neg = u @ self.item_embedding(negatives).T
        neg = neg.masked_fill(negatives.unsqueeze(0) == items.unsqueeze(1), float("-inf"))
        return _first_is_target(torch.cat([pos, neg], dim=1))

    def ranking_loss(self, users: Tensor, context: Tensor, items: Tensor, negatives: Tensor) -> Tensor:
        """Sampled softmax of the ranker's score for the positive against per-event `negatives` [b, k]."""
        candidates = torch.cat([items.unsqueeze(1), negatives], dim=1)
        scores: Tensor = self.ranker(self.user_embedding(users), context, self.item_embedding(candidates))
        collision = torch.cat([torch.zeros_like(items, dtype=torch.bool).unsqueeze(1), negatives == items[:, None]], 1)
        return _first_is_target(scores.masked_fill(collision, float("-inf")))

    def embedding_penalty(self, users: Tensor, items: Tensor) -> Tensor:
        """Mean squared norm of the batch's user and item vectors (L2 weighted by how often rows are seen)."""
        u: Tensor = self.user_embedding(users)
        v: Tensor = self.item_embedding(items)
        return u.pow(2).sum(dim=-1).mean() + v.pow(2).sum(dim=-1).mean()


def _first_is_target(logits: Tensor) -> Tensor:
    """Mean cross-entropy when column 0 of every row holds the positive."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return functional.cross_entropy(logits, target)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` torch intra-op threads, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
