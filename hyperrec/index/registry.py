"""Which implementation serves each index type a bundle manifest can name, and dispatch through it.

An implementation module (one per ANN library, e.g. `faiss_flat`) registers its classes here with `register`
when it is imported; `hyperrec.index` imports every such module, so the table is complete once the package is.
`build` and `load` pick the class from `params.kind`; a type nobody registered is a ValueError that names it.
This module imports no implementation, so `IndexParams` can ask it about a type without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from hyperrec.index.devices import AUTO, CPU

if TYPE_CHECKING:
    from hyperrec.index.base import AnnIndex
    from hyperrec.index.params import IndexParams

_IMPLEMENTATIONS: dict[str, type[AnnIndex]] = {}
Implementation = TypeVar("Implementation", bound="type[AnnIndex]")


def register(cls: Implementation) -> Implementation:
    """Class decorator: `cls` serves manifests whose index type is `cls.kind`. A type has one implementation."""
    current = _IMPLEMENTATIONS.get(cls.kind)
    if current is not None and current is not cls:
        raise ValueError(f"index type {cls.kind!r} is already served by {current.__qualname__}")
    _IMPLEMENTATIONS[cls.kind] = cls
    return cls


def kinds() -> tuple[str, ...]:
    """The registered index types, sorted."""
    return tuple(sorted(_IMPLEMENTATIONS))


def implementation(kind: str) -> type[AnnIndex]:
    """The class serving index type `kind`; ValueError naming it when none does."""
    try:
        return _IMPLEMENTATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown index type {kind!r} (known: {', '.join(kinds())})") from None


def build(
    embeddings: np.ndarray,
    params: IndexParams,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    device: str = CPU,
) -> AnnIndex:
    """Index `embeddings` (float32 [n, d]) with the implementation of `params.kind` (see `AnnIndex.build`)."""
    return implementation(params.kind).build(embeddings, params, seed, on_progress, device)


def load(path: Path, params: IndexParams, device: str = AUTO) -> AnnIndex:
    """Read an index file written by `AnnIndex.save`, with the implementation of `params.kind`."""
    return implementation(params.kind).load(path, params, device)
