"""Optional top-N cache: a personalized answer reused for the same user, profile, context segment and model
version within a TTL.

The key holds a fingerprint of what the answer was computed from: the profile's contents (vector, recent items
and their weights, category affinities, declared interests), the model version, the context segment (device,
surface, daypart, country, free-form features), k and the exclusions. So a user's new event (which changes the
profile, on any replica) and a model swap (a new version) make the old entry unreachable at once, with no
invalidation messages between replicas; the TTL bounds what nothing in the key sees (affinities decay with time,
the local hour moves within a daypart). A hit skips retrieval and ranking, not the profile read.

Only ranked personalized answers (strategies PERSONALIZED and INTERESTS) are cached; everything else is cheap to
recompute or must not be kept (degraded, unranked). The cache lives in this process and is used from the event
loop only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from cachetools import TTLCache

from hyperrec.core import metrics
from hyperrec.core.domain import RecommendRequest, ScoredItem, Strategy
from hyperrec.core.features import daypart
from hyperrec.core.profile import Profile

CACHED_STRATEGIES = frozenset({Strategy.PERSONALIZED, Strategy.INTERESTS})


@dataclass(frozen=True)
class CacheSettings:
    ttl_s: float = 0.0  # 0: no cache
    max_entries: int = 100_000


@dataclass(frozen=True)
class Cached:
    items: tuple[ScoredItem, ...]
    strategy: Strategy


def profile_fingerprint(profile: Profile | None) -> bytes:
    """A digest of every profile field a recommendation is computed from."""
    digest = hashlib.blake2b(digest_size=16)
    if profile is None:
        return digest.digest()
    if profile.user_vector is not None:
        digest.update(np.ascontiguousarray(profile.user_vector, dtype=np.float32).tobytes())
    parts = (
        profile.embedding_space,
        "\x1f".join(profile.recent_items),
        ",".join(f"{w:.6g}" for w in profile.recent_weights),
        "\x1f".join(f"{name}={a.weight:.6g}@{a.at:.0f}" for name, a in sorted(profile.categories.items())),
        "\x1f".join(profile.interests),
    )
    digest.update("\x1e".join(parts).encode("utf-8", "surrogatepass"))
    return digest.digest()


def cache_key(
    req: RecommendRequest, profile: Profile | None, model_version: str, local: datetime
) -> tuple[object, ...]:
    """The key of a request's answer; `local` is the request's local time (its daypart is part of the segment)."""
    ctx = req.context
    segment = (ctx.device, ctx.surface, daypart(local), ctx.country, tuple(sorted(ctx.features.items())))
    exclusions = tuple(sorted(req.exclude))
    return (req.user_id, profile_fingerprint(profile), model_version, segment, req.k, exclusions, req.include_seen)


class TopNCache:
    """Recent personalized answers by `cache_key`, each kept `ttl_s` at most, `max_entries` in all (least recently
    used first out). Hits and misses go to hyperrec_cache_requests_total."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._entries: TTLCache[tuple[object, ...], Cached] | None = (
            TTLCache(maxsize=settings.max_entries, ttl=settings.ttl_s) if settings.ttl_s > 0 else None
        )

    @property
    def enabled(self) -> bool:
        return self._entries is not None

    def get(self, key: tuple[object, ...]) -> Cached | None:
        if self._entries is None:
            return None
        found = self._entries.get(key)
        metrics.CACHE_REQUESTS.labels("hit" if found is not None else "miss").inc()
        return found

    def put(self, key: tuple[object, ...], items: tuple[ScoredItem, ...], strategy: Strategy) -> None:
        if self._entries is not None and strategy in CACHED_STRATEGIES:
            self._entries[key] = Cached(items, strategy)

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)
