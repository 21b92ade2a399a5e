"""Context feature encoding shared by training and serving.

A bundle's manifest carries a `FeatureSpec`; both the trainer and the server
turn a `Context` into the ranker's context vector with `encode_context`, so
serving applies exactly the transform the model was trained with.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from hyperrec.core.behaviour import BEHAVIOUR_FEATURES
from hyperrec.core.domain import Context, DeviceType, Surface
from hyperrec.core.errors import BundleError

DAYPARTS = ("night", "morning", "afternoon", "evening")


@dataclass(frozen=True)
class FeatureBlock:
    """One slice of the context vector.

    kind:
      - "cyclic": `source` is "hour_of_day" or "day_of_week"; width 2 (sin, cos).
      - "one_hot": `source` is "device" or "surface"; width len(vocabulary).
      - "hashed": `source` is "country" or "features.<key>"; width `buckets` + 1,
        slot 0 meaning "absent".
      - "segment": `source` is "user_vector"; width `buckets` (the number of behavioural segments): one-hot of
        the segment whose centroid is nearest the user vector, all zeros when there is no user vector.
    """

    name: str
    kind: str
    source: str
    vocabulary: tuple[str, ...] = ()
    buckets: int = 0

    @property
    def width(self) -> int:
        if self.kind == "cyclic":
            return 2
        if self.kind == "one_hot":
            return len(self.vocabulary)
        if self.kind == "segment":
            return self.buckets
        return self.buckets + 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.source}
        if self.vocabulary:
            out["vocabulary"] = list(self.vocabulary)
        if self.buckets:
            out["buckets"] = self.buckets
        return out


_CYCLIC_SOURCES = {"hour_of_day", "day_of_week"}
_ONE_HOT_SOURCES = {"device", "surface"}


@dataclass(frozen=True)
class FeatureSpec:
    """The ranker's inputs: embedding width, the context vector's layout, and optional per-item features.

    `item_features` names the columns of the bundle's item feature matrix (precomputed, already
    transformed); `item_feature_stats` records how each numeric column was capped and standardised.
    """

    embedding_dim: int
    blocks: tuple[FeatureBlock, ...]
    item_features: tuple[str, ...] = ()
    item_feature_stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    behaviour_features: tuple[str, ...] = ()
    behaviour_stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    affinity_half_life_s: float = 0.0

    @property
    def context_dim(self) -> int:
        return sum(block.width for block in self.blocks)

    @property
    def item_feature_dim(self) -> int:
        """Width of the bundle's stored item feature matrix."""
        return len(self.item_features)

    @property
    def ranker_feature_dim(self) -> int:
        """Width of the ranker's `item_features` input: stored item features, then per-request behaviour features."""
        return len(self.item_features) + len(self.behaviour_features)

    @property
    def segments(self) -> int:
        """Number of behavioural segments the context encodes (0 when it has no segment block)."""
        return sum(block.buckets for block in self.blocks if block.kind == "segment")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "embedding_dim": self.embedding_dim,
            "context_dim": self.context_dim,
            "context": [block.to_json() for block in self.blocks],
        }
        if self.item_features:
            out["item_features"] = {
                "names": list(self.item_features),
                "stats": {k: dict(v) for k, v in self.item_feature_stats.items()},
            }
        if self.behaviour_features:
            out["behaviour_features"] = {
                "names": list(self.behaviour_features),
                "stats": {k: dict(v) for k, v in self.behaviour_stats.items()},
                "half_life_s": self.affinity_half_life_s,
            }
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], file: str = "manifest.json") -> FeatureSpec:
        """Parse and check a spec; raise BundleError naming `file` when it is malformed."""
        try:
            dim = int(data["embedding_dim"])
            blocks = tuple(
                FeatureBlock(
                    name=str(b["name"]),
                    kind=str(b["kind"]),
                    source=str(b["source"]),
                    vocabulary=tuple(str(v) for v in b.get("vocabulary", ())),
                    buckets=int(b.get("buckets", 0)),
                )
                for b in data["context"]
            )
            item = data.get("item_features", {})
            item_names = tuple(str(n) for n in item.get("names", ()))
            item_stats = {str(k): {str(a): float(b) for a, b in v.items()} for k, v in item.get("stats", {}).items()}
            behaviour = data.get("behaviour_features", {})
            behaviour_names = tuple(str(n) for n in behaviour.get("names", ()))
            behaviour_stats = {
                str(k): {str(a): float(b) for a, b in v.items()} for k, v in behaviour.get("stats", {}).items()
            }
            half_life = float(behaviour.get("half_life_s", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(file, f"feature_spec is malformed: {exc!r}") from exc
        if len(set(item_names)) != len(item_names):
            raise BundleError(file, "feature_spec.item_features.names are not unique")
        spec = cls(
            embedding_dim=dim,
            blocks=blocks,
            item_features=item_names,
            item_feature_stats=item_stats,
            behaviour_features=behaviour_names,
            behaviour_stats=behaviour_stats,
            affinity_half_life_s=half_life,
        )
        spec.check(file)
        declared = data.get("context_dim")
        if declared is not None and int(declared) != spec.context_dim:
            raise BundleError(
                file, f"feature_spec.context_dim is {declared} but its blocks add up to {spec.context_dim}"
            )
        return spec

    def check(self, file: str = "manifest.json") -> None:
        if self.embedding_dim < 1:
            raise BundleError(file, "feature_spec.embedding_dim must be positive")
        if self.behaviour_features:
            if self.behaviour_features != BEHAVIOUR_FEATURES:
                raise BundleError(file, f"feature_spec.behaviour_features must be {list(BEHAVIOUR_FEATURES)}")
            if not (math.isfinite(self.affinity_half_life_s) and self.affinity_half_life_s > 0):
                raise BundleError(file, "feature_spec.behaviour_features.half_life_s must be positive")
            for name in self.behaviour_features:
                stats = self.behaviour_stats.get(name, {})
                if not all(math.isfinite(stats.get(key, math.nan)) for key in ("cap", "mean", "std")):
                    raise BundleError(file, f"feature_spec.behaviour_features.stats lacks cap/mean/std for {name}")
        for block in self.blocks:
            ok = (
                (block.kind == "cyclic" and block.source in _CYCLIC_SOURCES)
                or (block.kind == "one_hot" and block.source in _ONE_HOT_SOURCES and block.vocabulary)
                or (
                    block.kind == "hashed"
                    and block.buckets > 0
                    and (block.source == "country" or block.source.startswith("features."))
                )
                or (block.kind == "segment" and block.source == "user_vector" and block.buckets > 0)
            )
            if not ok:
                raise BundleError(file, f"feature block {block.name!r} is not a valid {block.kind!r} block")


def default_feature_spec(embedding_dim: int, country_buckets: int = 16) -> FeatureSpec:
    """The context layout used by the demo and the trainers."""
    return FeatureSpec(
        embedding_dim=embedding_dim,
        blocks=(
            FeatureBlock("hour_of_day", "cyclic", "hour_of_day"),
            FeatureBlock("day_of_week", "cyclic", "day_of_week"),
            FeatureBlock("device", "one_hot", "device", tuple(d.name.lower() for d in DeviceType)),
            FeatureBlock("surface", "one_hot", "surface", tuple(s.name.lower() for s in Surface)),
            FeatureBlock("country", "hashed", "country", buckets=country_buckets),
        ),
    )


def standardize(raw: np.ndarray, stats: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> np.ndarray:
    """The numeric transform training fits and serving applies: missing (NaN) values take the cap, values
    above the cap are capped, then each column is standardised. `raw` [..., len(names)] -> float32."""
    cap = np.array([stats[n]["cap"] for n in names])
    mean = np.array([stats[n]["mean"] for n in names])
    std = np.array([stats[n]["std"] for n in names])
    filled = np.minimum(np.where(np.isfinite(raw), raw, cap), cap)
    return np.asarray((filled - mean) / std, dtype=np.float32)


def stable_bucket(value: str, buckets: int) -> int:
    """1..buckets for a non-empty string, 0 for empty; stable across processes (CRC-32)."""
    if not value:
        return 0
    return 1 + zlib.crc32(value.encode("utf-8")) % buckets


def daypart(local: datetime) -> str:
    """Six-hour part of the local day: night (0-6), morning, afternoon, evening."""
    return DAYPARTS[local.hour // 6]


def assign_segments(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (L2) for each row of `vectors` [n, d]: the user's behavioural segment."""
    distances = (vectors**2).sum(axis=1, keepdims=True) - 2 * vectors @ centroids.T + (centroids**2).sum(axis=1)
    return np.asarray(np.argmin(distances, axis=1), dtype=np.int64)


def encode_context(
    ctx: Context, spec: FeatureSpec, now: datetime, out: np.ndarray | None = None, segment: int | None = None
) -> np.ndarray:
    """Write the context vector for `ctx` (and the user's segment, if any) into `out` and return it."""
    vec = np.zeros(spec.context_dim, dtype=np.float32) if out is None else out
    if out is not None:
        vec.fill(0.0)
    local = ctx.local_time(now)
    offset = 0
    for block in spec.blocks:
        if block.kind == "cyclic":
            if block.source == "hour_of_day":
                phase = (local.hour + local.minute / 60.0) / 24.0
            else:
                phase = (local.weekday() + local.hour / 24.0) / 7.0
            vec[offset] = math.sin(2.0 * math.pi * phase)
            vec[offset + 1] = math.cos(2.0 * math.pi * phase)
        elif block.kind == "segment":
            if segment is not None:
                vec[offset + segment] = 1.0
        elif block.kind == "one_hot":
            name = ctx.device.name.lower() if block.source == "device" else ctx.surface.name.lower()
            if name in block.vocabulary:
                vec[offset + block.vocabulary.index(name)] = 1.0
        else:
            if block.source == "country":
                value = ctx.country
            else:
                value = ctx.features.get(block.source.removeprefix("features."), "")
            vec[offset + stable_bucket(value, block.buckets)] = 1.0
        offset += block.width
    return vec


def encode_contexts(contexts: Sequence[Context], spec: FeatureSpec, now: datetime) -> np.ndarray:
    """Context vectors for many contexts, one row each (used by the trainers)."""
    out = np.zeros((len(contexts), spec.context_dim), dtype=np.float32)
    for row, ctx in enumerate(contexts):
        encode_context(ctx, spec, now, out[row])
    return out
