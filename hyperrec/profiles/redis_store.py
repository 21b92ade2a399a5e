"""Redis profile store (redis.asyncio with the hiredis parser).

Schema (docs/profiles.md): per user, a hash `hr:{<hmac>}:profile` and a list
`hr:{<hmac>}:recent`, both with a TTL. A read is one non-transactional
pipeline (HGETALL + LRANGE): one round trip. A write is one MULTI/EXEC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

from hyperrec.errors import ProfileStoreError
from hyperrec.profiles.keys import Pseudonymizer, decode_profile, encode_profile_hash, profile_key, recent_key
from hyperrec.profiles.model import Profile
from hyperrec.profiles.store import ProfileStore


@dataclass(frozen=True)
class RedisStoreOptions:
    """Connection and data settings for the Redis store."""

    url: str
    connect_timeout_s: float = 0.2
    read_timeout_s: float = 0.1
    ttl_s: int = 90 * 24 * 3600
    recent_limit: int = 50
    max_connections: int = 64


class RedisProfileStore(ProfileStore):
    """Profiles in Redis. Construction does no I/O; the first command connects."""

    def __init__(self, options: RedisStoreOptions, pseudonymizer: Pseudonymizer) -> None:
        self._options = options
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

    async def get(self, user_id: str) -> Profile | None:
        key = self._pseudonymizer.user_key(user_id)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(profile_key(key))
                pipe.lrange(recent_key(key), 0, self._options.recent_limit - 1)
                fields, recent = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ProfileStoreError(f"redis read failed: {type(exc).__name__}") from exc
        try:
            return decode_profile(fields, recent)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProfileStoreError(f"stored profile is malformed: {exc}") from exc

    def _queue_put(self, pipe: redis.client.Pipeline, user_id: str, profile: Profile) -> None:
        key = self._pseudonymizer.user_key(user_id)
        pkey, rkey = profile_key(key), recent_key(key)
        pipe.delete(pkey, rkey)
        pipe.hset(pkey, mapping=encode_profile_hash(profile))  # type: ignore[arg-type]
        recent = list(profile.recent_items[: self._options.recent_limit])
        if recent:
            pipe.rpush(rkey, *recent)
            pipe.expire(rkey, self._options.ttl_s)
        pipe.expire(pkey, self._options.ttl_s)

    async def put(self, user_id: str, profile: Profile) -> None:
        await self.put_many({user_id: profile})

    async def put_many(self, profiles: Mapping[str, Profile]) -> None:
        """Each user's keys are replaced atomically (MULTI/EXEC), many users per round trip."""
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for user_id, profile in profiles.items():
                    self._queue_put(pipe, user_id, profile)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ProfileStoreError(f"redis write failed: {type(exc).__name__}") from exc

    async def delete(self, user_id: str) -> bool:
        key = self._pseudonymizer.user_key(user_id)
        try:
            removed = await self._client.delete(profile_key(key), recent_key(key))
        except (RedisError, OSError) as exc:
            raise ProfileStoreError(f"redis delete failed: {type(exc).__name__}") from exc
        return bool(removed)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise ProfileStoreError(f"redis unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()
