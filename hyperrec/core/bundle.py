"""The model bundle format: writing, publishing, reading and validating.

A bundle is one immutable directory `model_repo/<model>/<version>/` holding
everything one model version needs to serve (see docs/model-bundle.md). The
trainer writes bundles with `publish_bundle`; the server reads them with
`Bundle.load`. Nothing else touches the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hyperrec import index as ann
from hyperrec.core.errors import BundleError, NotFound
from hyperrec.core.features import FeatureSpec
from hyperrec.core.items import ItemIds
from hyperrec.core.names import check_name
from hyperrec.core.ranker import OnnxRanker, RankerOptions
from hyperrec.index import AnnIndex, IndexParams

FORMAT_VERSION = 2  # what write_bundle writes
# Format 1 held the item ids and each item's categories as JSON; parsing a million ids from JSON stalled a serving
# process's event loop, so format 2 holds them as numpy arrays. Format 1 bundles still load.
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
RANKER = "ranker.onnx"
EMBEDDINGS = "item_embeddings.npy"
ITEM_IDS = "item_ids.npy"  # uint8: every id's UTF-8 bytes, concatenated in row order
ITEM_ID_OFFSETS = "item_id_offsets.npy"  # int64 [item_count + 1]: row i's id is ITEM_IDS[offsets[i]:offsets[i + 1]]
ITEM_IDS_JSON = "item_ids.json"  # format 1: a JSON array of the ids
INDEX = "index.faiss"
COLD_START = "cold_start.json"
ITEM_FEATURES = "item_features.npy"
SEGMENTS = "segments.npy"
ITEM_CATEGORIES = "item_categories.json"  # the category names (format 1: and each item's categories)
ITEM_CATEGORY_COLUMNS = "item_category_columns.npy"  # int64 [item_count, most per item]: names' indexes, -1 pad
DATA_FILES = (RANKER, EMBEDDINGS, ITEM_IDS, ITEM_ID_OFFSETS, INDEX, COLD_START)
# Present exactly when the feature spec names item features / has a segment block.
# Present when the catalogue has category metadata (live category affinities and declared interests need it).
CATALOGUE_FILES = (ITEM_CATEGORIES, ITEM_CATEGORY_COLUMNS)


def data_files(format_version: int) -> tuple[str, ...]:
    """The files every bundle of this format has."""
    return DATA_FILES if format_version != 1 else (RANKER, EMBEDDINGS, ITEM_IDS_JSON, INDEX, COLD_START)


def catalogue_files(format_version: int) -> tuple[str, ...]:
    """The files of a bundle of this format with category metadata."""
    return CATALOGUE_FILES if format_version != 1 else (ITEM_CATEGORIES,)


STAGING_PREFIX = ".staging-"
GLOBAL_SEGMENT = "global"


def segment_key(segment: int) -> str:
    """cold_start.json key of a behavioural segment's list."""
    return f"segment={segment}"


@dataclass(frozen=True)
class ColdStart:
    """Popular items, overall and per context segment, each list best first.

    Segment keys look like "device=mobile|daypart=evening" or "device=mobile";
    `candidates` walks from the most specific list to the global one.
    """

    global_items: tuple[tuple[str, float], ...]
    segments: Mapping[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)

    def candidates(self, device: str, daypart: str) -> Iterator[tuple[str, float]]:
        """Items for the segment, then for the device, then global, without repeats."""
        seen: set[str] = set()
        for key in (f"device={device}|daypart={daypart}", f"device={device}"):
            for item in self.segments.get(key, ()):
                if item[0] not in seen:
                    seen.add(item[0])
                    yield item
        for item in self.global_items:
            if item[0] not in seen:
                seen.add(item[0])
                yield item

    def for_segment(self, segment: int) -> tuple[tuple[str, float], ...]:
        """Popular items among the users of one behavioural segment (empty when the bundle has no such list)."""
        return self.segments.get(segment_key(segment), ())

    def to_json(self) -> dict[str, Any]:
        return {
            GLOBAL_SEGMENT: [[i, s] for i, s in self.global_items],
            "segments": {k: [[i, s] for i, s in v] for k, v in self.segments.items()},
        }

    @staticmethod
    def from_json(data: Mapping[str, Any], known: ItemIds) -> ColdStart:
        def items(raw: Sequence[Any], where: str) -> tuple[tuple[str, float], ...]:
            out = tuple((str(i), float(s)) for i, s in raw)
            rows = known.rows(item_id for item_id, _ in out)
            if (rows < 0).any():
                missing = out[int(np.flatnonzero(rows < 0)[0])][0]
                raise BundleError(COLD_START, f"{where} names item {missing!r}, which is not in the bundle's ids")
            return out

        try:
            global_items = items(data[GLOBAL_SEGMENT], GLOBAL_SEGMENT)
            segments = {str(k): items(v, f"segment {k!r}") for k, v in data.get("segments", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(COLD_START, f"malformed: {exc!r}") from exc
        if not all(math.isfinite(s) for lst in (global_items, *segments.values()) for _, s in lst):
            raise BundleError(COLD_START, "holds a non-finite score")
        if not global_items:
            raise BundleError(COLD_START, "the global list is empty")
        return ColdStart(global_items, segments)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` says about a bundle."""

    model_name: str
    embedding_space: str
    created_at: str
    feature_spec: FeatureSpec
    index_params: IndexParams
    item_count: int
    files: Mapping[str, FileEntry]
    training: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_name": self.model_name,
            "embedding_space": self.embedding_space,
            "created_at": self.created_at,
            "embedding_dim": self.feature_spec.embedding_dim,
            "item_count": self.item_count,
            "feature_spec": self.feature_spec.to_json(),
            "index": self.index_params.to_json(),
            "files": {name: {"sha256": f.sha256, "bytes": f.bytes} for name, f in sorted(self.files.items())},
            "training": dict(self.training),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Manifest:
        try:
            version = data["format_version"]
            if type(version) is not int or version not in READABLE_FORMATS:
                readable = " or ".join(str(v) for v in READABLE_FORMATS)
                raise BundleError(MANIFEST, f"format_version {version} is not supported (expected {readable})")
            spec = FeatureSpec.from_json(data["feature_spec"])
            if int(data["embedding_dim"]) != spec.embedding_dim:
                raise BundleError(MANIFEST, "embedding_dim disagrees with feature_spec.embedding_dim")
            try:
                params = IndexParams.from_json(data["index"])
            except ValueError as exc:
                raise BundleError(MANIFEST, f"index: {exc}") from exc
            files = {str(k): FileEntry(str(v["sha256"]), int(v["bytes"])) for k, v in data["files"].items()}
            return Manifest(
                model_name=str(data["model_name"]),
                embedding_space=str(data["embedding_space"]),
                created_at=str(data["created_at"]),
                feature_spec=spec,
                index_params=params,
                item_count=int(data["item_count"]),
                files=files,
                training=dict(data.get("training", {})),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise BundleError(MANIFEST, f"malformed: missing or invalid field {exc!r}") from exc


@dataclass(frozen=True)
class BundleContents:
    """Everything a trainer hands over to be written as a bundle."""

    model_name: str
    item_ids: Sequence[str]
    item_embeddings: np.ndarray
    ranker_onnx: bytes
    feature_spec: FeatureSpec
    cold_start: ColdStart
    index_params: IndexParams
    embedding_space: str
    training: Mapping[str, Any] = field(default_factory=dict)
    item_features: np.ndarray | None = None  # float32 [items, spec.item_feature_dim], already transformed
    segments: np.ndarray | None = None  # float32 [spec.segments, embedding_dim]: K-Means centroids of user vectors
    item_categories: Sequence[Sequence[str]] | None = None  # per item, its category names


@dataclass(frozen=True)
class Categories:
    """The catalogue's categories: names, each item's categories, and each category's mean item embedding."""

    names: tuple[str, ...]
    centroids: np.ndarray  # float32 [len(names), embedding_dim]
    columns: np.ndarray  # int64 [items, most categories of an item]: each item's category indexes, -1 padding
    index: Mapping[str, int]  # name -> position in `names` (built once: requests look it up)

    def of_row(self, row: int) -> tuple[str, ...]:
        """The categories of the item at `row`."""
        return tuple(self.names[c] for c in self.columns[row].tolist() if c >= 0)

    def centroid_of(self, names: Sequence[str]) -> np.ndarray | None:
        """Mean of the named categories' centroids (unknown names ignored); None when none is known."""
        rows = [self.index[n] for n in names if n in self.index]
        return None if not rows else np.asarray(self.centroids[rows].mean(axis=0), dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names)}

    @staticmethod
    def build(of_item: Sequence[Sequence[str]], embeddings: np.ndarray) -> Categories:
        """From each item's category names (a trainer's catalogue)."""
        names = tuple(sorted({c for cats in of_item for c in cats}))
        index = {name: i for i, name in enumerate(names)}
        columns = np.full((len(of_item), max((len(c) for c in of_item), default=0) or 1), -1, dtype=np.int64)
        for row, cats in enumerate(of_item):
            columns[row, : len(cats)] = [index[c] for c in cats]
        return Categories.from_columns(names, columns, embeddings)

    @staticmethod
    def from_columns(names: Sequence[str], columns: np.ndarray, embeddings: np.ndarray) -> Categories:
        """From the names (distinct: `read` checks a bundle's, `build` makes them so) and the per-item index
        matrix; ValueError when they do not fit each other or the items.

        Vectorised: a bundle's million items cost a few numpy passes, not a Python loop per item."""
        if columns.ndim != 2 or columns.shape[0] != len(embeddings) or columns.dtype != np.int64:
            raise ValueError(f"is {columns.dtype} {columns.shape}, expected int64 ({len(embeddings)}, widest)")
        if columns.size and (columns.min() < -1 or columns.max() >= len(names)):
            raise ValueError(f"holds a category index outside -1..{len(names) - 1}")
        sums = np.zeros((len(names), embeddings.shape[1]), dtype=np.float64)
        counts = np.zeros(len(names), dtype=np.int64)
        for j in range(columns.shape[1]):
            column = columns[:, j]
            present = column >= 0
            np.add.at(sums, column[present], embeddings[present])
            counts += np.bincount(column[present], minlength=len(names))
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        return Categories(tuple(names), centroids, columns, {name: i for i, name in enumerate(names)})

    @staticmethod
    def read(directory: Path, format_version: int, embeddings: np.ndarray) -> Categories:
        """A bundle's categories: names from ITEM_CATEGORIES, per-item indexes from ITEM_CATEGORY_COLUMNS (format
        1: both from ITEM_CATEGORIES, as JSON lists)."""
        try:
            data = json.loads((directory / ITEM_CATEGORIES).read_text())
            names = [str(n) for n in data["names"]]
            if len(set(names)) != len(names):
                raise BundleError(ITEM_CATEGORIES, "category names repeat")
            if format_version == 1:
                return Categories.build([tuple(names[int(i)] for i in cats) for cats in data["items"]], embeddings)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(ITEM_CATEGORIES, f"malformed: {exc!r}") from exc
        columns = load_array(directory, ITEM_CATEGORY_COLUMNS)
        try:
            return Categories.from_columns(names, columns, embeddings)
        except ValueError as exc:
            raise BundleError(ITEM_CATEGORY_COLUMNS, str(exc)) from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle(
    directory: Path, contents: BundleContents, on_index_progress: Callable[[int, int], None] | None = None
) -> Manifest:
    """Write all bundle files into an existing empty `directory`; the manifest goes last.

    `on_index_progress(added, total)` follows the ANN index build (the slow part for large catalogues)."""
    try:
        ids = ItemIds.from_strings(contents.item_ids)
    except ValueError as exc:
        raise ValueError(f"item ids: {exc}") from exc
    emb = np.ascontiguousarray(contents.item_embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ids) or emb.shape[1] != contents.feature_spec.embedding_dim:
        dim = contents.feature_spec.embedding_dim
        raise ValueError(f"embeddings of shape {emb.shape} do not fit {len(ids)} items of dim {dim}")
    (directory / RANKER).write_bytes(contents.ranker_onnx)
    np.save(directory / EMBEDDINGS, emb, allow_pickle=False)
    id_bytes, id_offsets = ids.arrays()
    np.save(directory / ITEM_IDS, id_bytes, allow_pickle=False)
    np.save(directory / ITEM_ID_OFFSETS, id_offsets, allow_pickle=False)
    ann.build(emb, contents.index_params, on_progress=on_index_progress).save(directory / INDEX)
    (directory / COLD_START).write_text(json.dumps(contents.cold_start.to_json()))
    names = list(DATA_FILES)
    width = contents.feature_spec.item_feature_dim
    if width:
        features = contents.item_features
        if features is None or features.shape != (len(ids), width):
            raise ValueError(
                f"the feature spec names {width} item features; item_features must be ({len(ids)}, {width})"
            )
        np.save(directory / ITEM_FEATURES, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        names.append(ITEM_FEATURES)
    if contents.feature_spec.segments:
        centroids = contents.segments
        shape = (contents.feature_spec.segments, contents.feature_spec.embedding_dim)
        if centroids is None or centroids.shape != shape:
            raise ValueError(f"the feature spec has a segment block; segments must be {shape}")
        np.save(directory / SEGMENTS, np.ascontiguousarray(centroids, dtype=np.float32), allow_pickle=False)
        names.append(SEGMENTS)
    if contents.feature_spec.behaviour_features and contents.item_categories is None:
        raise ValueError("the feature spec has behaviour features; item_categories are required")
    if contents.item_categories is not None:
        if len(contents.item_categories) != len(ids):
            raise ValueError(f"item_categories has {len(contents.item_categories)} entries for {len(ids)} items")
        categories = Categories.build(contents.item_categories, emb)
        (directory / ITEM_CATEGORIES).write_text(json.dumps(categories.to_json()))
        np.save(directory / ITEM_CATEGORY_COLUMNS, categories.columns, allow_pickle=False)
        names += [ITEM_CATEGORIES, ITEM_CATEGORY_COLUMNS]
    files = {name: FileEntry(sha256_of(directory / name), (directory / name).stat().st_size) for name in names}
    manifest = Manifest(
        model_name=contents.model_name,
        embedding_space=contents.embedding_space,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        feature_spec=contents.feature_spec,
        index_params=contents.index_params,
        item_count=len(ids),
        files=files,
        training=contents.training,
    )
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2))
    return manifest


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(directory)


def publish_bundle(
    repo: Path, contents: BundleContents, on_index_progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write a new version of `contents.model_name` atomically and return its directory.

    The bundle is written and synced in a staging directory inside the model's
    folder, then renamed to the next free version number, so a reader never sees
    a half-written version. Concurrent publishers each get their own number.
    """
    model_dir = Path(repo) / check_name(contents.model_name)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write_bundle(staging, contents, on_index_progress)
        _fsync_tree(staging)
        while True:
            target = model_dir / str(max(_taken_numbers(model_dir), default=0) + 1)
            try:
                staging.rename(target)  # atomic; fails if another publisher took the number
                _fsync_dir(model_dir)  # make the new name itself durable
                return target
            except OSError:
                if not target.exists():
                    raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def list_versions(repo: Path, model_name: str) -> list[int]:
    """Numeric version directories of a model, ascending (staging and other names ignored)."""
    model_dir = Path(repo) / check_name(model_name)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _taken_numbers(model_dir: Path) -> list[int]:
    """Every numeric name in the model's folder, directory or not: a publish must not collide with any."""
    return [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]


def resolve_version(repo: Path, model_name: str, version: int | None = None) -> Path:
    """Directory of `version`, or of the newest version when None; NotFound when absent."""
    versions = list_versions(repo, model_name)
    if version is None:
        if not versions:
            raise NotFound(f"model {model_name!r} has no versions in {repo}")
        version = versions[-1]
    if version not in versions:
        raise NotFound(f"model {model_name!r} has no version {version} in {repo}")
    return Path(repo) / model_name / str(version)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(MANIFEST, f"missing in {directory}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(MANIFEST, f"not readable JSON: {exc}") from exc
    return Manifest.from_json(data)


def lists_categories(manifest: Manifest) -> bool:
    """Whether the bundle carries category metadata (any of its format's category files listed)."""
    return bool(set(catalogue_files(manifest.format_version)) & set(manifest.files))


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every data file is present, listed, and matches its recorded size and SHA-256."""
    spec = manifest.feature_spec
    version = manifest.format_version
    expected = (
        list(data_files(version))
        + ([ITEM_FEATURES] if spec.item_feature_dim else [])
        + ([SEGMENTS] if spec.segments else [])
        + (list(catalogue_files(version)) if lists_categories(manifest) else [])
    )
    for name in expected:
        entry = manifest.files.get(name)
        path = directory / name
        if entry is None:
            raise BundleError(name, f"not listed in {MANIFEST}")
        if not path.is_file():
            raise BundleError(name, "missing")
        if path.stat().st_size != entry.bytes:
            raise BundleError(name, f"size is {path.stat().st_size} bytes, manifest says {entry.bytes}")
        if sha256_of(path) != entry.sha256:
            raise BundleError(name, "checksum mismatch (file changed or corrupt)")


@dataclass(frozen=True)
class Bundle:
    """One loaded, validated, immutable model version: everything a request needs."""

    model_name: str
    version: str
    directory: Path
    manifest: Manifest
    item_ids: ItemIds  # by row; item_ids.row(id) is an id's row
    item_embeddings: np.ndarray
    index: AnnIndex
    ranker: OnnxRanker
    cold_start: ColdStart
    item_features: np.ndarray | None = None
    segments: np.ndarray | None = None
    categories: Categories | None = None

    @property
    def feature_spec(self) -> FeatureSpec:
        return self.manifest.feature_spec

    def categories_of(self, item_id: str) -> tuple[str, ...]:
        """The item's categories; none for an item the bundle lacks, or a bundle without categories."""
        if self.categories is None:
            return ()
        row = self.item_ids.row(item_id)
        return () if row is None else self.categories.of_row(row)

    @classmethod
    def load(cls, directory: Path, options: RankerOptions | None = None, index_device: str = ann.AUTO) -> Bundle:
        """Read and validate every file; raise BundleError naming the first problem.

        `index_device` ("auto", "cpu" or "gpu") says where the ANN index searches; the ranker's execution providers
        come from `options`."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        verify_files(directory, manifest)
        spec = manifest.feature_spec
        ids = _read_item_ids(directory, manifest.format_version)
        if len(ids) != manifest.item_count:
            ids_file = ITEM_IDS_JSON if manifest.format_version == 1 else ITEM_IDS
            raise BundleError(ids_file, f"has {len(ids)} ids, manifest says item_count {manifest.item_count}")
        emb = load_array(directory, EMBEDDINGS, mapped=True)
        if emb.dtype != np.float32 or emb.shape != (manifest.item_count, spec.embedding_dim):
            raise BundleError(
                EMBEDDINGS,
                f"is {emb.dtype} {emb.shape}, expected float32 ({manifest.item_count}, {spec.embedding_dim})",
            )
        if not np.isfinite(emb).all():
            raise BundleError(EMBEDDINGS, "holds NaN or infinite values")
        try:
            index = ann.load(directory / INDEX, manifest.index_params, index_device)
        except RuntimeError as exc:
            raise BundleError(INDEX, f"FAISS cannot read it: {exc}") from exc
        except ValueError as exc:  # index device "gpu" asked for and not possible
            raise BundleError(INDEX, str(exc)) from exc
        try:
            index.check_params()
        except ValueError as exc:
            raise BundleError(INDEX, f"does not match manifest.index: {exc}") from exc
        if index.size != manifest.item_count or index.dim != spec.embedding_dim:
            raise BundleError(
                INDEX,
                f"holds {index.size} vectors of dim {index.dim}, "
                f"expected {manifest.item_count} of dim {spec.embedding_dim}",
            )
        item_features = _load_matrix(directory, ITEM_FEATURES, (manifest.item_count, spec.item_feature_dim))
        segments = _load_matrix(directory, SEGMENTS, (spec.segments, spec.embedding_dim))
        ranker = OnnxRanker.load(
            directory / RANKER,
            spec.embedding_dim,
            spec.context_dim,
            options or RankerOptions(),
            spec.ranker_feature_dim,
        )
        try:
            cold = ColdStart.from_json(json.loads((directory / COLD_START).read_text()), ids)
        except ValueError as exc:
            raise BundleError(COLD_START, f"not valid JSON: {exc}") from exc
        categories = None
        if lists_categories(manifest):
            categories = Categories.read(directory, manifest.format_version, emb)
        if spec.behaviour_features and categories is None:
            raise BundleError(
                ITEM_CATEGORIES, "missing: the feature spec has behaviour features, which need categories"
            )
        return cls(
            model_name=manifest.model_name,
            version=directory.name,
            directory=directory,
            manifest=manifest,
            item_ids=ids,
            item_embeddings=emb,
            index=index,
            ranker=ranker,
            cold_start=cold,
            item_features=item_features,
            segments=segments,
            categories=categories,
        )


def _read_item_ids(directory: Path, format_version: int) -> ItemIds:
    """The bundle's item ids (format 1: from JSON, which builds a Python string per id first)."""
    if format_version == 1:
        try:
            raw = json.loads((directory / ITEM_IDS_JSON).read_text())
        except ValueError as exc:
            raise BundleError(ITEM_IDS_JSON, f"not valid JSON: {exc}") from exc
        if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
            raise BundleError(ITEM_IDS_JSON, "must be a JSON array of strings")
        try:
            return ItemIds.from_strings(raw)
        except ValueError as exc:
            raise BundleError(ITEM_IDS_JSON, str(exc)) from exc
    id_bytes, offsets = load_array(directory, ITEM_IDS), load_array(directory, ITEM_ID_OFFSETS)
    try:
        return ItemIds.from_arrays(id_bytes, offsets)
    except ValueError as exc:
        raise BundleError(ITEM_IDS, str(exc)) from exc


def load_array(directory: Path, name: str, mapped: bool = False) -> np.ndarray:
    """One `.npy` file of the bundle; BundleError naming it when it is not one plain numpy array (empty,
    truncated, an .npz archive, pickled objects).

    `mapped`: memory-map it read-only instead of reading it (the large per-item arrays), so every process
    serving the version (`hyperrec serve --workers N`) shares one copy of its pages. Bundle files are never
    changed in place (publishing writes a new version directory), which a mapping needs."""
    try:
        array = np.load(directory / name, allow_pickle=False, mmap_mode="r" if mapped else None)
    except (ValueError, EOFError, OSError) as exc:
        raise BundleError(name, f"not a numpy array file: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise BundleError(name, "not a numpy array file (an .npz archive?)")
    return np.asarray(array)  # a mapped file as a plain, read-only ndarray over the mapping


def _load_matrix(directory: Path, name: str, expected: tuple[int, int]) -> np.ndarray | None:
    """An optional float32 matrix file of the bundle; None when the spec does not call for it (width 0)."""
    if not expected[0] or not expected[1]:
        return None
    matrix = load_array(directory, name, mapped=True)
    if matrix.dtype != np.float32 or matrix.shape != expected:
        raise BundleError(name, f"is {matrix.dtype} {matrix.shape}, expected float32 {expected}")
    if not np.isfinite(matrix).all():
        raise BundleError(name, "holds NaN or infinite values")
    return matrix
