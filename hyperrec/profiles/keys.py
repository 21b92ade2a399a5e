"""Pseudonymous keys and the byte encoding of profiles in Redis.

Pure functions, unit-tested without Redis. A raw user id never appears in a
key or a value: keys carry HMAC-SHA256(secret, user_id). The hash sits inside
braces (a Redis Cluster hash tag) so all of one user's keys share a slot.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np

from hyperrec.profiles.model import Profile

KEY_PREFIX = "hr"
FIELD_VECTOR = b"vec"
FIELD_SPACE = b"space"
FIELD_UPDATED = b"upd"
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


def profile_key(user_key: str) -> str:
    """Hash holding the vector, its embedding space and the update time."""
    return f"{KEY_PREFIX}:{{{user_key}}}:profile"


def recent_key(user_key: str) -> str:
    """List of recent item ids, most recent first."""
    return f"{KEY_PREFIX}:{{{user_key}}}:recent"


def encode_vector(vector: np.ndarray) -> bytes:
    """float32 little-endian bytes, whatever the host's byte order."""
    return np.ascontiguousarray(vector, dtype=_FLOAT32_LE).tobytes()


def decode_vector(raw: bytes) -> np.ndarray:
    if len(raw) % 4:
        raise ValueError(f"vector of {len(raw)} bytes is not a whole number of float32")
    return np.frombuffer(raw, dtype=_FLOAT32_LE).astype(np.float32)


def encode_profile_hash(profile: Profile) -> dict[bytes, bytes]:
    """Fields of the profile hash (the recent items live in their own list)."""
    fields = {FIELD_UPDATED: struct.pack("<d", profile.updated_at)}
    if profile.user_vector is not None:
        fields[FIELD_VECTOR] = encode_vector(profile.user_vector)
        fields[FIELD_SPACE] = profile.embedding_space.encode("utf-8")
    return fields


def decode_profile(fields: dict[bytes, bytes], recent: list[bytes]) -> Profile | None:
    """Inverse of `encode_profile_hash` plus the recent list; None when nothing is stored."""
    if not fields and not recent:
        return None
    vector = decode_vector(fields[FIELD_VECTOR]) if FIELD_VECTOR in fields else None
    raw_updated = fields.get(FIELD_UPDATED, struct.pack("<d", 0.0))
    if len(raw_updated) != 8:
        raise ValueError(f"updated time of {len(raw_updated)} bytes is not a float64")
    updated = struct.unpack("<d", raw_updated)[0]
    return Profile(
        user_vector=vector,
        embedding_space=fields.get(FIELD_SPACE, b"").decode("utf-8"),
        recent_items=tuple(item.decode("utf-8") for item in recent),
        updated_at=float(updated),
    )
