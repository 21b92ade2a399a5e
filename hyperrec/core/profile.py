"""The profile value objects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from hyperrec.core.domain import EventType

DEFAULT_HALF_LIFE_S = 14 * 86_400.0


@dataclass(frozen=True)
class CategoryAffinity:
    """Time-decayed engagement with one category: `weight` as of `at`, the unix time of its latest event."""

    weight: float
    at: float


@dataclass(frozen=True)
class Profile:
    """A user's live profile.

    user_vector: float32 [embedding_dim] in the embedding space named by
        `embedding_space` (a bundle's manifest field), or None.
    recent_items: item ids the user interacted with, most recent first; folded
        into a user vector when the stored one belongs to another embedding space.
    recent_weights: engagement weight of each recent item (empty: all 1.0).
    updated_at: unix seconds of the last write.
    categories: decayed affinity per item category (see hyperrec.core.behaviour).
    event_counts: events recorded per event type name ("click", "purchase", ...).
    last_seen: unix seconds of the user's latest event (0: none).
    interests: categories the user declared (onboarding), steering recommendations until events arrive.
    opted_out: the user withdrew consent to personalization; such a profile holds nothing else.
    """

    user_vector: np.ndarray | None = None
    embedding_space: str = ""
    recent_items: tuple[str, ...] = ()
    updated_at: float = 0.0
    recent_weights: tuple[float, ...] = ()
    categories: Mapping[str, CategoryAffinity] = field(default_factory=dict)
    event_counts: Mapping[str, int] = field(default_factory=dict)
    last_seen: float = 0.0
    interests: tuple[str, ...] = ()
    opted_out: bool = False

    def weights_of_recent(self) -> tuple[float, ...]:
        """One engagement weight per recent item."""
        if self.recent_weights:
            return self.recent_weights
        return (1.0,) * len(self.recent_items)


OPTED_OUT = Profile(opted_out=True)


@dataclass(frozen=True)
class StoredEvent:
    """A valid event as the profile stores take it: the user is implicit, the item's categories resolved.

    The stores hash `event_id` before keeping it for the dedupe window.
    """

    event_id: str
    item_id: str
    event_type: EventType
    weight: float
    at: float
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProfileSettings:
    """Store-wide settings of profile updates."""

    half_life_s: float = DEFAULT_HALF_LIFE_S
    recent_limit: int = 50
    ttl_s: int = 90 * 24 * 3600
    dedupe_window_s: int = 24 * 3600
