"""What every FAISS index type shares: GPU placement, reading and writing, threads, and the wrapper class.

Device: with a FAISS build that has GPU support (the `gpu` extra's faiss-gpu-cu12) and a visible GPU, a loaded
index is copied to GPU 0 (`device` "auto", the default) and searched there; the CPU copy stays for saving,
checks, and the searches GPU FAISS cannot do (top-k or nprobe above GPU_MAX_K). Only index types in GPU_KINDS
move; anything else (HNSW, for one) stays on the CPU. Without GPU support everything runs exactly as on CPU.
"""

from __future__ import annotations

import logging
import shutil
import threading
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import faiss
import numpy as np
import numpy.typing as npt

from hyperrec.index.base import AnnIndex, Hits
from hyperrec.index.devices import AUTO, CPU, CUDA, GPU, check_device
from hyperrec.index.params import IndexParams

log = logging.getLogger(__name__)

# FAISS index classes moved to the GPU by index_cpu_to_gpu here; others (e.g. IndexHNSWFlat) stay on the CPU.
GPU_KINDS = frozenset({"IndexFlat", "IndexFlatIP", "IndexFlatL2", "IndexIVFFlat"})
# GPU FAISS selects at most this many results (k) and probes at most this many lists (nprobe) per query
# (GPU_MAX_SELECTION_K of CUDA builds); larger searches run on the CPU copy.
GPU_MAX_K = 2048
GPU_ID = 0
ADD_CHUNK = 65_536  # vectors added per FAISS call when building (the unit of build progress)
# read_index flags that memory-map an index file instead of copying it into each process, by FAISS class:
# IndexFlat's vectors (IO_FLAG_MMAP with IO_FLAG_MMAP_IFC, faiss 1.15) are then shared by every process serving
# the same file (`hyperrec serve --workers N`). The IVF types could be mapped too (IO_FLAG_MMAP maps their
# inverted lists), but a mapped IVF index searched slower: at 1M items (IVF, 4,000 lists, nprobe 125) the
# server spent 8.4 ms of CPU per call at 100/s against 5.5 ms with the index in memory, and answered with p50
# 9.4 ms against 7.4 ms (benchmarks/pressure.py's server, A/B on this machine; 4 KiB file pages against the
# huge pages an in-memory copy gets, most likely). So IVF indexes are copied into each worker, whose other
# large arrays (embeddings, item features) stay mapped; IndexHNSWFlat is copied whatever the flags. Index files
# are never changed in place (a version is a new directory), which a mapping needs: a file truncated under it
# would fault.
MMAP_FLAGS = {
    "IndexFlatIP": faiss.IO_FLAG_MMAP | getattr(faiss, "IO_FLAG_MMAP_IFC", 0),  # 0: older FAISS, copied
}

# GPU FAISS resources are not thread-safe: one StandardGpuResources per process, and every use of it (copying an
# index to the GPU, searching, freeing a GPU index) holds this lock. Reentrant, because a GPU index can be freed
# by garbage collection in a thread that already holds it.
_gpu_lock = threading.RLock()
_gpu_resources: Any = None


def set_threads(n: int) -> None:
    """FAISS OpenMP threads for the calling thread and those it starts (1 is best for single-query latency on few
    cores); an executor runs it as its initializer so that its workers search with n threads."""
    faiss.omp_set_num_threads(max(1, n))


def kmeans(vectors: np.ndarray, k: int, seed: int = 0, iterations: int = 25) -> npt.NDArray[np.float32]:
    """K-Means (L2) centroids [k, d] of `vectors` [n, d], reproducible for a seed (FAISS's Kmeans)."""
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    clustering = faiss.Kmeans(data.shape[1], k, niter=iterations, seed=seed, verbose=False)
    clustering.train(data)
    centroids: npt.NDArray[np.float32] = np.asarray(clustering.centroids, dtype=np.float32)
    return centroids


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
    """(a GPU copy of the CPU FAISS `index` or None, why). ValueError when `device` is "gpu" and it cannot be."""
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


def read_index(path: Path, faiss_class: str, device: str) -> tuple[Any, bool]:
    """Read an index file, memory-mapped when its type allows (MMAP_FLAGS) and it stays on the CPU (a GPU copy
    holds its own data); a file that cannot be mapped (not the type expected, say) is read plainly, so the
    error, if any, is FAISS's usual one. Returns (the CPU index, whether it is mapped)."""
    flags = MMAP_FLAGS.get(faiss_class, 0)
    if flags and (device == CPU or gpu_count() == 0):
        try:
            return faiss.read_index(str(path), flags), True
        except RuntimeError as exc:
            log.debug("%s cannot be memory-mapped as %s, read into memory: %s", path, faiss_class, exc)
    return faiss.read_index(str(path)), False


def add_in_chunks(index: Any, vectors: np.ndarray, on_progress: Callable[[int, int], None] | None) -> None:
    """Add `vectors` ADD_CHUNK at a time, reporting (added, total) before the first chunk and after each."""
    total = len(vectors)
    if on_progress is not None:
        on_progress(0, total)
    for start in range(0, total, ADD_CHUNK):
        index.add(vectors[start : start + ADD_CHUNK])
        if on_progress is not None:
            on_progress(min(start + ADD_CHUNK, total), total)


class FaissIndex(AnnIndex):
    """An AnnIndex over one CPU FAISS index (inner product), with a GPU copy where `device` allows one.

    A subclass per index type says which FAISS class it holds (`faiss_class`), how to create and train one
    (`_create`), and how it searches. GPU searches are serialised, as GPU FAISS requires.
    """

    faiss_class: ClassVar[str]  # the FAISS class name a file of this type holds

    def __init__(self, index: Any, params: IndexParams, device: str = CPU) -> None:
        """Wrap a CPU FAISS index; `device` "auto" or "gpu" also copies it to the GPU (see the module doc)."""
        if params.kind != self.kind:
            raise ValueError(f"{type(self).__name__} serves {self.kind} indexes, not {params.kind}")
        self._gpu_index: Any = None
        self._index = index
        self.params = params
        self._gpu_index, self._placement = _place(index, check_device(device))
        self._asked = device
        self._mapped: Path | None = None  # the file a loaded index is memory-mapped from (see read_index)
        self.device = CPU if self._gpu_index is None else CUDA

    @classmethod
    @abstractmethod
    def _create(cls, vectors: np.ndarray, params: IndexParams, seed: int) -> Any:
        """A new, empty CPU FAISS index for `vectors` (float32 [n, d], contiguous), trained when the type trains."""

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        params: IndexParams,
        seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        device: str = CPU,
    ) -> Self:
        """See `AnnIndex.build`: training and adding run on the CPU; the finished index is then placed."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        index = cls._create(vectors, params, seed)
        add_in_chunks(index, vectors, on_progress)
        built = cls(index, params, device)
        if device != CPU:
            built.log_device()
        return built

    @classmethod
    def load(cls, path: Path, params: IndexParams, device: str = AUTO) -> Self:
        """See `AnnIndex.load` (FAISS raises RuntimeError for a file it cannot read)."""
        index, mapped = read_index(path, cls.faiss_class, device)
        loaded = cls(index, params, device)
        loaded._mapped = path if mapped else None
        loaded.log_device()
        return loaded

    def save(self, path: Path) -> None:
        """Write the CPU index with faiss.write_index (a memory-mapped one: a copy of its file, which FAISS
        would write as a reference to that file)."""
        if self._mapped is not None:
            shutil.copyfile(self._mapped, path)
            return
        faiss.write_index(self._index, str(path))

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

    def check_params(self) -> None:
        """Raise ValueError when the FAISS index is not what `params` says (class, metric, then `_check_shape`)."""
        if self.kind_name != self.faiss_class:
            raise ValueError(
                f"the file holds {self.kind_name}, the manifest says {self.params.kind} ({self.faiss_class})"
            )
        if self._index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the index does not use the inner-product metric")
        self._check_shape()

    def _check_shape(self) -> None:
        """Raise ValueError when a structural parameter of the index disagrees with `params` (none by default)."""

    @property
    def nbytes(self) -> int:
        """Size of the index as FAISS serialises it (about its memory, mapped or not), in bytes."""
        if self._mapped is not None:
            return self._mapped.stat().st_size
        return int(faiss.serialize_index(self._index).nbytes)

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

    def _run(self, queries: np.ndarray, n: int, params: Any = None, probes: int = 0) -> Hits:
        """One FAISS search with search-time `params`: on the GPU copy when there is one and GPU FAISS can do
        n results and `probes` probed lists, else on the CPU index."""
        gpu_index = self._gpu_index
        if gpu_index is not None and n <= GPU_MAX_K and probes <= GPU_MAX_K:
            with _gpu_lock:
                scores, rows = gpu_index.search(queries, n, params=params)
        else:
            scores, rows = self._index.search(queries, n, params=params)
        return scores, rows
