"""The index registry: manifest type -> implementation, over real FAISS; and a second library plugging in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import pytest

from hyperrec.core.bundle import MANIFEST, Bundle
from hyperrec.core.errors import BundleError
from hyperrec.index import FLAT, HNSW, IVF, IVFPQ, AnnIndex, IndexParams, build, implementation, kinds, load, registry
from hyperrec.index.base import Hits
from hyperrec.index.faiss_flat import FlatIndex
from tests.helpers import publish_toy

# One small, valid setting per registered type: a type registered without one here fails the first test.
SMALL = {
    FLAT: IndexParams(FLAT),
    IVF: IndexParams(IVF, nlist=16, nprobe=4),
    HNSW: IndexParams(HNSW, hnsw_m=8, ef_construction=32, ef_search=32),
    IVFPQ: IndexParams(IVFPQ, nlist=8, nprobe=8, pq_m=4),
}


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    out: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return out


def test_every_registered_type_has_a_round_trip_case() -> None:
    assert kinds() == tuple(sorted(SMALL))


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_every_type_round_trips_build_save_load_search(kind: str, tmp_path: Path) -> None:
    """Real FAISS: built through the registry, saved, read back through it from the manifest's JSON."""
    params = SMALL[kind]
    emb = unit_vectors(2_500, 16)
    built = build(emb, params, seed=7)
    assert type(built) is implementation(kind) and built.params == params
    built.check_params()
    built.save(tmp_path / "index.faiss")
    manifest_params = IndexParams.from_json(json.loads(json.dumps(params.to_json())))
    assert manifest_params == params
    loaded = load(tmp_path / "index.faiss", manifest_params, device="cpu")
    assert type(loaded) is type(built) and loaded.device == "cpu"
    loaded.check_params()
    assert (loaded.size, loaded.dim, loaded.kind_name, loaded.nbytes) == (2_500, 16, built.kind_name, built.nbytes)
    assert loaded.exact_scores == (kind != IVFPQ)
    queries = unit_vectors(5, 16, seed=1)
    for before, after in zip(built.search(queries, 20), loaded.search(queries, 20), strict=True):
        np.testing.assert_array_equal(before, after)
    _, rows = loaded.search(queries, 20)
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :1]
    assert np.mean([e[0] in r for r, e in zip(rows, exact, strict=True)]) >= 0.8  # the nearest item is found
    excluded = set(rows[0, :10].tolist())
    _, kept = loaded.search_excluding(queries[0], 30, excluded)
    assert len(kept) == 30 and not excluded & set(kept.tolist())


def test_an_unknown_type_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown index type 'annoy' \(known: flat, hnsw, ivf, ivfpq\)"):
        implementation("annoy")
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        IndexParams.from_json({"type": "annoy", "metric": "inner_product"})
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        build(unit_vectors(10, 4), IndexParams("annoy"))
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        load(tmp_path / "index.faiss", IndexParams("annoy"))


def test_a_bundle_whose_manifest_names_an_unknown_type_is_a_bundle_error(tmp_path: Path) -> None:
    version = publish_toy(tmp_path / "repo", n_items=50)
    manifest = json.loads((version / MANIFEST).read_text())
    manifest["index"]["type"] = "annoy"
    (version / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="index: unknown index type 'annoy'") as err:
        Bundle.load(version)
    assert err.value.file == MANIFEST


def test_a_type_has_one_implementation() -> None:
    class AnotherFlat(FlatIndex):
        pass

    assert registry.register(FlatIndex) is FlatIndex  # registering the same class again changes nothing
    with pytest.raises(ValueError, match="index type 'flat' is already served by FlatIndex"):
        registry.register(AnotherFlat)
    assert implementation(FLAT) is FlatIndex


class NumpyExact(AnnIndex):
    """A second "library": exact search with numpy, saved as .npy. Only the primitives; exclusions come from
    AnnIndex."""

    kind = "numpy-exact"
    manifest_fields = ("ef_search",)  # any IndexParams field will do: the manifest must carry it

    def __init__(self, vectors: np.ndarray, params: IndexParams) -> None:
        self._vectors, self.params, self.device = vectors, params, "cpu"

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        params: IndexParams,
        seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        device: str = "cpu",
    ) -> Self:
        return cls(np.asarray(embeddings, dtype=np.float32), params)

    @classmethod
    def load(cls, path: Path, params: IndexParams, device: str = "auto") -> Self:
        return cls(np.load(path), params)

    def save(self, path: Path) -> None:
        with path.open("wb") as out:
            np.save(out, self._vectors)

    def check_params(self) -> None:
        pass

    def log_device(self) -> None:
        pass

    @property
    def size(self) -> int:
        return len(self._vectors)

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self._vectors.nbytes)

    @property
    def kind_name(self) -> str:
        return "NumpyExact"

    def _search(self, queries: np.ndarray, n: int) -> Hits:
        scores = queries @ self._vectors.T
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(scores, rows, axis=1), rows

    def _search_exhaustive(self, queries: np.ndarray, n: int) -> Hits:
        return self._search(queries, n)


def test_another_library_plugs_in_by_registering_its_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A registered class serves its type through the same IndexParams, build and load; the core changes nothing."""
    monkeypatch.setattr(registry, "_IMPLEMENTATIONS", dict(registry._IMPLEMENTATIONS))  # this test's table only
    registry.register(NumpyExact)
    params = IndexParams.from_json({"type": "numpy-exact", "metric": "inner_product", "ef_search": 9})
    assert params.to_json() == {
        "type": "numpy-exact",
        "metric": "inner_product",
        "nlist": 0,
        "nprobe": 0,
        "ef_search": 9,
    }
    emb = unit_vectors(300, 8)
    build(emb, params).save(tmp_path / "index.npy")
    index = load(tmp_path / "index.npy", params)
    assert isinstance(index, NumpyExact)
    query = emb[3]
    _, top = index.search(query, 10)
    assert top[0, 0] == 3
    _, rows = index.search_excluding(query, 5, set(top[0, :5].tolist()))
    assert rows.tolist() == top[0, 5:10].tolist()
