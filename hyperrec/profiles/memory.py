"""In-process profile store: the embedded default when no Redis URL is configured.

Profiles live in this process only and vanish with it. Keys are pseudonymised
exactly as in Redis so both stores behave the same.
"""

from __future__ import annotations

from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.model import Profile
from hyperrec.profiles.store import ProfileStore


class InMemoryProfileStore(ProfileStore):
    def __init__(self, pseudonymizer: Pseudonymizer, recent_limit: int = 50) -> None:
        self._pseudonymizer = pseudonymizer
        self._recent_limit = recent_limit
        self._profiles: dict[str, Profile] = {}

    async def get(self, user_id: str) -> Profile | None:
        return self._profiles.get(self._pseudonymizer.user_key(user_id))

    async def put(self, user_id: str, profile: Profile) -> None:
        trimmed = Profile(
            user_vector=None if profile.user_vector is None else profile.user_vector.astype("float32", copy=True),
            embedding_space=profile.embedding_space if profile.user_vector is not None else "",
            recent_items=profile.recent_items[: self._recent_limit],
            updated_at=profile.updated_at,
        )
        self._profiles[self._pseudonymizer.user_key(user_id)] = trimmed

    async def delete(self, user_id: str) -> bool:
        return self._profiles.pop(self._pseudonymizer.user_key(user_id), None) is not None

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._profiles)
