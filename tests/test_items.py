"""ItemIds: the catalogue's ids in numpy arrays, by row, with id-to-row lookup through 64-bit hashes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hyperrec.core.items as items_module
from hyperrec.core.items import ItemIds, hash_id

IDS = st.lists(st.text(max_size=40), unique=True, max_size=60)


@settings(max_examples=200, deadline=None)
@given(ids=IDS, strangers=st.lists(st.text(max_size=40), max_size=10))
def test_every_id_finds_its_row_and_strangers_find_none(ids: list[str], strangers: list[str]) -> None:
    catalogue = ItemIds.from_strings(ids)
    assert len(catalogue) == len(ids) and list(catalogue) == ids
    assert [catalogue[r] for r in range(len(ids))] == ids
    assert catalogue.take(np.arange(len(ids))[::-1]) == ids[::-1]
    assert [catalogue.row(i) for i in ids] == list(range(len(ids)))
    unknown = [s for s in strangers if s not in set(ids)]
    assert catalogue.rows([*unknown, *ids]).tolist() == [-1] * len(unknown) + list(range(len(ids)))
    assert all(s not in catalogue for s in unknown) and all(i in catalogue for i in ids)
    blob, offsets = catalogue.arrays()
    again = ItemIds.from_arrays(blob.copy(), offsets.copy())  # what a bundle writes and reads back
    assert list(again) == ids and again.rows(ids).tolist() == list(range(len(ids)))


@settings(max_examples=100, deadline=None)
@given(ids=IDS)
def test_the_vectorised_hash_agrees_with_the_scalar_one(ids: list[str]) -> None:
    catalogue = ItemIds.from_strings(ids)
    blob, offsets = catalogue.arrays()
    assert items_module._hash_all(blob, offsets).tolist() == [hash_id(i.encode()) for i in ids]


def test_colliding_hashes_still_find_the_right_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the hash cut to 2 bits every lookup meets collisions; each id still finds its own row, unknown ids
    none, and a real repeat is still caught."""
    scalar, vector = items_module.hash_id, items_module._hash_rows
    monkeypatch.setattr(items_module, "hash_id", lambda data: scalar(data) & 3)
    monkeypatch.setattr(items_module, "_hash_rows", lambda *a: vector(*a) & np.uint64(3))
    ids = [f"item-{i}" for i in range(50)] + ["", "é", "x" * 300]
    catalogue = ItemIds.from_strings(ids)
    assert catalogue.rows(ids).tolist() == list(range(len(ids)))
    assert catalogue.rows(["item-50", "y"]).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="'item-3' repeats"):
        ItemIds.from_strings([*ids, "item-3"])


def test_rows_by_position_follow_sequence_rules() -> None:
    catalogue = ItemIds.from_strings(["a", "b", "c"])
    assert catalogue[-1] == "c" and catalogue[np.int64(1)] == "b" and catalogue[0:3:2] == ("a", "c")
    with pytest.raises(IndexError):
        catalogue[3]
    assert catalogue.take([2, -3, 1]) == ["c", "a", "b"] and catalogue.take([]) == []
    with pytest.raises(IndexError):
        catalogue.take([0, 3])
    assert ItemIds.from_strings([]).rows(["a"]).tolist() == [-1] and ItemIds.from_strings([]).row("a") is None


def test_ids_that_cannot_be_stored_are_not_found_and_rows_must_be_integers() -> None:
    catalogue = ItemIds.from_strings(["a", "b"])
    assert catalogue.rows(["\ud800", "b"]).tolist() == [-1, 1] and "\ud800" not in catalogue  # a lone surrogate
    with pytest.raises(TypeError):
        catalogue[1.0]  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        catalogue.take(np.array([0.0, 1.0]))
    with pytest.raises(TypeError):
        catalogue.take(np.array([True, False]))
    _, offsets = catalogue.arrays()
    with pytest.raises(ValueError, match="read-only"):
        offsets[0] = 5


def test_a_long_catalogue_is_iterated_across_blocks() -> None:
    ids = [f"s{i:05d}" for i in range(3000)]
    assert list(ItemIds.from_strings(ids)) == ids


def test_utf8_is_checked_across_decoding_steps_and_to_the_last_byte() -> None:
    """The buffer is decoded a MiB at a time: a character split between two steps is valid; a truncated one at
    the very end is not."""
    ids = ["a" * ((1 << 20) - 1) + "é", "b"]
    blob, offsets = ItemIds.from_strings(ids).arrays()
    assert list(ItemIds.from_arrays(blob.copy(), offsets.copy())) == ids
    cut = np.frombuffer(b"ab\xc3", dtype=np.uint8)
    with pytest.raises(ValueError, match="not UTF-8"):
        ItemIds.from_arrays(cut, np.array([0, 2, 3], dtype=np.int64))
