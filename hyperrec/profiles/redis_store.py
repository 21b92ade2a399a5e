"""Redis profile store (redis.asyncio with the hiredis parser).

Schema (docs/profiles.md): per user, keys `hr:{<hmac>}:profile|recent|events|optout`.
Every read and update is one Lua script over one user's keys (hyperrec/profiles/scripts.py):
atomic per user, one round trip, and a user who opted out is never read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from hyperrec.core.errors import ProfileStoreError, ProfileStoreTimeout
from hyperrec.core.profile import OPTED_OUT, Profile, ProfileSettings, StoredEvent
from hyperrec.core.profile_store import ProfileStore, RecordOutcome
from hyperrec.profiles import scripts
from hyperrec.profiles.keys import (
    INTEREST_SEPARATOR,
    Pseudonymizer,
    decode_profile,
    encode_profile_hash,
    encode_recent,
    encode_vector,
    format_float,
    user_keys,
)


@dataclass(frozen=True)
class RedisStoreOptions:
    """Connection settings of the Redis store, and the profile settings it applies."""

    url: str
    connect_timeout_s: float = 0.2
    read_timeout_s: float = 0.1
    max_connections: int = 64
    settings: ProfileSettings = field(default_factory=ProfileSettings)


Arg = bytes | str | int | float


def _decode(flat_hash: list[bytes], recent: list[bytes]) -> Profile | None:
    fields = dict(zip(flat_hash[::2], flat_hash[1::2], strict=True))
    try:
        return decode_profile(fields, recent)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileStoreError(f"stored profile is malformed: {exc}") from exc


def _failure(action: str, exc: BaseException) -> ProfileStoreError:
    """The store error for a failed command: a ProfileStoreTimeout when one of the client's own timers ran out
    (the socket read timeout, or the pool's wait for a free connection, which redis-py reports as a
    ConnectionError caused by a TimeoutError), since those fire late when the event loop is late."""
    message = f"redis {action} failed: {type(exc).__name__}"
    if isinstance(exc, RedisTimeout | TimeoutError) or isinstance(exc.__cause__, TimeoutError):
        return ProfileStoreTimeout(message)
    return ProfileStoreError(message)


class RedisProfileStore(ProfileStore):
    """Profiles in Redis. Construction does no I/O; the first command connects."""

    def __init__(self, options: RedisStoreOptions, pseudonymizer: Pseudonymizer) -> None:
        self._options = options
        self.settings = options.settings
        self._pseudonymizer = pseudonymizer
        # A blocking pool: a burst beyond max_connections waits for a free connection (bounded by the
        # request's profile budget) instead of failing at once.
        pool = redis.BlockingConnectionPool.from_url(
            options.url,
            socket_connect_timeout=options.connect_timeout_s,
            socket_timeout=options.read_timeout_s,
            max_connections=options.max_connections,
            timeout=options.read_timeout_s,
            decode_responses=False,
        )
        self._client = redis.Redis(connection_pool=pool)
        self._read = self._client.register_script(scripts.READ)
        self._record = self._client.register_script(scripts.RECORD)
        self._set_vector = self._client.register_script(scripts.SET_VECTOR)
        self._set_interests = self._client.register_script(scripts.SET_INTERESTS)
        self._put = self._client.register_script(scripts.PUT)
        self._opt_out = self._client.register_script(scripts.OPT_OUT)

    def _keys(self, user_id: str) -> list[str]:
        return list(user_keys(self._pseudonymizer.user_key(user_id)).values())

    async def get(self, user_id: str) -> Profile | None:
        try:
            reply = await self._read(keys=self._keys(user_id), args=[self.settings.recent_limit])
        except (RedisError, OSError) as exc:
            raise _failure("read", exc) from exc
        if reply[0] == 1:
            return OPTED_OUT
        return _decode(reply[1], reply[2])

    def _put_args(self, profile: Profile) -> list[Arg]:
        fields = encode_profile_hash(profile)
        args: list[Arg] = [self.settings.ttl_s, len(fields)]
        for name, value in fields.items():
            args += [name, value]
        limit = self.settings.recent_limit
        items, weights = profile.recent_items[:limit], profile.weights_of_recent()[:limit]
        args += [encode_recent(item, weight) for item, weight in zip(items, weights, strict=True)]
        return args

    async def put_many(self, profiles: Mapping[str, Profile]) -> int:
        """One script per user (atomic per user), all in one non-transactional pipeline: one round trip."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id, profile in profiles.items():
                    await self._put(keys=self._keys(user_id), args=self._put_args(profile), client=pipe)
                written = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _failure("write", exc) from exc
        return sum(int(w) for w in written)

    async def record(self, user_id: str, events: Sequence[StoredEvent]) -> RecordOutcome:
        s = self.settings
        args: list[Arg] = [format_float(time.time()), format_float(s.half_life_s), s.ttl_s, s.recent_limit]
        args += [s.dedupe_window_s, len(events)]
        for e in events:
            args += [self._pseudonymizer.event_key(e.event_id), e.item_id, e.event_type.name.lower()]
            args += [format_float(e.weight), format_float(e.at), len(e.categories), *e.categories]
        try:
            reply = await self._record(keys=self._keys(user_id), args=args)
        except (RedisError, OSError) as exc:
            raise _failure("update", exc) from exc
        if reply[0] == -1:
            return RecordOutcome(opted_out=True, fresh=(False,) * len(events), profile=None, seq=0)
        return RecordOutcome(False, tuple(bool(f) for f in reply[1]), _decode(reply[2], reply[3]), int(reply[0]))

    async def set_vector(self, user_id: str, vector: np.ndarray, embedding_space: str, seq: int) -> bool:
        args: list[Arg] = [seq, encode_vector(vector), embedding_space.encode("utf-8")]
        try:
            return bool(await self._set_vector(keys=self._keys(user_id), args=args))
        except (RedisError, OSError) as exc:
            raise _failure("update", exc) from exc

    async def set_interests(self, user_id: str, interests: Sequence[str]) -> bool:
        args: list[Arg] = [self.settings.ttl_s, INTEREST_SEPARATOR.join(interests).encode("utf-8")]
        try:
            return bool(await self._set_interests(keys=self._keys(user_id), args=args))
        except (RedisError, OSError) as exc:
            raise _failure("update", exc) from exc

    async def set_consent(self, user_id: str, personalization: bool) -> bool:
        keys = self._keys(user_id)
        try:
            if personalization:
                await self._client.delete(keys[3])
                return False
            return int(await self._opt_out(keys=keys)) > 0
        except (RedisError, OSError) as exc:
            raise _failure("consent update", exc) from exc

    async def forget(self, user_id: str) -> tuple[str, ...]:
        kinds = user_keys(self._pseudonymizer.user_key(user_id))
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for key in kinds.values():
                    pipe.delete(key)
                removed = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _failure("erase", exc) from exc
        return tuple(kind for kind, count in zip(kinds, removed, strict=True) if count)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise ProfileStoreError(f"redis unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()
