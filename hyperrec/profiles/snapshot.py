"""Profile snapshots: many profiles in one .npz file (training output, `--seed-profiles`).

Arrays, one entry per user unless said: `user_ids`; `vectors` [users, dim] with `has_vector` (a profile may
have none) and one `embedding_space`; `recent_items` flattened with `recent_offsets` [users + 1] and the aligned
`recent_weights`; `updated_at`; and `extras`, a JSON object per user with the category affinities
(`{"name": [weight, time]}`), event counts, last-seen time and declared interests. No pickles.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hyperrec.core.profile import CategoryAffinity, Profile


def _extras(profile: Profile) -> str:
    return json.dumps(
        {
            "categories": {name: [stat.weight, stat.at] for name, stat in profile.categories.items()},
            "counts": dict(profile.event_counts),
            "last_seen": profile.last_seen,
            "interests": list(profile.interests),
        }
    )


def save_profiles(path: Path, profiles: Mapping[str, Profile]) -> None:
    """Write profiles whose vectors (where present) share one width and one embedding space."""
    users = list(profiles)
    if not users:
        raise ValueError("no profiles to save")
    with_vector = [profiles[u] for u in users if profiles[u].user_vector is not None]
    spaces = {p.embedding_space for p in with_vector}
    if len(spaces) > 1:
        raise ValueError(f"profiles from {len(spaces)} embedding spaces cannot share a snapshot")
    dim = len(with_vector[0].user_vector) if with_vector else 0  # type: ignore[arg-type]
    vectors = np.zeros((len(users), dim), dtype=np.float32)
    has_vector = np.zeros(len(users), dtype=bool)
    for row, user in enumerate(users):
        vector = profiles[user].user_vector
        if vector is not None:
            vectors[row], has_vector[row] = vector, True
    recent = [profiles[u] for u in users]
    offsets = np.cumsum([0] + [len(p.recent_items) for p in recent]).astype(np.int64)
    np.savez_compressed(
        path,
        user_ids=np.array(users, dtype=np.str_),
        vectors=vectors,
        has_vector=has_vector,
        embedding_space=np.array(spaces.pop() if spaces else ""),
        recent_items=np.array([i for p in recent for i in p.recent_items], dtype=np.str_),
        recent_weights=np.array([w for p in recent for w in p.weights_of_recent()], dtype=np.float64),
        recent_offsets=offsets,
        updated_at=np.array([p.updated_at for p in recent], dtype=np.float64),
        extras=np.array([_extras(p) for p in recent], dtype=np.str_),
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
        has_vector = data["has_vector"]
        space = str(data["embedding_space"])
        items = [str(i) for i in data["recent_items"]]
        weights = [float(w) for w in data["recent_weights"]]
        offsets = data["recent_offsets"]
        updated = data["updated_at"]
        extras = [json.loads(str(e)) for e in data["extras"]]
    out = {}
    for row, user in enumerate(users):
        lo, hi = int(offsets[row]), int(offsets[row + 1])
        extra = extras[row]
        out[user] = Profile(
            user_vector=vectors[row] if has_vector[row] else None,
            embedding_space=space if has_vector[row] else "",
            recent_items=tuple(items[lo:hi]),
            recent_weights=tuple(weights[lo:hi]),
            updated_at=float(updated[row]),
            categories={name: CategoryAffinity(float(w), float(t)) for name, (w, t) in extra["categories"].items()},
            event_counts={kind: int(n) for kind, n in extra["counts"].items()},
            last_seen=float(extra["last_seen"]),
            interests=tuple(extra["interests"]),
        )
    return out
