"""The profile store interface."""

from __future__ import annotations

import abc
from collections.abc import Mapping

from hyperrec.profiles.model import Profile


class ProfileStore(abc.ABC):
    """Reads and writes user profiles by raw user id; implementations pseudonymise keys.

    Failures of the backend raise `hyperrec.errors.ProfileStoreError`.
    """

    @abc.abstractmethod
    async def get(self, user_id: str) -> Profile | None:
        """The user's profile, or None when there is none. One round trip at most."""

    @abc.abstractmethod
    async def put(self, user_id: str, profile: Profile) -> None:
        """Replace the user's profile."""

    async def put_many(self, profiles: Mapping[str, Profile]) -> None:
        """Replace many profiles (backends override this to batch round trips)."""
        for user_id, profile in profiles.items():
            await self.put(user_id, profile)

    @abc.abstractmethod
    async def delete(self, user_id: str) -> bool:
        """Remove the user's profile; True when something was removed."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ProfileStoreError when the backend is unreachable."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""
