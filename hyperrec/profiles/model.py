"""The profile value object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Profile:
    """A user's live profile.

    user_vector: float32 [embedding_dim] in the embedding space named by
        `embedding_space` (a bundle's manifest field), or None.
    recent_items: item ids the user interacted with, most recent first; used to
        fold a user vector into a bundle whose embedding space differs.
    updated_at: unix seconds of the last update.
    """

    user_vector: np.ndarray | None = None
    embedding_space: str = ""
    recent_items: tuple[str, ...] = ()
    updated_at: float = 0.0
