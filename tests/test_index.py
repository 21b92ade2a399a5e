"""AnnIndex over real FAISS: exact and IVF search, int64 rows, exclusions that never come back short."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperrec.index import FLAT, HNSW, IVF, IVFPQ, AnnIndex, IndexParams, build, load


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    out: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return out


def test_choose_uses_exact_search_below_threshold_and_ivf_above() -> None:
    assert IndexParams.choose(1_000, flat_threshold=5_000).kind == FLAT
    ivf = IndexParams.choose(100_000, flat_threshold=5_000)
    assert ivf.kind == IVF
    assert 0 < ivf.nprobe <= ivf.nlist


def test_flat_search_matches_brute_force_and_returns_int64_rows() -> None:
    emb = unit_vectors(500, 16)
    index = build(emb, IndexParams(FLAT))
    queries = unit_vectors(4, 16, seed=1)
    scores, rows = index.search(queries, 10)
    assert rows.dtype == np.int64 and rows.shape == (4, 10)
    expected = np.argsort(-(queries @ emb.T), axis=1)[:, :10]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ emb.T, expected, axis=1), rtol=1e-5)


def test_ivf_recall_against_exact_search_is_high() -> None:
    emb = unit_vectors(4_000, 16)
    params = IndexParams(IVF, nlist=64, nprobe=16)
    index = build(emb, params)
    queries = unit_vectors(50, 16, seed=2)
    _, rows = index.search(queries, 20)
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :20]
    recall = np.mean([len(set(r) & set(e)) / 20 for r, e in zip(rows, exact, strict=True)])
    assert recall > 0.8


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    emb = unit_vectors(2_000, 8)
    params = IndexParams(IVF, nlist=32, nprobe=8)
    index = build(emb, params)
    index.save(tmp_path / "index.faiss")
    loaded = load(tmp_path / "index.faiss", params)
    q = unit_vectors(3, 8, seed=3)
    np.testing.assert_array_equal(index.search(q, 5)[1], loaded.search(q, 5)[1])
    assert loaded.size == 2_000 and loaded.dim == 8


def test_exclusions_overfetch_so_k_items_come_back() -> None:
    emb = unit_vectors(300, 8)
    index = build(emb, IndexParams(FLAT))
    query = emb[0]
    _, top = index.search(query, 50)
    excluded = set(top[0][:40].tolist())
    _, rows = index.search_excluding(query, 20, excluded)
    assert len(rows) == 20
    assert not excluded & set(rows.tolist())
    # The survivors are exactly the best 20 non-excluded items.
    order = [r for r in np.argsort(-(emb @ query)) if r not in excluded][:20]
    assert rows.tolist() == order


@settings(max_examples=25, deadline=None)
@given(
    n_excluded=st.integers(min_value=0, max_value=199),
    want=st.integers(min_value=1, max_value=200),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_ivf_exclusions_never_come_back_short(n_excluded: int, want: int, seed: int) -> None:
    """Even when the probed lists run dry, min(want, size - excluded) rows come back."""
    emb = IVF_EMB
    rng = np.random.default_rng(seed)
    excluded = set(rng.choice(len(emb), size=n_excluded, replace=False).tolist())
    query = unit_vectors(1, 8, seed=seed)[0]
    _, rows = IVF_INDEX.search_excluding(query, want, excluded)
    assert len(rows) == min(want, len(emb) - len(excluded))
    assert len(set(rows.tolist())) == len(rows)
    assert not excluded & set(rows.tolist())


IVF_EMB = unit_vectors(200, 8, seed=9)
# nprobe=1 of 16 lists: a plain search sees ~1/16 of the items, so the fallback must kick in.
IVF_INDEX = build(IVF_EMB, IndexParams(IVF, nlist=16, nprobe=1))


def test_everything_excluded_returns_nothing() -> None:
    emb = unit_vectors(10, 4)
    index = build(emb, IndexParams(FLAT))
    scores, rows = index.search_excluding(emb[0], 5, set(range(10)))
    assert len(rows) == 0 and len(scores) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "annoy"},
        {"type": "ivf", "nlist": 4, "nprobe": 9},
        {"type": "ivfpq", "nlist": 4, "nprobe": 0},
        {"type": "ivfpq", "nlist": 4, "nprobe": 2, "pq_m": 0},
        {"type": "hnsw", "ef_search": 0},
        {"type": "flat", "metric": "l2"},
    ],
)
def test_index_params_from_manifest_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        IndexParams.from_json(bad)


def test_building_reports_progress_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperrec.index import faiss_common

    monkeypatch.setattr(faiss_common, "ADD_CHUNK", 100)
    calls: list[tuple[int, int]] = []
    emb = np.random.default_rng(0).normal(size=(250, 8)).astype(np.float32)
    index = build(emb, IndexParams(IVF, nlist=4, nprobe=4), on_progress=lambda a, t: calls.append((a, t)))
    assert calls == [(0, 250), (100, 250), (200, 250), (250, 250)]
    assert index.size == 250


GRAPH_AND_PQ = [
    IndexParams(HNSW, hnsw_m=16, ef_construction=64, ef_search=64),
    IndexParams(IVFPQ, nlist=32, nprobe=16, pq_m=8),
]


def recall_at(index: AnnIndex, emb: np.ndarray, queries: np.ndarray, n: int) -> float:
    _, rows = index.search(queries, n)
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :n]
    return float(np.mean([len(set(r) & set(e)) / n for r, e in zip(rows, exact, strict=True)]))


@pytest.mark.parametrize("params", GRAPH_AND_PQ, ids=["hnsw", "ivfpq"])
def test_hnsw_and_ivfpq_find_most_exact_neighbours_and_round_trip(params: IndexParams, tmp_path: Path) -> None:
    emb = unit_vectors(10_000, 16)
    index = build(emb, params)
    index.check_params()
    queries = unit_vectors(40, 16, seed=4)
    # HNSW searches at least as wide as asked (ef >= n), so 200 results stay near-exact; PQ codes lose some order
    assert recall_at(index, emb, queries, 200) > (0.9 if params.kind == HNSW else 0.5)
    assert index.exact_scores == (params.kind != IVFPQ)
    index.save(tmp_path / "index.faiss")
    loaded = load(tmp_path / "index.faiss", IndexParams.from_json(params.to_json()))
    loaded.check_params()
    np.testing.assert_array_equal(index.search(queries, 10)[1], loaded.search(queries, 10)[1])


@pytest.mark.parametrize("params", GRAPH_AND_PQ, ids=["hnsw", "ivfpq"])
def test_hnsw_and_ivfpq_exclusions_never_come_back_short(params: IndexParams) -> None:
    emb = unit_vectors(3_000, 16, seed=5)
    index = build(emb, params)
    query = emb[11]
    excluded = set(range(0, 3_000, 3))  # a third of the catalogue, the query's own neighbours among them
    _, rows = index.search_excluding(query, 500, excluded)
    assert len(rows) == 500 and not set(rows.tolist()) & excluded
    ((_, batch_rows),) = index.search_excluding_many(query[None, :], [500], [excluded])
    assert len(batch_rows) == 500 and not set(batch_rows.tolist()) & excluded
