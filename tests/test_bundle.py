"""The bundle format: atomic publish, round trip, and validation errors that name the file and the problem."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hyperrec.core.bundle import (
    COLD_START,
    EMBEDDINGS,
    INDEX,
    ITEM_CATEGORIES,
    ITEM_CATEGORY_COLUMNS,
    ITEM_FEATURES,
    ITEM_ID_OFFSETS,
    ITEM_IDS,
    MANIFEST,
    RANKER,
    Bundle,
    BundleContents,
    list_versions,
    publish_bundle,
    resolve_version,
    sha256_of,
)
from hyperrec.core.errors import BundleError, NotFound
from hyperrec.core.features import default_feature_spec
from tests.helpers import make_contents, make_ranker_onnx, publish_toy


def test_publish_then_load_round_trip(tmp_path: Path) -> None:
    contents = make_contents(n_items=120, dim=8)
    path = publish_bundle(tmp_path, contents)
    assert path == tmp_path / "toy" / "1"
    bundle = Bundle.load(path)
    assert bundle.version == "1" and bundle.model_name == "toy"
    assert tuple(bundle.item_ids) == tuple(contents.item_ids)
    assert [bundle.item_ids.row(i) for i in contents.item_ids] == list(range(120))
    np.testing.assert_array_equal(bundle.item_embeddings, contents.item_embeddings)
    assert bundle.index.size == 120
    assert bundle.manifest.embedding_space == contents.embedding_space
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["item_count"] == 120 and manifest["embedding_dim"] == 8
    assert set(manifest["files"]) == {RANKER, EMBEDDINGS, ITEM_IDS, ITEM_ID_OFFSETS, INDEX, COLD_START}
    assert not [p for p in (tmp_path / "toy").iterdir() if p.name.startswith(".")], "staging dir left behind"


def test_versions_increase_and_concurrent_publishers_get_distinct_numbers(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda seed: publish_toy(tmp_path, n_items=60, seed=seed), range(4)))
    assert sorted(p.name for p in paths) == ["1", "2", "3", "4"]
    assert list_versions(tmp_path, "toy") == [1, 2, 3, 4]
    assert resolve_version(tmp_path, "toy") == tmp_path / "toy" / "4"


def test_partial_and_staging_directories_are_not_versions(tmp_path: Path) -> None:
    publish_toy(tmp_path, n_items=60)
    (tmp_path / "toy" / ".staging-abc").mkdir()
    (tmp_path / "toy" / "next").mkdir()
    assert list_versions(tmp_path, "toy") == [1]
    with pytest.raises(NotFound):
        resolve_version(tmp_path, "toy", 7)
    with pytest.raises(NotFound):
        resolve_version(tmp_path, "absent")


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return publish_toy(tmp_path, n_items=80)


def test_missing_file_is_named(bundle_dir: Path) -> None:
    (bundle_dir / INDEX).unlink()
    with pytest.raises(BundleError, match=r"index\.faiss: missing") as err:
        Bundle.load(bundle_dir)
    assert err.value.file == INDEX


def test_missing_manifest_is_named(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST).unlink()
    with pytest.raises(BundleError) as err:
        Bundle.load(bundle_dir)
    assert err.value.file == MANIFEST


def test_checksum_mismatch_is_named(bundle_dir: Path) -> None:
    raw = bytearray((bundle_dir / EMBEDDINGS).read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    (bundle_dir / EMBEDDINGS).write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="checksum mismatch") as err:
        Bundle.load(bundle_dir)
    assert err.value.file == EMBEDDINGS


def _rewrite_manifest(bundle_dir: Path, **changes: object) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest.update(changes)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))


def test_dimension_mismatch_is_named(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    spec = default_feature_spec(16).to_json()
    manifest["feature_spec"], manifest["embedding_dim"] = spec, 16
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"expected float32 \(80, 16\)") as err:
        Bundle.load(bundle_dir)
    assert err.value.file == EMBEDDINGS


def test_item_count_mismatch_is_named(bundle_dir: Path) -> None:
    _rewrite_manifest(bundle_dir, item_count=81)
    with pytest.raises(BundleError, match="item_count 81") as err:
        Bundle.load(bundle_dir)
    assert err.value.file == ITEM_IDS


def test_unsupported_format_version_is_named(bundle_dir: Path) -> None:
    _rewrite_manifest(bundle_dir, format_version=99)
    with pytest.raises(BundleError, match="format_version 99") as err:
        Bundle.load(bundle_dir)
    assert err.value.file == MANIFEST


CONTEXT_DIM = default_feature_spec(8).context_dim


@pytest.mark.parametrize(
    ("ranker", "message"),
    [
        (make_ranker_onnx(9, CONTEXT_DIM), "input 'user' has width 9 on axis 1, feature spec says 8"),
        (make_ranker_onnx(8, CONTEXT_DIM, input_names=("user", "ctx", "items")), "inputs are"),
        (b"not an onnx model", "ONNX Runtime cannot load it"),
    ],
)
def test_onnx_inputs_that_do_not_match_the_spec_are_named(tmp_path: Path, ranker: bytes, message: str) -> None:
    path = publish_bundle(tmp_path, make_contents(n_items=50, dim=8, ranker=ranker))
    with pytest.raises(BundleError, match=message) as err:
        Bundle.load(path)
    assert err.value.file == RANKER


def test_context_width_mismatch_is_named(tmp_path: Path) -> None:
    spec = default_feature_spec(8)
    ranker = make_ranker_onnx(8, spec.context_dim + 3)
    path = publish_bundle(tmp_path, make_contents(n_items=50, dim=8, ranker=ranker))
    with pytest.raises(BundleError, match=f"input 'context' has width {spec.context_dim + 3}"):
        Bundle.load(path)


def test_cold_start_naming_unknown_items_is_rejected(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy" / "toy" / "1"
    shutil.copytree(bundle_dir, copy)
    cold = json.loads((copy / COLD_START).read_text())
    cold["global"].append(["no-such-item", 0.1])
    (copy / COLD_START).write_text(json.dumps(cold))
    with pytest.raises(BundleError) as err:
        Bundle.load(copy)
    assert err.value.file == COLD_START  # checksum catches the edit first, naming the same file


def test_model_names_that_escape_the_repository_are_rejected(tmp_path: Path) -> None:
    for name in ("../evil", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            publish_bundle(tmp_path, make_contents(n_items=20, model_name=name))


def _with_item_features(tmp_path: Path, ranker_width: int, matrix_width: int) -> Path:
    spec = replace(default_feature_spec(8), item_features=tuple(f"f{i}" for i in range(matrix_width)))
    ranker = make_ranker_onnx(8, spec.context_dim, item_feature_dim=ranker_width)
    contents = replace(
        make_contents(n_items=40, dim=8, spec=spec, ranker=ranker),
        item_features=np.arange(40 * matrix_width, dtype=np.float32).reshape(40, matrix_width),
    )
    return publish_bundle(tmp_path, contents)


def test_item_features_round_trip_and_reach_the_ranker(tmp_path: Path) -> None:
    bundle = Bundle.load(_with_item_features(tmp_path, 3, 3))
    assert bundle.item_features is not None and bundle.item_features.shape == (40, 3)
    assert ITEM_FEATURES in json.loads((bundle.directory / MANIFEST).read_text())["files"]
    user = np.zeros((1, 8), np.float32)
    items = bundle.item_embeddings[None, :2]
    scores = bundle.ranker.score(
        user, np.zeros((1, bundle.feature_spec.context_dim), np.float32), items, bundle.item_features[None, :2]
    )
    np.testing.assert_allclose(scores[0], bundle.item_features[:2].sum(axis=1))


def test_ranker_without_the_item_features_input_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="inputs are") as err:
        Bundle.load(_with_item_features(tmp_path, 0, 3))
    assert err.value.file == RANKER


def test_item_features_of_the_wrong_shape_are_named(tmp_path: Path) -> None:
    path = _with_item_features(tmp_path, 3, 3)
    np.save(path / ITEM_FEATURES, np.zeros((40, 2), np.float32))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][ITEM_FEATURES] = {
        "sha256": sha256_of(path / ITEM_FEATURES),
        "bytes": (path / ITEM_FEATURES).stat().st_size,
    }
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"expected float32 \(40, 3\)") as err:
        Bundle.load(path)
    assert err.value.file == ITEM_FEATURES


def test_non_finite_embeddings_are_rejected(tmp_path: Path) -> None:
    contents = make_contents(n_items=30, dim=8)
    contents.item_embeddings[3, 2] = np.nan
    with pytest.raises(BundleError, match="NaN or infinite") as err:
        Bundle.load(publish_bundle(tmp_path, contents))
    assert err.value.file == EMBEDDINGS


def test_a_stray_numeric_file_does_not_stall_publishing(tmp_path: Path) -> None:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "1").write_text("not a version")
    assert publish_toy(tmp_path, n_items=20).name == "2"


def test_ranker_output_of_the_wrong_rank_is_named(tmp_path: Path) -> None:
    ranker = make_ranker_onnx(8, CONTEXT_DIM, scores_rank3=True)
    with pytest.raises(BundleError, match="output 'scores' is tensor\\(float\\) of rank 3") as err:
        Bundle.load(publish_bundle(tmp_path, make_contents(n_items=30, dim=8, ranker=ranker)))
    assert err.value.file == RANKER


def test_index_file_that_is_not_what_the_manifest_says_is_named(tmp_path: Path) -> None:
    from hyperrec.index import IVF, IndexParams, build

    path = publish_toy(tmp_path, n_items=600, dim=8)  # flat per the manifest
    ivf = IndexParams(IVF, nlist=8, nprobe=1)
    build(np.load(path / EMBEDDINGS), ivf).save(path / INDEX)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][INDEX] = {"sha256": sha256_of(path / INDEX), "bytes": (path / INDEX).stat().st_size}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="holds IndexIVFFlat, the manifest says flat") as err:
        Bundle.load(path)
    assert err.value.file == INDEX


@pytest.mark.parametrize(
    "change",
    [{"files": []}, {"format_version": 1.9}, {"item_count": 1e999}, {"feature_spec": "nope"}],
    ids=["files-list", "fractional-version", "huge-count", "spec-string"],
)
def test_manifest_fields_of_the_wrong_type_are_bundle_errors(bundle_dir: Path, change: dict[str, object]) -> None:
    _rewrite_manifest(bundle_dir, **change)
    with pytest.raises(BundleError) as err:
        Bundle.load(bundle_dir)
    assert err.value.file in (MANIFEST, ITEM_IDS)


def test_loading_pauses_the_garbage_collector_only_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model manager's load turns the cyclic collector off for the load and back on after it, also when the
    version is broken (a full collection during a large load would stall the serving event loop)."""
    import gc

    from hyperrec.core.model_manager import load_without_gc_pauses
    from hyperrec.core.ranker import RankerOptions
    from tests.helpers import publish_toy

    seen: list[bool] = []
    real = Bundle.load

    def watching(*args: object) -> Bundle:
        seen.append(gc.isenabled())
        return real(*args)  # type: ignore[arg-type]

    version = publish_toy(tmp_path, model_name="toy", seed=1)
    monkeypatch.setattr(Bundle, "load", watching)
    bundle = load_without_gc_pauses(version, RankerOptions(), "auto")
    with pytest.raises(BundleError):
        load_without_gc_pauses(tmp_path / "toy" / "99", RankerOptions(), "auto")
    assert bundle.version == "1" and seen == [False, False] and gc.isenabled()


def _refresh_checksums(directory: Path, format_version: int | None = None, drop: tuple[str, ...] = ()) -> None:
    """Record the files' current sizes and SHA-256 in the manifest (a deliberately edited bundle that is
    otherwise consistent), optionally as another format version and without some files."""
    manifest = json.loads((directory / MANIFEST).read_text())
    names = [n for n in manifest["files"] if n not in drop]
    names += [n for n in ("item_ids.json",) if (directory / n).exists() and n not in names]
    manifest["files"] = {
        n: {"sha256": sha256_of(directory / n), "bytes": (directory / n).stat().st_size} for n in names
    }
    if format_version is not None:
        manifest["format_version"] = format_version
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _multi_category_contents() -> BundleContents:
    contents = make_contents(n_items=90, dim=8, categories=3)
    cats = [(f"cat-{i % 3}", "sale") if i % 4 == 0 else () if i % 7 == 0 else (f"cat-{i % 3}",) for i in range(90)]
    return replace(contents, item_categories=cats)


def test_format_1_bundles_with_json_ids_and_categories_still_load(tmp_path: Path) -> None:
    """Bundles published before format 2 (ids and item categories as JSON) load to the same ids, rows,
    categories and category centroids."""
    contents = _multi_category_contents()
    path = publish_bundle(tmp_path, contents)
    current = Bundle.load(path)
    assert current.manifest.format_version == 2
    names = list(current.categories.names) if current.categories else []
    (path / "item_ids.json").write_text(json.dumps(list(contents.item_ids)))
    items = [[names.index(c) for c in cats] for cats in contents.item_categories or ()]
    (path / ITEM_CATEGORIES).write_text(json.dumps({"names": names, "items": items}))
    for name in (ITEM_IDS, ITEM_ID_OFFSETS, ITEM_CATEGORY_COLUMNS):
        (path / name).unlink()
    _refresh_checksums(path, format_version=1, drop=(ITEM_IDS, ITEM_ID_OFFSETS, ITEM_CATEGORY_COLUMNS))
    old = Bundle.load(path)
    assert old.manifest.format_version == 1
    assert tuple(old.item_ids) == tuple(contents.item_ids)
    assert [old.item_ids.row(i) for i in contents.item_ids] == list(range(90))
    assert [old.categories_of(i) for i in contents.item_ids] == [tuple(c) for c in contents.item_categories or ()]
    assert old.categories is not None and current.categories is not None
    np.testing.assert_allclose(old.categories.centroids, current.categories.centroids)
    sale = np.mean([contents.item_embeddings[i] for i in range(0, 90, 4)], axis=0)
    np.testing.assert_allclose(current.categories.centroids[names.index("sale")], sale, rtol=1e-5, atol=1e-6)
    assert current.categories_of(contents.item_ids[7]) == () and current.categories_of("no-such-item") == ()


@pytest.mark.parametrize(
    ("id_bytes", "offsets", "message"),
    [
        (b"abcd", [0, 3, 2, 4], "offsets must rise"),
        (b"abcd", [0, 2, 5], "offsets must rise from 0 to the length"),
        (b"ab\xffd", [0, 2, 4], "not UTF-8"),
        ("aé".encode(), [0, 2, 3], "boundary falls inside a UTF-8 character"),
        (b"abab", [0, 2, 4], "'ab' repeats"),
    ],
    ids=["falling-offsets", "offsets-past-the-end", "not-utf8", "split-character", "repeated-id"],
)
def test_broken_item_id_files_are_named(tmp_path: Path, id_bytes: bytes, offsets: list[int], message: str) -> None:
    path = publish_toy(tmp_path, n_items=80)
    np.save(path / ITEM_IDS, np.frombuffer(id_bytes, dtype=np.uint8))
    np.save(path / ITEM_ID_OFFSETS, np.array(offsets, dtype=np.int64))
    _refresh_checksums(path)
    with pytest.raises(BundleError, match=message) as err:
        Bundle.load(path)
    assert err.value.file == ITEM_IDS


def test_category_columns_naming_an_unknown_category_are_named(tmp_path: Path) -> None:
    path = publish_bundle(tmp_path, _multi_category_contents())
    columns = np.load(path / ITEM_CATEGORY_COLUMNS)
    columns[5, 0] = 4  # four names: cat-0..2 and sale
    np.save(path / ITEM_CATEGORY_COLUMNS, columns)
    _refresh_checksums(path)
    with pytest.raises(BundleError, match=r"category index outside -1\.\.3") as err:
        Bundle.load(path)
    assert err.value.file == ITEM_CATEGORY_COLUMNS


def test_the_load_stall_probe_reports_the_load_and_the_loops_gaps(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = publish_bundle(tmp_path, _multi_category_contents())
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_stall_probe", str(path), "--runs", "2"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(runs) == 2 and all(r["load_ms"] > 0 and r["worst_gap_ms"] >= 0 for r in runs)
    assert set(runs[0]) == {"load_ms", "worst_gap_ms", "gaps_over_10_ms", "ms_lost_to_gaps_over_5_ms"}


@pytest.mark.parametrize("name", [ITEM_IDS, ITEM_ID_OFFSETS, EMBEDDINGS])
@pytest.mark.parametrize("content", ["empty", "npz"])
def test_an_array_file_that_is_not_one_numpy_array_is_named(tmp_path: Path, name: str, content: str) -> None:
    """A 0-byte file or an .npz archive under a .npy name (checksums matching) is a BundleError naming the file,
    not an EOFError or AttributeError that would leave the version stuck in LOADING."""
    path = publish_toy(tmp_path, n_items=80)
    if content == "empty":
        (path / name).write_bytes(b"")
    else:
        with (path / name).open("wb") as fh:
            np.savez(fh, a=np.zeros(3))
    _refresh_checksums(path)
    with pytest.raises(BundleError, match="not a numpy array file") as err:
        Bundle.load(path)
    assert err.value.file == name


def test_format_1_category_names_that_repeat_are_rejected(tmp_path: Path) -> None:
    contents = _multi_category_contents()
    path = publish_bundle(tmp_path, contents)
    items = [[0] for _ in range(90)]
    (path / ITEM_CATEGORIES).write_text(json.dumps({"names": ["a", "b", "a"], "items": items}))
    (path / "item_ids.json").write_text(json.dumps(list(contents.item_ids)))
    for name in (ITEM_IDS, ITEM_ID_OFFSETS, ITEM_CATEGORY_COLUMNS):
        (path / name).unlink()
    _refresh_checksums(path, format_version=1, drop=(ITEM_IDS, ITEM_ID_OFFSETS, ITEM_CATEGORY_COLUMNS))
    with pytest.raises(BundleError, match="category names repeat") as err:
        Bundle.load(path)
    assert err.value.file == ITEM_CATEGORIES


def test_category_columns_listed_without_the_names_are_named(tmp_path: Path) -> None:
    path = publish_bundle(tmp_path, _multi_category_contents())
    (path / ITEM_CATEGORIES).unlink()
    _refresh_checksums(path, drop=(ITEM_CATEGORIES,))
    with pytest.raises(BundleError, match="not listed") as err:
        Bundle.load(path)
    assert err.value.file == ITEM_CATEGORIES
