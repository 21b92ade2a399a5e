"""A catalogue's item ids held in numpy arrays, with id-to-row lookup, and no Python object per item.

A bundle of a million items used to hold its ids as a tuple of a million strings and a dict from id to row.
Building those (parsing JSON, filling the dict) kept the GIL for tens of milliseconds at a time, and a server
loading a new version beside live traffic stalled its event loop for as long (docs/performance.md). Here the
ids are one UTF-8 buffer and an offsets array, read from `.npy` files as a copy; lookups go through a sorted
array of 64-bit hashes computed with numpy. Loading costs a few array operations, each of which holds the GIL
only briefly, and dropping an old version frees a handful of arrays instead of millions of objects.
"""

from __future__ import annotations

import codecs
import operator
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np
import numpy.typing as npt

_MASK = (1 << 64) - 1
_SEED = 0x9E3779B97F4A7C15  # any odd constant; the id's length is mixed into it
_PRIME = 0x100000001B3  # FNV-1a's 64-bit prime, applied per 8-byte word
_FMIX1 = 0xFF51AFD7ED558CCD  # MurmurHash3's 64-bit finaliser
_FMIX2 = 0xC4CEB9FE1A85EC53
_CHUNK_BYTES = 1 << 22  # id bytes hashed per numpy pass: bounds the temporaries (8 bytes of index per id byte)
_DECODE_CHUNK = 1 << 20  # bytes checked per UTF-8 decoding step (each step holds the GIL)


def hash_id(data: bytes) -> int:
    """64-bit hash of one id's UTF-8 bytes: the scalar twin of `_hash_rows` (they must agree)."""
    h = _SEED ^ len(data)
    for (word,) in struct.iter_unpack("<Q", data + bytes(-len(data) % 8)):
        h = ((h ^ word) * _PRIME) & _MASK
    h ^= h >> 33
    h = (h * _FMIX1) & _MASK
    h ^= h >> 33
    h = (h * _FMIX2) & _MASK
    return h ^ (h >> 33)


def _hash_rows(blob: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], length: int) -> npt.NDArray[np.uint64]:
    """`hash_id` of ids that all have `length` bytes, starting at `starts` in `blob`, vectorised."""
    width = (length + 7) // 8
    padded = np.zeros((len(starts), width * 8), dtype=np.uint8)
    if length:
        padded[:, :length] = blob[starts[:, None] + np.arange(length)]
    words = padded.view("<u8")
    h = np.full(len(starts), _SEED ^ length, dtype=np.uint64)
    for j in range(width):
        h ^= words[:, j]
        h *= np.uint64(_PRIME)
    h ^= h >> np.uint64(33)
    h *= np.uint64(_FMIX1)
    h ^= h >> np.uint64(33)
    h *= np.uint64(_FMIX2)
    h ^= h >> np.uint64(33)
    return h


def _hash_all(blob: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """`hash_id` of every id, grouped by byte length (catalogues hold few distinct lengths)."""
    starts, lengths = offsets[:-1], np.diff(offsets)
    out = np.empty(len(lengths), dtype=np.uint64)
    by_length = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[by_length]
    for length in np.unique(sorted_lengths):
        lo, hi = np.searchsorted(sorted_lengths, [length, length + 1])
        step = max(1, _CHUNK_BYTES // max(int(length), 1))
        for at in range(lo, hi, step):
            rows = by_length[at : min(hi, at + step)]
            out[rows] = _hash_rows(blob, starts[rows], int(length))
    return out


class ItemIds(Sequence[str]):
    """The ids of a catalogue, by row: `ids[row]` is a row's id, `ids.row(item_id)` the row of an id.

    Immutable. Construct with `from_strings` (writers, tests) or `from_arrays` (a bundle's files), both of which
    validate: every id is valid UTF-8 and no id repeats.
    """

    __slots__ = ("_blob", "_hashes", "_offsets", "_order")

    def __init__(
        self,
        blob: bytes,
        offsets: npt.NDArray[np.int64],
        hashes: npt.NDArray[np.uint64],
        order: npt.NDArray[np.int64],
    ) -> None:
        self._blob = blob
        self._offsets = np.array(offsets, dtype=np.int64)  # a copy nobody else can change
        self._offsets.flags.writeable = False  # `arrays()` hands it out: the ids are immutable
        self._hashes = hashes  # sorted
        self._order = order  # rows in the order of `_hashes`

    @staticmethod
    def from_strings(ids: Iterable[str]) -> ItemIds:
        encoded = [i.encode() for i in ids]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return ItemIds.from_arrays(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    @staticmethod
    def from_arrays(blob: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64]) -> ItemIds:
        """The ids stored as `blob` (their UTF-8 bytes, concatenated by row) and `offsets` (row i is
        blob[offsets[i]:offsets[i + 1]]); ValueError saying what is wrong with them."""
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise ValueError(f"the id bytes must be a uint8 vector, not {blob.dtype} {blob.shape}")
        if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) < 1:
            raise ValueError(f"the offsets must be a non-empty int64 vector, not {offsets.dtype} {offsets.shape}")
        if offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any():
            raise ValueError("the offsets must rise from 0 to the length of the id bytes")
        data = blob.tobytes()
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:  # in steps, without building one string of the whole buffer
            for at in range(0, len(data), _DECODE_CHUNK):
                decoder.decode(data[at : at + _DECODE_CHUNK])
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise ValueError(f"the id bytes are not UTF-8: {exc}") from exc
        # Valid as a whole, so each id is valid unless a boundary splits a character (a continuation byte).
        nonempty = offsets[:-1][np.diff(offsets) > 0]
        if ((blob[nonempty] & 0xC0) == 0x80).any():
            raise ValueError("an id boundary falls inside a UTF-8 character")
        hashes = _hash_all(blob, offsets)
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        ids = ItemIds(data, offsets, hashes, order)
        # A repeated id shows as a run of equal hashes, as do (rarely) distinct ids that collide: compare each
        # run's ids with each other.
        same = np.flatnonzero(hashes[1:] == hashes[:-1])
        seen: dict[int, set[str]] = {}
        for at in sorted({*same.tolist(), *(same + 1).tolist()}):
            run = seen.setdefault(int(hashes[at]), set())
            item_id = ids[int(order[at])]
            if item_id in run:
                raise ValueError(f"ids are not unique: {item_id!r} repeats")
            run.add(item_id)
        return ids

    def arrays(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """(id bytes, offsets): what `from_arrays` takes, for writing."""
        return np.frombuffer(self._blob, dtype=np.uint8), self._offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, row: int | np.integer[Any]) -> str: ...

    @overload
    def __getitem__(self, row: slice) -> Sequence[str]: ...

    def __getitem__(self, row: int | np.integer[Any] | slice) -> str | Sequence[str]:
        if isinstance(row, slice):
            return tuple(self[r] for r in range(*row.indices(len(self))))
        n, row = len(self), operator.index(row)
        if not -n <= row < n:
            raise IndexError(f"row {row} of {n} ids")
        row %= n
        return self._blob[int(self._offsets[row]) : int(self._offsets[row + 1])].decode()

    def __iter__(self) -> Iterator[str]:
        blob = self._blob
        for start in range(0, len(self), 1024):  # offsets converted a block at a time: callers often stop early
            offsets = self._offsets[start : start + 1025].tolist()
            for row in range(len(offsets) - 1):
                yield blob[offsets[row] : offsets[row + 1]].decode()

    def take(self, rows: npt.ArrayLike) -> list[str]:
        """The ids at `rows`, in order (one offsets lookup for all: an answer's k ids)."""
        at = np.asarray(rows)
        if at.size and at.dtype.kind not in "iu":
            raise TypeError(f"rows must be integers, not {at.dtype}")
        at = at.astype(np.int64, copy=False)
        at = np.where(at < 0, at + len(self), at)
        if at.size and (at.min() < 0 or at.max() >= len(self)):
            raise IndexError(f"a row outside the {len(self)} ids")
        blob = self._blob
        starts, ends = self._offsets[at].tolist(), self._offsets[at + 1].tolist()
        return [blob[a:b].decode() for a, b in zip(starts, ends, strict=True)]

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.row(item_id) is not None

    def row(self, item_id: str) -> int | None:
        """The row of `item_id`, None when the catalogue lacks it."""
        row = int(self.rows((item_id,))[0])
        return None if row < 0 else row

    def rows(self, item_ids: Iterable[str]) -> npt.NDArray[np.int64]:
        """Rows of `item_ids`, in order, -1 for each id the catalogue lacks (one vectorised search for all)."""
        # surrogatepass: an id with a lone surrogate (never valid UTF-8, so never stored) is simply not found
        wanted = [i.encode("utf-8", "surrogatepass") for i in item_ids]
        out = np.full(len(wanted), -1, dtype=np.int64)
        if not wanted or not len(self):
            return out
        hashes = np.array([hash_id(w) for w in wanted], dtype=np.uint64)
        at = np.minimum(np.searchsorted(self._hashes, hashes), len(self) - 1)
        hit = np.flatnonzero(self._hashes[at] == hashes)
        blob, offsets = self._blob, self._offsets
        for i, first in zip(hit.tolist(), at[hit].tolist(), strict=True):
            at_i = first  # the first of the ids with this hash; further ones only on a collision
            while at_i < len(self) and self._hashes[at_i] == hashes[i]:
                row = int(self._order[at_i])
                if blob[int(offsets[row]) : int(offsets[row + 1])] == wanted[i]:
                    out[i] = row
                    break
                at_i += 1
        return out
