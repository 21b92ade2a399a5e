"""Pseudonymous keys and the byte encoding of profiles in Redis.

Pure functions, unit-tested without Redis. A raw user id never appears in a
key or a value: keys carry HMAC-SHA256(secret, user_id). The hash sits inside
braces (a Redis Cluster hash tag) so all of one user's keys share a slot.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from hyperrec.core.profile import CategoryAffinity, Profile

KEY_PREFIX = "hr"
FIELD_VECTOR = b"vec"
FIELD_SPACE = b"space"
FIELD_UPDATED = b"upd"
FIELD_LAST_SEEN = b"seen"
# "seq" (the refold sequence number) is read and written only inside the Lua scripts (scripts.py)
FIELD_INTERESTS = b"int"
COUNT_PREFIX = b"n:"
CATEGORY_PREFIX = b"c:"
INTEREST_SEPARATOR = "\x1f"
_FLOAT32_LE = np.dtype("<f4")


class Pseudonymizer:
    """Turns user ids into stable keyed hashes. The secret never leaves this object."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the profile secret must be at least 16 bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "Pseudonymizer(<secret>)"

    def user_key(self, user_id: str) -> str:
        """64 hex characters of HMAC-SHA256(secret, utf-8 user id)."""
        return hmac.new(self._secret, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def event_key(self, event_id: str) -> str:
        """32 hex characters naming an event id in the dedupe window (callers' ids may embed user ids)."""
        message = b"event\x00" + event_id.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]


def profile_key(user_key: str) -> str:
    """Hash holding the vector, its embedding space and the update time."""
    return f"{KEY_PREFIX}:{{{user_key}}}:profile"


def recent_key(user_key: str) -> str:
    """List of recent items ("<weight>|<item id>"), most recent first."""
    return f"{KEY_PREFIX}:{{{user_key}}}:recent"


def events_key(user_key: str) -> str:
    """Sorted set of hashed event ids scored by arrival time: the dedupe window."""
    return f"{KEY_PREFIX}:{{{user_key}}}:events"


def optout_key(user_key: str) -> str:
    """Present when the user opted out of personalization. Has no TTL: consent must not lapse by itself."""
    return f"{KEY_PREFIX}:{{{user_key}}}:optout"


def user_keys(user_key: str) -> dict[str, str]:
    """Every key a user can have, by kind (what ForgetUser erases and reports)."""
    return {
        "profile": profile_key(user_key),
        "recent_items": recent_key(user_key),
        "event_ids": events_key(user_key),
        "consent": optout_key(user_key),
    }


def encode_vector(vector: np.ndarray) -> bytes:
    """float32 little-endian bytes, whatever the host's byte order."""
    return np.ascontiguousarray(vector, dtype=_FLOAT32_LE).tobytes()


def decode_vector(raw: bytes) -> np.ndarray:
    if len(raw) % 4:
        raise ValueError(f"vector of {len(raw)} bytes is not a whole number of float32")
    return np.frombuffer(raw, dtype=_FLOAT32_LE).astype(np.float32)


def format_float(value: float) -> str:
    """Text that parses back to exactly `value` in Python and in Redis Lua (17 significant digits)."""
    return f"{value:.17g}"


def encode_recent(item_id: str, weight: float) -> bytes:
    return f"{format_float(weight)}|{item_id}".encode()


def decode_recent(raw: bytes) -> tuple[str, float]:
    weight, sep, item = raw.decode("utf-8").partition("|")
    if not sep:
        raise ValueError("recent item entry has no weight")
    return item, float(weight)


def encode_affinity(stat: CategoryAffinity) -> bytes:
    return f"{format_float(stat.weight)}|{format_float(stat.at)}".encode()


def decode_affinity(raw: bytes) -> CategoryAffinity:
    weight, sep, at = raw.decode("ascii").partition("|")
    if not sep:
        raise ValueError("category affinity has no time")
    return CategoryAffinity(float(weight), float(at))


def encode_profile_hash(profile: Profile) -> dict[bytes, bytes]:
    """Fields of the profile hash (the recent items live in their own list)."""
    fields = {
        FIELD_UPDATED: format_float(profile.updated_at).encode(),
        FIELD_LAST_SEEN: format_float(profile.last_seen).encode(),
    }
    if profile.user_vector is not None:
        fields[FIELD_VECTOR] = encode_vector(profile.user_vector)
        fields[FIELD_SPACE] = profile.embedding_space.encode("utf-8")
    if profile.interests:
        fields[FIELD_INTERESTS] = INTEREST_SEPARATOR.join(profile.interests).encode("utf-8")
    for kind, count in profile.event_counts.items():
        fields[COUNT_PREFIX + kind.encode()] = str(int(count)).encode()
    for name, stat in profile.categories.items():
        fields[CATEGORY_PREFIX + name.encode("utf-8")] = encode_affinity(stat)
    return fields


def decode_profile(fields: dict[bytes, bytes], recent: list[bytes]) -> Profile | None:
    """Inverse of `encode_profile_hash` plus the recent list; None when nothing is stored."""
    if not fields and not recent:
        return None
    vector = decode_vector(fields[FIELD_VECTOR]) if FIELD_VECTOR in fields else None
    counts: dict[str, int] = {}
    categories: dict[str, CategoryAffinity] = {}
    for name, value in fields.items():
        if name.startswith(COUNT_PREFIX):
            counts[name[len(COUNT_PREFIX) :].decode()] = int(value)
        elif name.startswith(CATEGORY_PREFIX):
            categories[name[len(CATEGORY_PREFIX) :].decode("utf-8")] = decode_affinity(value)
    entries = [decode_recent(raw) for raw in recent]
    interests = fields.get(FIELD_INTERESTS, b"").decode("utf-8")
    return Profile(
        user_vector=vector,
        embedding_space=fields.get(FIELD_SPACE, b"").decode("utf-8"),
        recent_items=tuple(item for item, _ in entries),
        recent_weights=tuple(weight for _, weight in entries),
        updated_at=float(fields.get(FIELD_UPDATED, b"0")),
        categories=categories,
        event_counts=counts,
        last_seen=float(fields.get(FIELD_LAST_SEEN, b"0")),
        interests=tuple(interests.split(INTEREST_SEPARATOR)) if interests else (),
    )
