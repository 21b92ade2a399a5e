"""Tests of hyperrec.training.loaders: MovieLens (both layouts), MovieTweetings and the generic event format.

Every test writes its own small files under tmp_path; none reads the real datasets.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperrec.training import loaders, progress
from hyperrec.training.interactions import EVENT_CODE, EVENT_TYPES, DataError, Interactions
from hyperrec.training.loaders import (
    BAD_GENRE_FLAG,
    BAD_RATING,
    BAD_TIMESTAMP,
    BAD_VALUE,
    DUPLICATE_ITEM,
    EMPTY_ID,
    MAX_TIMESTAMP,
    METADATA_PREFIX,
    MIN_TIMESTAMP,
    RATING_WITHOUT_VALUE,
    SCHEMES,
    TIMESTAMP_OUT_OF_RANGE,
    UNKNOWN_EVENT_TYPE,
    WRONG_FIELD_COUNT,
    load_dataset,
    load_events,
    load_movielens,
    load_movietweetings,
)

T0 = 1_537_800_000  # 2018-09-24T14:40:00Z
ISO_T0 = "2018-09-24T14:40:00Z"

Row = tuple[str, str, int, str, float | None]  # user, item, timestamp, event type, value (None: no value)
Case = tuple[list[object], Row]  # a CSV row as written, and the row loading it must give


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def write_csv(path: Path, rows: Sequence[Sequence[object]]) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return write_text(path, buffer.getvalue())


def rows_of(data: Interactions) -> list[Row]:
    """The log as (user id, item id, timestamp, event type, value or None), in the log's own order."""
    out: list[Row] = []
    for u, i, t, e, v in zip(data.user, data.item, data.timestamp, data.event_type, data.value, strict=True):
        value = None if math.isnan(float(v)) else float(v)
        out.append((data.user_ids[u], data.catalog.item_ids[i], int(t), EVENT_TYPES[e], value))
    return out


def metadata_of(data: Interactions) -> dict[str, tuple[tuple[str, ...], str]]:
    """Item id → (categories, title)."""
    catalog = data.catalog
    return {
        ident: (cats, title)
        for ident, cats, title in zip(catalog.item_ids, catalog.categories, catalog.titles, strict=True)
    }


def assert_same(a: Interactions, b: Interactions) -> None:
    assert a.user_ids == b.user_ids
    assert a.catalog == b.catalog
    for name in ("user", "item", "timestamp", "event_type", "value"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --- MovieLens, ml-latest layout ------------------------------------------------------------------------


def write_ml_latest(directory: Path, extra_ratings: str = "", extra_movies: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_text(
        directory / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        f"2,1,4.0,{T0}\n"
        f"10,11,3.5,{T0 + 60}\n"
        f"2,29,0.5,{T0 - 60}\n"
        f"10,999,5.0,{T0 + 120}\n" + extra_ratings,
    )
    write_text(
        directory / "movies.csv",
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\n'
        "50,Never Rated (2001),(no genres listed)\n" + extra_movies,
    )
    return directory


def test_movielens_latest_loads_ratings_and_metadata(tmp_path: Path) -> None:
    data, report = load_movielens(write_ml_latest(tmp_path))
    assert data.user_ids == ("10", "2")  # sorted as strings
    assert data.catalog.item_ids == ("1", "11", "29", "50", "999")
    assert rows_of(data) == [
        ("2", "29", T0 - 60, "rating", 0.5),
        ("2", "1", T0, "rating", 4.0),
        ("10", "11", T0 + 60, "rating", 3.5),
        ("10", "999", T0 + 120, "rating", 5.0),
    ]
    meta = metadata_of(data)
    assert meta["11"] == (("Comedy", "Drama", "Romance"), "American President, The (1995)")
    assert meta["29"][1] == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert meta["50"] == ((), "Never Rated (2001)")  # unrated but listed: kept, and no genres
    assert meta["999"] == ((), "")  # rated without a metadata row: kept with empty metadata
    assert report.rows_read == report.rows_kept == 4
    assert report.dropped == {}


def test_movielens_latest_columns_found_by_name(tmp_path: Path) -> None:
    write_text(tmp_path / "ratings.csv", f"timestamp,rating,movieId,userId\n{T0},3.0,7,1\n")
    write_text(tmp_path / "movies.csv", "genres,movieId,title\nDrama,7,Seven (1995)\n")
    data, _ = load_movielens(tmp_path)
    assert rows_of(data) == [("1", "7", T0, "rating", 3.0)]
    assert metadata_of(data)["7"] == (("Drama",), "Seven (1995)")


def test_movielens_latest_missing_header_column_is_a_file_error(tmp_path: Path) -> None:
    write_text(tmp_path / "ratings.csv", f"userId,movieId,rating\n1,1,{T0}\n")
    write_text(tmp_path / "movies.csv", "movieId,title,genres\n")
    with pytest.raises(DataError) as caught:
        load_movielens(tmp_path, drop_malformed=True)
    assert (caught.value.file, caught.value.line) == ("ratings.csv", 1)
    assert "timestamp" in caught.value.reason


# --- MovieLens, ML-100K layout ---------------------------------------------------------------------------


def ml100k_item(movie_id: int, title: str, genres: Sequence[str]) -> str:
    flags = ["1" if genre in genres else "0" for genre in loaders.ML100K_GENRES]
    return "|".join([str(movie_id), title, "01-Jan-1995", "", "http://example.invalid/", *flags]) + "\n"


def write_ml100k(directory: Path, extra_data: str = "", extra_items: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "u.data", f"196\t242\t3\t{T0}\n186\t302\t3\t{T0 + 1}\n22\t242\t1\t{T0 + 2}\n" + extra_data)
    items = (
        ml100k_item(242, "Kolya (1996)", ["Comedy"])
        + ml100k_item(302, "L.A. Confidential (1997)", ["Crime", "Film-Noir", "Mystery", "Thriller"])
        + ml100k_item(1300, "'Til There Was You (1997)", ["unknown"])
        + ml100k_item(1500, "Café au lait (1993)", ["Children's", "Western"])
    )
    write_text(directory / "u.item", items + extra_items, encoding="latin-1")
    return directory


def test_movielens_100k_loads_latin1_items_and_genre_flags(tmp_path: Path) -> None:
    assert (write_ml100k(tmp_path) / "u.item").read_bytes().count(b"Caf\xe9") == 1  # really latin-1
    data, report = load_movielens(tmp_path)
    assert data.user_ids == ("186", "196", "22")
    assert data.catalog.item_ids == ("1300", "1500", "242", "302")
    assert rows_of(data) == [
        ("196", "242", T0, "rating", 3.0),
        ("186", "302", T0 + 1, "rating", 3.0),
        ("22", "242", T0 + 2, "rating", 1.0),
    ]
    meta = metadata_of(data)
    assert meta["1500"] == (("Children's", "Western"), "Café au lait (1993)")
    assert meta["302"] == (("Crime", "Film-Noir", "Mystery", "Thriller"), "L.A. Confidential (1997)")
    assert meta["1300"][0] == ("unknown",)
    assert (report.rows_read, report.rows_kept) == (3, 3)


def test_movielens_100k_bad_genre_flag(tmp_path: Path) -> None:
    bad = ml100k_item(7, "Odd (1990)", []).replace("|0\n", "|2\n")
    write_ml100k(tmp_path, extra_items=bad)
    with pytest.raises(DataError) as caught:
        load_movielens(tmp_path)
    assert (caught.value.file, caught.value.line) == ("u.item", 5)
    assert caught.value.reason.startswith(BAD_GENRE_FLAG)
    data, report = load_movielens(tmp_path, drop_malformed=True)
    assert "7" not in data.catalog.item_ids
    assert report.dropped == {METADATA_PREFIX + BAD_GENRE_FLAG: 1}


def test_movielens_without_either_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"u\.data"):
        load_movielens(tmp_path)


# --- MovieTweetings --------------------------------------------------------------------------------------


def write_movietweetings(directory: Path, extra_ratings: str = "", extra_movies: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_text(
        directory / "ratings.dat",
        f"1::0104257::8::{T0}\n1::1074638::7::{T0 + 5}\n2::0104257::10::{T0 + 9}\n" + extra_ratings,
    )
    write_text(
        directory / "movies.dat",
        "0104257::A Few Good Men (1992)::Crime|Drama|Thriller\n"
        "1074638::Skyfall (2012)::Action|Adventure|Thriller\n"
        "0021283::Rakudai wa shitakeredo (1930)::\n"
        "0002844::Fantômas - À l'ombre de la guillotine (1913)::Crime|Drama\n" + extra_movies,
    )
    return directory


def test_movietweetings_keeps_ids_verbatim_and_empty_genres(tmp_path: Path) -> None:
    data, report = load_movietweetings(write_movietweetings(tmp_path))
    assert data.user_ids == ("1", "2")
    assert data.catalog.item_ids == ("0002844", "0021283", "0104257", "1074638")
    assert rows_of(data) == [
        ("1", "0104257", T0, "rating", 8.0),
        ("1", "1074638", T0 + 5, "rating", 7.0),
        ("2", "0104257", T0 + 9, "rating", 10.0),
    ]
    meta = metadata_of(data)
    assert meta["0021283"] == ((), "Rakudai wa shitakeredo (1930)")
    assert meta["0002844"] == (("Crime", "Drama"), "Fantômas - À l'ombre de la guillotine (1913)")
    assert (report.rows_read, report.rows_kept, report.dropped) == (3, 3, {})


def test_movietweetings_title_may_hold_the_separator(tmp_path: Path) -> None:
    write_movietweetings(tmp_path, extra_movies="0000001::Odd::Title (2000)::Drama\n")
    data, _ = load_movietweetings(tmp_path)
    assert metadata_of(data)["0000001"] == (("Drama",), "Odd::Title (2000)")


def test_movietweetings_duplicate_movie_id(tmp_path: Path) -> None:
    write_movietweetings(tmp_path, extra_movies="0104257::Again (1992)::Drama\n")
    with pytest.raises(DataError) as caught:
        load_movietweetings(tmp_path)
    assert (caught.value.file, caught.value.line) == ("movies.dat", 5)
    data, report = load_movietweetings(tmp_path, drop_malformed=True)
    assert metadata_of(data)["0104257"][1] == "A Few Good Men (1992)"  # the first row wins
    assert report.dropped == {METADATA_PREFIX + DUPLICATE_ITEM: 1}


def test_invalid_utf8_is_a_file_error_even_when_dropping(tmp_path: Path) -> None:
    write_movietweetings(tmp_path)
    with (tmp_path / "ratings.dat").open("ab") as handle:
        handle.write(b"3::0104257::5::" + str(T0).encode() + b"\n4::caf\xe9::5::" + str(T0).encode() + b"\n")
    with pytest.raises(DataError) as caught:
        load_movietweetings(tmp_path, drop_malformed=True)
    assert (caught.value.file, caught.value.line) == ("ratings.dat", 5)
    assert "utf-8" in caught.value.reason


# --- Malformed rows in the rating formats ----------------------------------------------------------------

# writer, ratings file, separator, line of the first appended row, rows the writer puts there itself
RATING_FORMATS = {
    "ml-latest": (write_ml_latest, "ratings.csv", ",", 6, 4),
    "ml-100k": (write_ml100k, "u.data", "\t", 4, 3),
    "movietweetings": (write_movietweetings, "ratings.dat", "::", 4, 3),
}
BAD_RATING_ROWS = {
    WRONG_FIELD_COUNT: ["1", "1", "4"],
    BAD_RATING: ["1", "1", "four", str(T0)],
    BAD_TIMESTAMP: ["1", "1", "4", "yesterday"],
    TIMESTAMP_OUT_OF_RANGE: ["1", "1", "4", "600000000"],  # 1989
    EMPTY_ID: ["", "1", "4", str(T0)],
}


@pytest.mark.parametrize("reason", sorted(BAD_RATING_ROWS))
@pytest.mark.parametrize("fmt", sorted(RATING_FORMATS))
def test_malformed_rating_row_names_file_and_line(tmp_path: Path, fmt: str, reason: str) -> None:
    write, file, separator, first_extra_line, base_rows = RATING_FORMATS[fmt]
    good = separator.join(["1", "1", "4", str(T0)])
    write(tmp_path, separator.join(BAD_RATING_ROWS[reason]) + "\n" + good + "\n")
    loader = load_movietweetings if fmt == "movietweetings" else load_movielens
    with pytest.raises(DataError) as caught:
        loader(tmp_path)
    assert (caught.value.file, caught.value.line) == (file, first_extra_line)
    assert caught.value.reason.startswith(reason)
    assert str(caught.value).startswith(f"{file}:{first_extra_line}: {reason}")

    data, report = loader(tmp_path, drop_malformed=True)
    assert report.dropped == {reason: 1}
    assert (report.rows_read, report.rows_kept) == (base_rows + 2, base_rows + 1)
    assert len(data) == base_rows + 1


def test_drop_malformed_counts_each_reason(tmp_path: Path) -> None:
    extra = "".join(
        "::".join(fields) + "\n"
        for fields in (
            ["9", "0104257", "x", str(T0)],
            ["9", "0104257", "nan", str(T0)],
            ["9", "0104257", "5"],
            ["9", "0104257", "5", str(MAX_TIMESTAMP)],
            ["9", "0104257", "5", str(T0), "extra"],
        )
    )
    write_movietweetings(tmp_path, extra_ratings=extra, extra_movies="::No Id (2000)::Drama\n")
    data, report = load_movietweetings(tmp_path, drop_malformed=True)
    assert report.dropped == {
        BAD_RATING: 2,
        WRONG_FIELD_COUNT: 2,
        TIMESTAMP_OUT_OF_RANGE: 1,
        METADATA_PREFIX + EMPTY_ID: 1,
    }
    assert (report.rows_read, report.rows_kept) == (8, 3)
    assert "9" not in data.user_ids


def test_exact_duplicate_rows_are_kept(tmp_path: Path) -> None:
    write_movietweetings(tmp_path, extra_ratings=f"1::0104257::8::{T0}\n")
    data, report = load_movietweetings(tmp_path)
    assert len(data) == report.rows_kept == 4
    assert rows_of(data).count(("1", "0104257", T0, "rating", 8.0)) == 2


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    write_ml100k(tmp_path, extra_data=f"\n\n5\t242\t4\t{T0}\n")
    _, report = load_movielens(tmp_path)
    assert (report.rows_read, report.rows_kept) == (4, 4)


# --- The generic format ----------------------------------------------------------------------------------

EVENT_HEADER = ["user_id", "item_id", "timestamp", "event_type", "value"]
EVENTS: list[list[object]] = [
    ["alice", "sku-1", T0, "view", ""],
    ["alice", "sku-2", T0 + 10, "dwell", 1500.0],
    ["bob", "sku-1", T0 + 20, "rating", 4.5],
    ["bob", "sku-9", T0 + 30, "purchase", 19.99],
    ["carol", "sku-2", T0 + 40, "click", ""],
]
ITEM_HEADER = ["item_id", "categories", "title"]
ITEMS: list[list[object]] = [
    ["sku-1", "shoes|running", "Runner, blue"],
    ["sku-2", "", "Plain sock"],
    ["sku-cold", "hats", "Brand new hat"],
]


def write_events_csv(directory: Path, events: list[list[object]], items: list[list[object]] | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_csv(directory / "interactions.csv", [EVENT_HEADER, *events])
    if items is not None:
        write_csv(directory / "items.csv", [ITEM_HEADER, *items])
    return directory


def write_events_parquet(directory: Path, events: list[list[object]], items: list[list[object]] | None) -> Path:
    import pyarrow as pa  # a dependency of the train extra
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    columns = list(zip(*events, strict=True))
    table = pa.table(
        {
            "user_id": pa.array(columns[0], pa.string()),
            "item_id": pa.array(columns[1], pa.string()),
            "timestamp": pa.array(columns[2], pa.int64()),
            "event_type": pa.array(columns[3], pa.string()),
            "value": pa.array([None if v == "" else v for v in columns[4]], pa.float64()),
        }
    )
    pq.write_table(table, directory / "interactions.parquet")
    if items is not None:
        ids, cats, titles = zip(*items, strict=True)
        lists = [[c for c in str(cat).split("|") if c] for cat in cats]
        items_table = pa.table({"item_id": list(ids), "categories": lists, "title": list(titles)})
        pq.write_table(items_table, directory / "items.parquet")
    return directory


def test_events_csv_loads_types_values_and_metadata(tmp_path: Path) -> None:
    data, report = load_events(write_events_csv(tmp_path, EVENTS, ITEMS))
    assert data.user_ids == ("alice", "bob", "carol")
    assert data.catalog.item_ids == ("sku-1", "sku-2", "sku-9", "sku-cold")
    assert rows_of(data) == [
        ("alice", "sku-1", T0, "view", None),
        ("alice", "sku-2", T0 + 10, "dwell", 1500.0),
        ("bob", "sku-1", T0 + 20, "rating", 4.5),
        ("bob", "sku-9", T0 + 30, "purchase", pytest.approx(19.99)),
        ("carol", "sku-2", T0 + 40, "click", None),
    ]
    meta = metadata_of(data)
    assert meta["sku-1"] == (("shoes", "running"), "Runner, blue")
    assert meta["sku-2"] == ((), "Plain sock")
    assert meta["sku-9"] == ((), "")  # in events only: empty metadata
    assert meta["sku-cold"] == (("hats",), "Brand new hat")  # cold start: no events, still in the catalogue
    assert (report.rows_read, report.rows_kept, report.dropped) == (5, 5, {})


def test_events_items_file_is_optional(tmp_path: Path) -> None:
    data, _ = load_events(write_events_csv(tmp_path, EVENTS, None))
    assert data.catalog.item_ids == ("sku-1", "sku-2", "sku-9")
    assert set(data.catalog.titles) == {""}


def test_events_value_column_is_optional(tmp_path: Path) -> None:
    write_csv(tmp_path / "interactions.csv", [EVENT_HEADER[:4], ["u", "i", T0, "like"]])
    data, _ = load_events(tmp_path)
    assert rows_of(data) == [("u", "i", T0, "like", None)]


def test_events_csv_and_parquet_give_identical_interactions(tmp_path: Path) -> None:
    from_csv, csv_report = load_events(write_events_csv(tmp_path / "csv", EVENTS, ITEMS))
    from_parquet, parquet_report = load_events(write_events_parquet(tmp_path / "parquet", EVENTS, ITEMS))
    assert_same(from_csv, from_parquet)
    assert csv_report == parquet_report


def test_events_parquet_timestamp_column_with_timezone(tmp_path: Path) -> None:
    import pyarrow as pa  # a dependency of the train extra
    import pyarrow.parquet as pq

    moments = [datetime.fromtimestamp(T0, UTC), datetime.fromtimestamp(T0 + 1, UTC) + timedelta(milliseconds=999)]
    table = pa.table(
        {
            "user_id": ["u", "u"],
            "item_id": [1, 2],  # integer ids become their decimal text
            "timestamp": pa.array(moments, pa.timestamp("ms", tz="UTC")),
            "event_type": ["view", "view"],
        }
    )
    pq.write_table(table, tmp_path / "interactions.parquet")
    data, _ = load_events(tmp_path)
    assert rows_of(data) == [("u", "1", T0, "view", None), ("u", "2", T0 + 1, "view", None)]

    naive = table.set_column(2, "timestamp", pa.array([m.replace(tzinfo=None) for m in moments], pa.timestamp("s")))
    pq.write_table(naive, tmp_path / "interactions.parquet")
    with pytest.raises(DataError, match="timezone"):
        load_events(tmp_path)


@pytest.mark.parametrize(
    "iso",
    [ISO_T0, "2018-09-24T14:40:00+00:00", "2018-09-24T16:40:00+02:00", "2018-09-24T09:40:00.75-05:00"],
)
def test_iso_and_unix_timestamps_agree(tmp_path: Path, iso: str) -> None:
    write_csv(tmp_path / "interactions.csv", [EVENT_HEADER, ["u", "i", iso, "view", ""], ["u", "j", T0, "view", ""]])
    data, _ = load_events(tmp_path)
    assert data.timestamp.tolist() == [T0, T0]


GENERIC_BAD_ROWS: dict[str, list[object]] = {
    WRONG_FIELD_COUNT: ["u", "i", T0, "view"],
    EMPTY_ID: ["u", " ", T0, "view", ""],
    BAD_TIMESTAMP: ["u", "i", "2018-09-24T14:40:00", "view", ""],  # no timezone
    TIMESTAMP_OUT_OF_RANGE: ["u", "i", "2101-01-01T00:00:00Z", "view", ""],
    UNKNOWN_EVENT_TYPE: ["u", "i", T0, "View", ""],
    BAD_VALUE: ["u", "i", T0, "dwell", "inf"],
    RATING_WITHOUT_VALUE: ["u", "i", T0, "rating", ""],
}


@pytest.mark.parametrize("reason", sorted(GENERIC_BAD_ROWS))
def test_generic_malformed_row(tmp_path: Path, reason: str) -> None:
    write_events_csv(tmp_path, [*EVENTS[:2], GENERIC_BAD_ROWS[reason], *EVENTS[2:]], ITEMS)
    with pytest.raises(DataError) as caught:
        load_events(tmp_path)
    assert (caught.value.file, caught.value.line) == ("interactions.csv", 4)
    assert caught.value.reason.startswith(reason)
    data, report = load_events(tmp_path, drop_malformed=True)
    assert report.dropped == {reason: 1}
    assert (report.rows_read, report.rows_kept, len(data)) == (6, 5, 5)


def test_generic_parquet_malformed_row_is_numbered_by_row(tmp_path: Path) -> None:
    bad = ["u", "i", T0, "teleport", ""]
    write_events_parquet(tmp_path, [*EVENTS[:2], bad, *EVENTS[2:]], None)
    with pytest.raises(DataError) as caught:
        load_events(tmp_path)
    assert (caught.value.file, caught.value.line) == ("interactions.parquet", 3)
    _, report = load_events(tmp_path, drop_malformed=True)
    assert report.dropped == {UNKNOWN_EVENT_TYPE: 1}


def test_generic_multiline_quoted_title_keeps_line_numbers(tmp_path: Path) -> None:
    write_events_csv(tmp_path, EVENTS, [["a", "x", "two\nlines"], ["", "x", "no id"]])
    with pytest.raises(DataError) as caught:
        load_events(tmp_path)
    assert (caught.value.file, caught.value.line) == ("items.csv", 4)
    data, _ = load_events(tmp_path, drop_malformed=True)
    assert metadata_of(data)["a"] == (("x",), "two\nlines")


def test_generic_both_csv_and_parquet_is_ambiguous(tmp_path: Path) -> None:
    write_events_csv(tmp_path, EVENTS, None)
    (tmp_path / "interactions.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="both"):
        load_events(tmp_path)


def test_generic_missing_interactions(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="interactions"):
        load_events(tmp_path)


def test_progress_bar_path_gives_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_events_csv(tmp_path, EVENTS, ITEMS)
    quiet, _ = load_events(tmp_path)
    monkeypatch.setattr(loaders, "PROGRESS_MIN_ROWS", 1)
    monkeypatch.setattr(progress, "interactive", lambda: True)
    shown, _ = load_events(tmp_path)
    assert_same(quiet, shown)


# --- Dispatch --------------------------------------------------------------------------------------------


def test_load_dataset_dispatches_on_scheme(tmp_path: Path) -> None:
    write_ml_latest(tmp_path / "ml")
    write_movietweetings(tmp_path / "mt")
    write_events_csv(tmp_path / "ev", EVENTS, ITEMS)
    assert_same(load_dataset(f"movielens:{tmp_path / 'ml'}")[0], load_movielens(tmp_path / "ml")[0])
    assert_same(load_dataset(f"movietweetings:{tmp_path / 'mt'}")[0], load_movietweetings(tmp_path / "mt")[0])
    assert_same(load_dataset(f"events:{tmp_path / 'ev'}")[0], load_events(tmp_path / "ev")[0])


def test_load_dataset_passes_drop_malformed(tmp_path: Path) -> None:
    write_movietweetings(tmp_path, extra_ratings="1::2\n")
    with pytest.raises(DataError):
        load_dataset(f"movietweetings:{tmp_path}")
    _, report = load_dataset(f"movietweetings:{tmp_path}", drop_malformed=True)
    assert report.dropped == {WRONG_FIELD_COUNT: 1}


@pytest.mark.parametrize("spec", ["netflix:/data", "/data/ml-latest-small", "movielens:", ""])
def test_load_dataset_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError) as caught:
        load_dataset(spec)
    for scheme in SCHEMES:
        assert scheme in str(caught.value)


# --- Property: valid rows survive a round trip through a written CSV -------------------------------------

ID_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=8
)
OFFSETS = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])


@st.composite
def valid_rows(draw: st.DrawFn) -> Case:
    """One CSV row (timestamp as unix seconds or ISO-8601) and what loading it must give."""
    user, item = draw(ID_TEXT), draw(ID_TEXT)
    seconds = draw(st.integers(MIN_TIMESTAMP, MAX_TIMESTAMP - 1))
    event = draw(st.sampled_from(EVENT_TYPES))
    no_value = event != "rating" and draw(st.booleans())
    value = None if no_value else draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
    if draw(st.booleans()):
        stamp: object = seconds
    else:
        stamp = datetime.fromtimestamp(seconds, draw(OFFSETS)).isoformat()
    text_value = "" if value is None else repr(value)
    return [user, item, stamp, event, text_value], (user, item, seconds, event, value)


@settings(max_examples=60, deadline=None)
@given(st.lists(valid_rows(), min_size=1, max_size=30))
def test_valid_rows_round_trip_through_csv(tmp_path_factory: pytest.TempPathFactory, cases: list[Case]) -> None:
    directory = tmp_path_factory.mktemp("roundtrip")
    write_csv(directory / "interactions.csv", [EVENT_HEADER, *(written for written, _ in cases)])
    data, report = load_events(directory)
    expected = [row for _, row in cases]
    assert (report.rows_read, report.rows_kept, report.dropped) == (len(cases), len(cases), {})
    assert sorted(rows_of(data), key=repr) == sorted(expected, key=repr)
    assert list(data.user_ids) == sorted({row[0] for row in expected})
    assert list(data.catalog.item_ids) == sorted({row[1] for row in expected})
    assert np.all(np.diff(data.timestamp) >= 0)
    assert set(data.event_type.tolist()) <= set(EVENT_CODE.values())
