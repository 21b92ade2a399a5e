"""Profile snapshots: many profiles in one .npz file (training output, `--seed-profiles`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hyperrec.profiles.model import Profile


def save_profiles(path: Path, profiles: Mapping[str, Profile]) -> None:
    """Write profiles that all carry a vector of the same width and the same embedding space."""
    users = list(profiles)
    if not users:
        raise ValueError("no profiles to save")
    first = profiles[users[0]]
    if first.user_vector is None:
        raise ValueError("snapshot profiles need user vectors")
    vectors = np.stack([np.asarray(profiles[u].user_vector, dtype=np.float32) for u in users])
    recent = [list(profiles[u].recent_items) for u in users]
    offsets = np.cumsum([0] + [len(r) for r in recent]).astype(np.int64)
    np.savez_compressed(
        path,
        user_ids=np.array(users, dtype=np.str_),
        vectors=vectors,
        embedding_space=np.array(first.embedding_space),
        recent_items=np.array([i for r in recent for i in r], dtype=np.str_),
        recent_offsets=offsets,
        updated_at=np.array([profiles[u].updated_at for u in users], dtype=np.float64),
    )


def snapshot_user_ids(path: Path) -> list[str]:
    """The user ids of a snapshot, without reading the profiles themselves."""
    with np.load(path, allow_pickle=False) as data:
        return [str(u) for u in data["user_ids"]]


def load_profiles(path: Path) -> dict[str, Profile]:
    """Inverse of `save_profiles`."""
    with np.load(path, allow_pickle=False) as data:
        users = [str(u) for u in data["user_ids"]]
        vectors = data["vectors"].astype(np.float32)
        space = str(data["embedding_space"])
        items = [str(i) for i in data["recent_items"]]
        offsets = data["recent_offsets"]
        updated = data["updated_at"]
    return {
        user: Profile(
            user_vector=vectors[row],
            embedding_space=space,
            recent_items=tuple(items[offsets[row] : offsets[row + 1]]),
            updated_at=float(updated[row]),
        )
        for row, user in enumerate(users)
    }
