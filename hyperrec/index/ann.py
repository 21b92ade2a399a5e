"""Approximate nearest-neighbour search over item embeddings with FAISS.

Rows are item positions 0..n-1 in the bundle's item list (int64, never narrowed).
Scores are inner products. Small catalogues use exact search (IndexFlatIP);
large ones an inverted-file index whose parameters come from the bundle manifest.

Device: with a FAISS build that has GPU support (the `gpu` extra's faiss-gpu-cu12) and a visible GPU, a loaded
index is copied to GPU 0 (`device` "auto", the default) and searched there; the CPU copy stays for saving,
checks, and the searches GPU FAISS cannot do (top-k or nprobe above GPU_MAX_K). Only index types in GPU_KINDS
move; anything else (HNSW, for one) stays on the CPU. Without GPU support everything runs exactly as on CPU.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT = "flat"
IVF = "ivf"
HNSW = "hnsw"
IVFPQ = "ivfpq"
KINDS = (FLAT, IVF, HNSW, IVFPQ)
IVF_KINDS = (IVF, IVFPQ)  # inverted-file indexes: nlist lists, nprobe probed, an exhaustive retry possible
FAISS_CLASS = {FLAT: "IndexFlatIP", IVF: "IndexIVFFlat", HNSW: "IndexHNSWFlat", IVFPQ: "IndexIVFPQ"}
PQ_TRAIN_SAMPLE = 262_144  # vectors IVF-PQ trains its quantisers on (a random sample of the catalogue)

# Where an index runs (AnnIndex.device; also the `device` label of hyperrec_accelerator_info for the index).
CPU = "cpu"
CUDA = "cuda"
# What callers may ask for: "auto" (GPU when FAISS has GPU support and sees one), "cpu", or "gpu" (required).
AUTO = "auto"
GPU = "gpu"
DEVICE_CHOICES = (AUTO, CPU, GPU)
# FAISS index classes moved to the GPU by index_cpu_to_gpu here; others (e.g. IndexHNSWFlat) stay on the CPU.
GPU_KINDS = frozenset({"IndexFlat", "IndexFlatIP", "IndexFlatL2", "IndexIVFFlat"})
# GPU FAISS selects at most this many results (k) and probes at most this many lists (nprobe) per query
# (GPU_MAX_SELECTION_K of CUDA builds); larger searches run on the CPU copy.
GPU_MAX_K = 2048
GPU_ID = 0

_default_device = AUTO
# GPU FAISS resources are not thread-safe: one StandardGpuResources per process, and every use of it (copying an
# index to the GPU, searching, freeing a GPU index) holds this lock. Reentrant, because a GPU index can be freed
# by garbage collection in a thread that already holds it.
_gpu_lock = threading.RLock()
_gpu_resources: Any = None


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
        out: dict[str, Any] = {"type": self.kind, "metric": "inner_product", "nlist": self.nlist, "nprobe": self.nprobe}
        if self.kind == HNSW:
            out |= {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}
        if self.kind == IVFPQ:
            out["pq_m"] = self.pq_m
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> IndexParams:
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
        if params.kind not in KINDS:
            raise ValueError(f"unknown index type {params.kind!r}")
        if data.get("metric", "inner_product") != "inner_product":
            raise ValueError(f"unsupported metric {data.get('metric')!r}")
        if params.kind in IVF_KINDS and not (0 < params.nprobe <= params.nlist):
            raise ValueError(f"{params.kind} index needs 0 < nprobe <= nlist")
        if params.kind == HNSW and min(params.hnsw_m, params.ef_construction, params.ef_search) < 1:
            raise ValueError("hnsw index needs positive hnsw_m, ef_construction and ef_search")
        if params.kind == IVFPQ and params.pq_m < 1:
            raise ValueError("ivfpq index needs a positive pq_m")
        return params


def set_threads(n: int) -> None:
    """FAISS OpenMP threads for this process (1 is best for single-query latency on few cores)."""
    faiss.omp_set_num_threads(max(1, n))


def _check_device(device: str) -> str:
    if device not in DEVICE_CHOICES:
        raise ValueError(f"index device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    return device


def set_device(device: str) -> None:
    """Where `AnnIndex.load` puts indexes from now on, unless told otherwise: "auto", "cpu" or "gpu"."""
    global _default_device
    _default_device = _check_device(device)


def default_device() -> str:
    return _default_device


def gpu_count() -> int:
    """GPUs FAISS can use: 0 for a build without GPU support (faiss-cpu) or a machine without a visible GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def _shared_resources() -> Any:
    """The process's one StandardGpuResources, created on first use (call with _gpu_lock held)."""
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def _place(index: Any, device: str) -> tuple[Any, str]:
    """(a GPU copy of `index` or None, why). Raises ValueError when `device` is "gpu" and it cannot be."""
    if device == CPU:
        return None, "device cpu asked for"
    kind = type(index).__name__
    if gpu_count() == 0:
        reason = "FAISS has no GPU support or sees no GPU"
    elif kind not in GPU_KINDS:
        reason = f"{kind} does not run on GPU FAISS here"
    else:
        try:
            with _gpu_lock:
                return faiss.index_cpu_to_gpu(_shared_resources(), GPU_ID, index), f"GPU {GPU_ID}"
        except RuntimeError as exc:  # e.g. out of GPU memory: "auto" serves from the CPU, "gpu" fails below
            reason = f"copying it to GPU {GPU_ID} failed: {exc}"
            if device == AUTO:
                log.warning("FAISS index %s stays on the CPU: %s", kind, reason)
    if device == GPU:
        raise ValueError(f"index device gpu asked for, but {reason}")
    return None, reason


def _hnsw_params(ef_search: int) -> Any:
    params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's own .pyi
    params.efSearch = ef_search
    return params


ADD_CHUNK = 65_536  # vectors added per FAISS call when building (the unit of build progress)


class AnnIndex:
    """Inner-product search over a fixed item set. Build with `build` or `load`; search is thread-safe.

    `device` is where searches run: "cpu", or "cuda" when a GPU copy was made (GPU searches are serialised, as
    GPU FAISS requires)."""

    def __init__(self, index: Any, params: IndexParams, device: str = CPU) -> None:
        """Wrap a CPU FAISS index; `device` "auto" or "gpu" also copies it to the GPU (see the module doc)."""
        self._gpu_index: Any = None
        self._index = index
        self.params = params
        self._gpu_index, self._placement = _place(index, _check_device(device))
        self._asked = device
        self.device = CPU if self._gpu_index is None else CUDA
        self._search_params: Any = None
        self._exhaustive_params: Any = None
        if params.kind in IVF_KINDS:
            self._search_params = faiss.SearchParametersIVF()
            self._search_params.nprobe = params.nprobe
            self._exhaustive_params = faiss.SearchParametersIVF()
            self._exhaustive_params.nprobe = params.nlist
        # PQ codes give approximate inner products: the caller rescores candidates with the real vectors
        self.exact_scores = params.kind != IVFPQ

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        params: IndexParams,
        seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        device: str = CPU,
    ) -> AnnIndex:
        """Index `embeddings` (float32 [n, d]); IVF trains its coarse quantiser on them, on the CPU.

        `on_progress(added, total)` is called after training and after each chunk of added vectors. The result
        stays on the CPU (it is usually only saved into a bundle) unless `device` says otherwise.
        """
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        dim = vectors.shape[1]
        if params.kind == FLAT:
            index: Any = faiss.IndexFlatIP(dim)
        elif params.kind == HNSW:
            index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
        elif params.kind == IVF:
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(vectors)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            rng = np.random.default_rng(seed)
            sample = vectors if len(vectors) <= PQ_TRAIN_SAMPLE else vectors[rng.choice(len(vectors), PQ_TRAIN_SAMPLE)]
            index.train(sample)
        total = len(vectors)
        if on_progress is not None:
            on_progress(0, total)
        for start in range(0, total, ADD_CHUNK):
            index.add(vectors[start : start + ADD_CHUNK])
            if on_progress is not None:
                on_progress(min(start + ADD_CHUNK, total), total)
        built = cls(index, params, device)
        if device != CPU:
            built.log_device()
        return built

    @classmethod
    def load(cls, path: Path, params: IndexParams, device: str | None = None) -> AnnIndex:
        """Read an index file; `device` None means the process default (`set_device`, "auto" unless changed)."""
        loaded = cls(faiss.read_index(str(path)), params, _default_device if device is None else device)
        loaded.log_device()
        return loaded

    def log_device(self) -> None:
        """Log at INFO where this index searches and why."""
        log.info(
            "FAISS index %s (%d vectors) on %s (device %s: %s)",
            self.kind_name,
            self.size,
            self.device,
            self._asked,
            self._placement,
        )

    def __del__(self) -> None:
        gpu_index = getattr(self, "_gpu_index", None)
        if gpu_index is not None:
            self._gpu_index = None
            with _gpu_lock:  # freeing GPU memory goes through the shared resources too
                del gpu_index

    @property
    def nbytes(self) -> int:
        """Size of the index as FAISS serialises it (about its memory), in bytes."""
        return int(faiss.serialize_index(self._index).nbytes)

    def save(self, path: Path) -> None:
        faiss.write_index(self._index, str(path))

    def check_params(self) -> None:
        """Raise ValueError when the FAISS index is not what `params` says (kind, metric, list count)."""
        expected = FAISS_CLASS[self.params.kind]
        if self.kind_name != expected:
            raise ValueError(f"the file holds {self.kind_name}, the manifest says {self.params.kind} ({expected})")
        if self._index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the index does not use the inner-product metric")
        if self.params.kind in IVF_KINDS and int(self._index.nlist) != self.params.nlist:
            raise ValueError(f"the index has {self._index.nlist} lists, the manifest says {self.params.nlist}")

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def kind_name(self) -> str:
        """FAISS class name, e.g. IndexIVFFlat."""
        return type(self._index).__name__

    def search(self, queries: np.ndarray, n: int, exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-n rows per query: (scores float32 [b, n], rows int64 [b, n]); missing slots are row -1."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        n = max(1, min(n, self.size))
        params = self._exhaustive_params if exhaustive else self._search_params
        if self.params.kind == HNSW:
            # the graph search keeps ef candidates: fewer than n would return fewer than n results
            params = _hnsw_params(max(self.params.ef_search, (4 if exhaustive else 1) * n))
        gpu_index = self._gpu_index
        if gpu_index is not None and n <= GPU_MAX_K and (params is None or params.nprobe <= GPU_MAX_K):
            with _gpu_lock:
                scores, rows = gpu_index.search(q, n, params=params)
        else:
            scores, rows = self._index.search(q, n, params=params)
        return scores, rows.astype(np.int64, copy=False)

    def search_excluding(
        self, query: np.ndarray, n: int, excluded_rows: Collection[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n rows for one query that are not in `excluded_rows`.

        Over-fetches by the number of exclusions; when an approximate search still
        comes back short, repeats it exhaustively (IVF: every list; HNSW: a four times
        wider graph search), so that min(n, size - |excluded|) rows come back.
        """
        return self.search_excluding_many(np.asarray(query)[None, :], [n], [excluded_rows])[0]

    def search_excluding_many(
        self, queries: np.ndarray, wants: Sequence[int], excluded_rows: Sequence[Collection[int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search_excluding` for a batch of queries [b, d] with one FAISS search: the i-th query's top wants[i]
        rows not in excluded_rows[i]. Only a query that comes back short is searched again, exhaustively."""
        excluded = [set(e) for e in excluded_rows]
        wanted = [min(n, self.size - len(e)) for n, e in zip(wants, excluded, strict=True)]
        fetch = max(w + len(e) for w, e in zip(wanted, excluded, strict=True))
        if fetch <= 0:
            return [(np.empty(0, np.float32), np.empty(0, np.int64)) for _ in wanted]
        scores, rows = self.search(queries, fetch)
        out = []
        for i, (want, skip) in enumerate(zip(wanted, excluded, strict=True)):
            if want <= 0:
                out.append((np.empty(0, np.float32), np.empty(0, np.int64)))
                continue
            kept_scores, kept_rows = self._keep(scores[i : i + 1], rows[i : i + 1], skip)
            if len(kept_rows) < want and self.params.kind != FLAT:
                kept_scores, kept_rows = self._keep(*self.search(queries[i], want + len(skip), exhaustive=True), skip)
            out.append((kept_scores[:want], kept_rows[:want]))
        return out

    @staticmethod
    def _keep(scores: np.ndarray, rows: np.ndarray, excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
        s, r = scores[0], rows[0]
        mask = r >= 0
        if excluded:
            mask &= ~np.isin(r, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
        return s[mask], r[mask]
