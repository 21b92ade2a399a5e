"""The profile store interface."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hyperrec.core.profile import Profile, ProfileSettings, StoredEvent


@dataclass(frozen=True)
class RecordOutcome:
    """What a store did with one user's events.

    opted_out: the user withdrew consent; nothing was stored.
    fresh: per event, True when stored, False when its id was already seen within the dedupe window.
    profile: the profile after the update (None when opted out).
    seq: the profile's update counter after the update; `set_vector` only writes while it is unchanged.
    """

    opted_out: bool
    fresh: tuple[bool, ...]
    profile: Profile | None
    seq: int


class ProfileStore(abc.ABC):
    """Reads and writes user profiles by raw user id; implementations pseudonymise keys.

    Every write applies `settings` (TTL, recent items cap, affinity half-life, dedupe window) and refuses
    to create data for a user who opted out. Failures of the backend raise
    `hyperrec.core.errors.ProfileStoreError`.
    """

    settings: ProfileSettings

    @abc.abstractmethod
    async def get(self, user_id: str) -> Profile | None:
        """The user's profile, `OPTED_OUT` when the user opted out (nothing else is read), or None.
        One round trip at most."""

    @abc.abstractmethod
    async def put_many(self, profiles: Mapping[str, Profile]) -> int:
        """Replace many users' profiles (seeding, backfill); users who opted out are skipped.
        Returns how many were written."""

    async def put(self, user_id: str, profile: Profile) -> bool:
        """Replace one user's profile; False when the user opted out."""
        return await self.put_many({user_id: profile}) == 1

    @abc.abstractmethod
    async def record(self, user_id: str, events: Sequence[StoredEvent]) -> RecordOutcome:
        """Apply one user's events atomically, dropping event ids already seen within the dedupe window."""

    @abc.abstractmethod
    async def set_vector(self, user_id: str, vector: np.ndarray, embedding_space: str, seq: int) -> bool:
        """Store a refolded user vector unless the profile changed since update `seq`; True when written."""

    @abc.abstractmethod
    async def set_interests(self, user_id: str, interests: Sequence[str]) -> bool:
        """Store the user's declared interests (replacing earlier ones); False when the user opted out."""

    @abc.abstractmethod
    async def set_consent(self, user_id: str, personalization: bool) -> bool:
        """Opt out (delete every profile key, remember the choice) or back in (forget the choice).
        Returns True when an opt-out deleted profile data."""

    @abc.abstractmethod
    async def forget(self, user_id: str) -> tuple[str, ...]:
        """Erase every key of the user, the consent record included; returns the kinds that existed."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ProfileStoreError when the backend is unreachable."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""
