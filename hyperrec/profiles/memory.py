"""In-process profile store: the embedded default when no Redis URL is configured.

Profiles live in this process only and vanish with it (the TTL is not applied: they die
with the process first). Keys are pseudonymised exactly as in Redis, and updates apply
`hyperrec.core.behaviour.apply_events`, so both stores behave the same.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from hyperrec.core.behaviour import apply_events
from hyperrec.core.profile import OPTED_OUT, Profile, ProfileSettings, StoredEvent
from hyperrec.core.profile_store import ProfileStore, RecordOutcome
from hyperrec.profiles.keys import Pseudonymizer


class InMemoryProfileStore(ProfileStore):
    def __init__(self, pseudonymizer: Pseudonymizer, settings: ProfileSettings | None = None) -> None:
        self._pseudonymizer = pseudonymizer
        self.settings = settings or ProfileSettings()
        self._profiles: dict[str, Profile] = {}
        self._seq: dict[str, int] = {}
        self._seen_events: dict[str, dict[str, float]] = {}  # user key -> hashed event id -> arrival
        self._opted_out: set[str] = set()
        # One counter for all users and all time: a profile erased and made again never repeats a number.
        self._next_seq = itertools.count(1)

    async def get(self, user_id: str) -> Profile | None:
        key = self._pseudonymizer.user_key(user_id)
        if key in self._opted_out:
            return OPTED_OUT
        return self._profiles.get(key)

    def _trimmed(self, profile: Profile) -> Profile:
        limit = self.settings.recent_limit
        vector = profile.user_vector
        return replace(
            profile,
            user_vector=None if vector is None else np.array(vector, dtype=np.float32),
            embedding_space=profile.embedding_space if vector is not None else "",
            recent_items=profile.recent_items[:limit],
            recent_weights=profile.weights_of_recent()[:limit],
            categories=dict(profile.categories),
            event_counts=dict(profile.event_counts),
            opted_out=False,
        )

    async def put_many(self, profiles: Mapping[str, Profile]) -> int:
        written = 0
        for user_id, profile in profiles.items():
            key = self._pseudonymizer.user_key(user_id)
            if key in self._opted_out:
                continue
            self._profiles[key] = self._trimmed(profile)
            self._seq[key] = next(self._next_seq)
            written += 1
        return written

    async def record(self, user_id: str, events: Sequence[StoredEvent]) -> RecordOutcome:
        key = self._pseudonymizer.user_key(user_id)
        if key in self._opted_out:
            return RecordOutcome(opted_out=True, fresh=(False,) * len(events), profile=None, seq=0)
        now = time.time()
        seen = self._seen_events.setdefault(key, {})
        for event_key in [k for k, at in seen.items() if at < now - self.settings.dedupe_window_s]:
            del seen[event_key]
        fresh = []
        for event in events:
            event_key = self._pseudonymizer.event_key(event.event_id)
            fresh.append(event_key not in seen)
            seen.setdefault(event_key, now)
        stored = [event for event, is_new in zip(events, fresh, strict=True) if is_new]
        if stored:
            updated = apply_events(self._profiles.get(key), stored, self.settings)
            self._profiles[key] = replace(updated, updated_at=now)
            self._seq[key] = next(self._next_seq)
        return RecordOutcome(False, tuple(fresh), self._profiles.get(key), self._seq.get(key, 0))

    async def set_vector(self, user_id: str, vector: np.ndarray, embedding_space: str, seq: int) -> bool:
        key = self._pseudonymizer.user_key(user_id)
        profile = self._profiles.get(key)
        if profile is None or key in self._opted_out or self._seq.get(key, 0) != seq:
            return False
        self._profiles[key] = replace(
            profile, user_vector=np.array(vector, dtype=np.float32), embedding_space=embedding_space
        )
        return True

    async def set_interests(self, user_id: str, interests: Sequence[str]) -> bool:
        key = self._pseudonymizer.user_key(user_id)
        if key in self._opted_out:
            return False
        updated = replace(self._profiles.get(key) or Profile(), interests=tuple(interests))
        if _holds_nothing(updated):  # as in Redis, where an emptied hash disappears
            self._profiles.pop(key, None)
        else:
            self._profiles[key] = updated
        return True

    async def set_consent(self, user_id: str, personalization: bool) -> bool:
        key = self._pseudonymizer.user_key(user_id)
        if personalization:
            self._opted_out.discard(key)
            return False
        existed = self._drop(key)
        self._opted_out.add(key)
        return bool(existed)

    def _drop(self, key: str) -> list[str]:
        kinds = []
        profile = self._profiles.pop(key, None)
        if profile is not None:
            kinds += ["profile", "recent_items"] if profile.recent_items else ["profile"]
        self._seq.pop(key, None)
        if self._seen_events.pop(key, None):
            kinds.append("event_ids")
        return kinds

    async def forget(self, user_id: str) -> tuple[str, ...]:
        key = self._pseudonymizer.user_key(user_id)
        kinds = self._drop(key)
        if key in self._opted_out:
            self._opted_out.discard(key)
            kinds.append("consent")
        return tuple(kinds)

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._profiles)


def _holds_nothing(profile: Profile) -> bool:
    return (
        profile.user_vector is None
        and not profile.recent_items
        and not profile.categories
        and not profile.event_counts
        and not profile.interests
        and profile.last_seen == 0.0
        and profile.updated_at == 0.0
    )
