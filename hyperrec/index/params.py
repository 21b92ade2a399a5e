"""Index parameters as a bundle manifest records them (`manifest.json`'s "index" object).

The JSON format is fixed: published bundles must keep loading. Every manifest carries "type", "metric", "nlist"
and "nprobe"; an index type adds the fields its implementation names in `manifest_fields`. Checks that belong to
one type (nprobe within nlist, positive graph widths...) live in its implementation's `check_manifest`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hyperrec.index import registry

# The index types of the bundle format (manifest "type"), each served by a class registered for it.
FLAT = "flat"
IVF = "ivf"
HNSW = "hnsw"
IVFPQ = "ivfpq"
METRIC = "inner_product"  # the one metric the bundle format has


@dataclass(frozen=True)
class IndexParams:
    """How the index is built and searched; recorded in the bundle manifest.

    flat: exact. ivf: `nlist` lists, `nprobe` probed per search. hnsw: a graph with `hnsw_m` links per node, built
    with `ef_construction`, searched with `ef_search` (at least the number of results asked for). ivfpq: as ivf,
    with vectors compressed to `pq_m` bytes (product quantisation, 8 bits per sub-vector); its scores are
    approximate, so callers rescore the candidates exactly (`AnnIndex.exact_scores`).
    """

    kind: str = FLAT
    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    pq_m: int = 16

    @staticmethod
    def choose(n_items: int, flat_threshold: int = 20_000) -> IndexParams:
        """Exact search below `flat_threshold` items, IVF (about 4·sqrt(n) lists) above it."""
        if n_items < flat_threshold:
            return IndexParams(FLAT)
        nlist = int(4 * math.sqrt(n_items))
        return IndexParams(IVF, nlist=nlist, nprobe=max(8, nlist // 32))

    def to_json(self) -> dict[str, Any]:
        """The manifest's "index" object: the common fields, then those the index type adds."""
        out: dict[str, Any] = {"type": self.kind, "metric": METRIC, "nlist": self.nlist, "nprobe": self.nprobe}
        for name in registry.implementation(self.kind).manifest_fields:
            out[name] = getattr(self, name)
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> IndexParams:
        """Parse and check a manifest's "index" object; ValueError naming what is wrong (an unknown type first)."""
        defaults = IndexParams()
        params = IndexParams(
            str(data["type"]),
            int(data.get("nlist", 0)),
            int(data.get("nprobe", 0)),
            int(data.get("hnsw_m", defaults.hnsw_m)),
            int(data.get("ef_construction", defaults.ef_construction)),
            int(data.get("ef_search", defaults.ef_search)),
            int(data.get("pq_m", defaults.pq_m)),
        )
        implementation = registry.implementation(params.kind)
        if data.get("metric", METRIC) != METRIC:
            raise ValueError(f"unsupported metric {data.get('metric')!r}")
        implementation.check_manifest(params)
        return params
