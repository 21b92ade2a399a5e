"""The ANN index adapter: the only package that imports an ANN library (FAISS).

The core uses `AnnIndex` (the interface, `base`), `IndexParams` (the manifest's "index" object, `params`), and
`build` / `load`, which pick the implementation registered for the manifest's index type (`registry`). Each FAISS
index type is one module here; importing them below registers them. Another library plugs in the same way: a
module whose classes subclass AnnIndex, decorated with `registry.register`, imported here (docs/model-bundle.md).
"""

from __future__ import annotations

from hyperrec.index import faiss_flat, faiss_hnsw, faiss_ivf, faiss_ivfpq  # noqa: F401  (registers their types)
from hyperrec.index.base import AnnIndex
from hyperrec.index.devices import AUTO, CPU, CUDA, DEVICE_CHOICES, GPU
from hyperrec.index.faiss_common import kmeans, set_threads
from hyperrec.index.params import FLAT, HNSW, IVF, IVFPQ, IndexParams
from hyperrec.index.registry import build, implementation, kinds, load

__all__ = [
    "AUTO",
    "CPU",
    "CUDA",
    "DEVICE_CHOICES",
    "FLAT",
    "GPU",
    "HNSW",
    "IVF",
    "IVFPQ",
    "AnnIndex",
    "IndexParams",
    "build",
    "implementation",
    "kinds",
    "kmeans",
    "load",
    "set_threads",
]
