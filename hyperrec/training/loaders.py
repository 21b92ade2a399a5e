"""Dataset loaders: MovieLens, MovieTweetings and hyperrec's generic event log, read into `Interactions`.

Each loader reads one directory, checks every row and returns the log together with a `LoadReport`. A
malformed row raises `DataError` naming the file and the 1-based line, unless `drop_malformed` is set: then
the row is skipped and counted by reason in the report, so a run on dirty data still says how dirty it was.
Explicit ratings become events of type "rating" whose value is the rating.

Users and catalogue items are sorted by their id strings, so the same files always give the same indexes.
Every item a metadata file lists is in the catalogue, rated or not (cold-start items); an item that only
appears in events gets empty metadata. The formats are described in docs/data-formats.md.
"""

from __future__ import annotations

import csv
import math
import re
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from hyperrec.training import progress
from hyperrec.training.interactions import EVENT_CODE, EVENT_TYPES, DataError, Interactions, ItemCatalog, LoadReport

#: Earliest accepted event time (1990-01-01T00:00:00Z): older values are unit or parsing mistakes.
MIN_TIMESTAMP = int(datetime(1990, 1, 1, tzinfo=UTC).timestamp())
#: First rejected event time (2101-01-01T00:00:00Z): milliseconds read as seconds land far beyond it.
MAX_TIMESTAMP = int(datetime(2101, 1, 1, tzinfo=UTC).timestamp())

#: The 19 genre flags of ML-100K's u.item, in file order.
ML100K_GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
#: What ml-latest's movies.csv writes for a movie without genres.
NO_GENRES = "(no genres listed)"
#: Files with at least this many lines get a progress bar (on a terminal only).
PROGRESS_MIN_ROWS = 100_000

# Why a row is malformed: the keys of `LoadReport.dropped`. Reasons found in a metadata (item) file carry
# METADATA_PREFIX, so rows_read == rows_kept + the sum of the counts whose reason lacks the prefix.
WRONG_FIELD_COUNT = "wrong field count"
EMPTY_ID = "empty id"
BAD_RATING = "non-numeric rating"
BAD_VALUE = "non-numeric value"
BAD_TIMESTAMP = "bad timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp out of range"
UNKNOWN_EVENT_TYPE = "unknown event type"
RATING_WITHOUT_VALUE = "rating without value"
DUPLICATE_ITEM = "duplicate item id"
BAD_GENRE_FLAG = "bad genre flag"
METADATA_PREFIX = "metadata: "

_RATING = EVENT_CODE["rating"]
_UNIX_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?")
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_ML100K_ITEM_FIELDS = 5 + len(ML100K_GENRES)

# (1-based line or row number, fields as text)
_Rows: TypeAlias = Iterator[tuple[int, Sequence[str]]]
# What one loader call hands back.
_Loaded: TypeAlias = tuple[Interactions, LoadReport]


class _Malformed(Exception):
    """A row failed a check: `reason` is the counting key, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    @property
    def message(self) -> str:
        """The reason with its detail, for a `DataError`."""
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class _Event(NamedTuple):
    """One checked event row, ids still raw strings."""

    user: str
    item: str
    timestamp: int
    code: int
    value: float


class _Item(NamedTuple):
    """One checked metadata row."""

    item_id: str
    categories: tuple[str, ...]
    title: str


_NO_METADATA = _Item("", (), "")


@dataclass
class _Problems:
    """Where malformed rows go: raised as `DataError`, or counted in the report when dropping."""

    report: LoadReport
    drop: bool

    def handle(self, file: str, line: int, bad: _Malformed, prefix: str = "") -> None:
        """Raise for `file:line`, or count the reason (with `prefix`) and let the caller skip the row."""
        if not self.drop:
            raise DataError(file, line, bad.message)
        self.report.drop(prefix + bad.reason)


@dataclass
class _EventColumns:
    """Kept events as compact growing columns; ids are interned to first-seen codes and re-ordered at the end.

    Interning keeps one string per distinct id instead of one per row, and the typed arrays hand their buffers
    to numpy without a copy.
    """

    user_codes: dict[str, int] = field(default_factory=dict)
    item_codes: dict[str, int] = field(default_factory=dict)
    user: array[int] = field(default_factory=lambda: array("q"))
    item: array[int] = field(default_factory=lambda: array("q"))
    timestamp: array[int] = field(default_factory=lambda: array("q"))
    code: array[int] = field(default_factory=lambda: array("b"))
    value: array[float] = field(default_factory=lambda: array("f"))

    def __len__(self) -> int:
        return len(self.user)

    def append(self, event: _Event) -> None:
        """Add one event."""
        self.user.append(self.user_codes.setdefault(event.user, len(self.user_codes)))
        self.item.append(self.item_codes.setdefault(event.item, len(self.item_codes)))
        self.timestamp.append(event.timestamp)
        self.code.append(event.code)
        self.value.append(event.value)


# --- Field checks ----------------------------------------------------------------------------------------


def _expect_fields(fields: Sequence[str], count: int) -> None:
    """Reject a row whose field count differs from the format's (a shifted row would read wrong values)."""
    if len(fields) != count:
        raise _Malformed(WRONG_FIELD_COUNT, f"expected {count} fields, got {len(fields)}")


def _parse_id(text: str, what: str) -> str:
    """An id without surrounding whitespace, otherwise verbatim (leading zeros stay); empty is malformed."""
    ident = text.strip()
    if not ident:
        raise _Malformed(EMPTY_ID, f"empty {what}")
    return ident


def _parse_timestamp(text: str, allow_iso: bool) -> int:
    """Unix seconds (a fraction is dropped), or ISO-8601 with a timezone where allowed; must lie in range."""
    raw = text.strip()
    if _UNIX_SECONDS.fullmatch(raw):
        seconds = int(float(raw)) if "." in raw else int(raw)
    elif allow_iso:
        seconds = _parse_iso(raw)
    else:
        raise _Malformed(BAD_TIMESTAMP, f"not unix seconds: {raw!r}")
    if not MIN_TIMESTAMP <= seconds < MAX_TIMESTAMP:
        raise _Malformed(TIMESTAMP_OUT_OF_RANGE, f"{raw!r} is not in 1990..2100")
    return seconds


def _parse_iso(raw: str) -> int:
    """ISO-8601 to unix seconds (floored); a time without a timezone is ambiguous, so it is malformed."""
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise _Malformed(BAD_TIMESTAMP, f"neither unix seconds nor ISO-8601: {raw!r}") from None
    if moment.tzinfo is None:
        raise _Malformed(BAD_TIMESTAMP, f"ISO-8601 time without a timezone: {raw!r}")
    return math.floor(moment.timestamp())


def _parse_rating(text: str) -> float:
    """A finite number."""
    try:
        rating = float(text)
    except ValueError:
        raise _Malformed(BAD_RATING, repr(text)) from None
    if not math.isfinite(rating):
        raise _Malformed(BAD_RATING, repr(text))
    return rating


def _parse_value(text: str) -> float:
    """An optional event value: empty (or NaN) means none; infinities are malformed."""
    if not text.strip():
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise _Malformed(BAD_VALUE, repr(text)) from None
    if math.isinf(value):
        raise _Malformed(BAD_VALUE, repr(text))
    return value


def _parse_event_type(text: str) -> int:
    """The code of one of EVENT_TYPES (exact, lower-case names)."""
    code = EVENT_CODE.get(text.strip())
    if code is None:
        raise _Malformed(UNKNOWN_EVENT_TYPE, f"{text!r} is not one of {', '.join(EVENT_TYPES)}")
    return code


def _split_categories(text: str) -> tuple[str, ...]:
    """`|`-separated names, trimmed, empties and repeats dropped, file order kept."""
    names = (part.strip() for part in text.split("|"))
    return tuple(dict.fromkeys(name for name in names if name and name != NO_GENRES))


def _rating_event(user: str, item: str, rating: str, timestamp: str) -> _Event:
    """The event for one explicit rating, shared by the MovieLens and MovieTweetings formats."""
    return _Event(
        _parse_id(user, "user id"),
        _parse_id(item, "item id"),
        _parse_timestamp(timestamp, allow_iso=False),
        _RATING,
        _parse_rating(rating),
    )


# --- Reading files as rows -------------------------------------------------------------------------------


def _decoded_lines(path: Path, encoding: str) -> Iterator[str]:
    """The file's lines, decoded one by one so that bytes the encoding rejects are reported with their line.

    A wrong encoding is a property of the whole file, not of a row, so it raises even when dropping rows.
    """
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(path.name, number, f"not valid {encoding} ({exc.reason} at byte {exc.start})") from None
            yield text.removeprefix("\ufeff") if number == 1 else text


def _delimited_rows(path: Path, separator: str, encoding: str) -> _Rows:
    """Non-blank lines split on `separator`, with their line numbers."""
    for number, text in enumerate(_decoded_lines(path, encoding), start=1):
        line = text.rstrip("\r\n")
        if line.strip():
            yield number, line.split(separator)


def _csv_rows(path: Path, encoding: str = "utf-8") -> _Rows:
    """CSV records (quoted fields may hold commas and newlines) with the line each starts on; blank lines skipped."""
    reader = csv.reader(_decoded_lines(path, encoding))
    start = 1
    try:
        for record in reader:
            if record:
                yield start, record
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(path.name, reader.line_num, f"unreadable CSV ({exc})") from None


def _parquet_rows(path: Path) -> _Rows:
    """A Parquet file as text rows: the column names as row 0, then rows numbered from 1.

    Rendering each value as the text a CSV would hold lets CSV and Parquet share every row check, so the two
    give identical results.
    """
    import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]  # only needed for Parquet

    table: Any = pq.read_table(path)
    yield 0, list(table.column_names)
    columns = [_arrow_column_text(path, name, table.column(name)) for name in table.column_names]
    yield from enumerate(zip(*columns, strict=True), start=1)


def _arrow_column_text(path: Path, name: str, column: Any) -> list[str]:
    """One Arrow column as text; timestamp columns become unix seconds and must carry a timezone."""
    import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

    kind = column.type
    if not pa.types.is_timestamp(kind):
        return [_python_value_text(value) for value in column.to_pylist()]
    if kind.tz is None:
        raise DataError(path.name, 0, f"column {name} holds timestamps without a timezone; store them in UTC")
    per_second = _UNITS_PER_SECOND[kind.unit]
    return ["" if ticks is None else str(ticks // per_second) for ticks in column.cast(pa.int64()).to_pylist()]


def _python_value_text(value: object) -> str:
    """A Parquet cell as CSV text: null and NaN are empty, floats exact, lists `|`-joined (categories)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, list | tuple):
        return "|".join(_python_value_text(part) for part in value)
    return str(value)


def _count_lines(path: Path) -> int:
    """Newlines in the file, counted in binary chunks (fast), to size the progress bar."""
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def _with_progress(rows: _Rows, size: Callable[[], int], label: str) -> _Rows:
    """Wrap `rows` in a progress bar when stderr is a terminal and the file is big; tests and logs stay quiet."""
    if not progress.interactive():
        return rows
    total = size()
    if total < PROGRESS_MIN_ROWS:
        return rows
    bar: _Rows = iter(tqdm(rows, total=total, desc=label, unit=" rows", leave=False))
    return bar


def _file_rows(path: Path, encoding: str = "utf-8") -> _Rows:
    """Rows of a generic-format file, CSV or Parquet by extension, header first, with a progress bar."""
    if path.suffix == ".parquet":
        return _with_progress(_parquet_rows(path), lambda: _parquet_row_count(path), path.name)
    return _with_progress(_csv_rows(path, encoding), lambda: _count_lines(path), path.name)


def _parquet_row_count(path: Path) -> int:
    """Rows in a Parquet file, from its footer."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

    return int(pq.ParquetFile(path).metadata.num_rows)


@dataclass(frozen=True)
class _Header:
    """Where each known column sits in a file's rows, and how many fields every row must have."""

    width: int
    positions: dict[str, int]


def _read_header(file: str, rows: _Rows, required: Sequence[str], optional: Sequence[str] = ()) -> _Header:
    """Consume the header row and locate the columns; a missing required column is a file error (always raised)."""
    first = next(rows, None)
    if first is None:
        raise DataError(file, 1, "empty file: expected a header row")
    line, header = first
    names = [name.strip() for name in header]
    missing = [name for name in required if name not in names]
    if missing:
        raise DataError(file, line, f"header lacks column(s) {', '.join(missing)} (found: {', '.join(names)})")
    return _Header(len(names), {name: names.index(name) for name in (*required, *optional) if name in names})


# --- Collecting rows -------------------------------------------------------------------------------------


def _collect_events(
    file: str, rows: _Rows, parse: Callable[[Sequence[str]], _Event], problems: _Problems
) -> _EventColumns:
    """Parse every event row, keeping the good ones and routing the bad ones to `problems`."""
    events = _EventColumns()
    report = problems.report
    for line, fields in rows:
        report.rows_read += 1
        try:
            event = parse(fields)
        except _Malformed as bad:
            problems.handle(file, line, bad)
            continue
        events.append(event)
    report.rows_kept += len(events)
    return events


def _collect_items(
    file: str, rows: _Rows, parse: Callable[[Sequence[str]], _Item], problems: _Problems
) -> dict[str, _Item]:
    """Parse every metadata row into id → item; a repeated id is malformed (the first one wins when dropping)."""
    items: dict[str, _Item] = {}
    for line, fields in rows:
        try:
            item = parse(fields)
            if item.item_id in items:
                raise _Malformed(DUPLICATE_ITEM, repr(item.item_id))
        except _Malformed as bad:
            problems.handle(file, line, bad, prefix=METADATA_PREFIX)
            continue
        items[item.item_id] = item
    return items


def _sorted_codes(codes: dict[str, int]) -> tuple[list[str], npt.NDArray[np.int64]]:
    """Ids sorted as strings, and the map from each first-seen code to its sorted index."""
    ordered = sorted(codes)
    remap = np.empty(len(codes), dtype=np.int64)
    for index, ident in enumerate(ordered):
        remap[codes[ident]] = index
    return ordered, remap


def _assemble(events: _EventColumns, items: dict[str, _Item]) -> Interactions:
    """Build the catalogue (metadata items plus any item only seen in events) and the sorted log."""
    user_ids, user_remap = _sorted_codes(events.user_codes)
    item_ids = sorted(events.item_codes.keys() | items.keys())
    item_index = {ident: index for index, ident in enumerate(item_ids)}
    item_remap = np.array([item_index[ident] for ident in events.item_codes], dtype=np.int64)
    metadata = [items.get(ident, _NO_METADATA) for ident in item_ids]
    catalog = ItemCatalog(
        tuple(item_ids), tuple(item.categories for item in metadata), tuple(item.title for item in metadata)
    )
    return Interactions.build(
        user_ids,
        catalog,
        user_remap[np.frombuffer(events.user, dtype=np.int64)],
        item_remap[np.frombuffer(events.item, dtype=np.int64)],
        np.frombuffer(events.timestamp, dtype=np.int64),
        np.frombuffer(events.code, dtype=np.int8),
        np.frombuffer(events.value, dtype=np.float32),
    )


def _require_files(directory: Path, *names: str) -> list[Path]:
    """The named files in `directory`, or FileNotFoundError saying which are missing."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    paths = [directory / name for name in names]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")
    return paths


# --- MovieLens -------------------------------------------------------------------------------------------


def load_movielens(path: Path, drop_malformed: bool = False) -> _Loaded:
    """Load a MovieLens directory: ml-latest layout (ratings.csv + movies.csv) or ML-100K (u.data + u.item).

    Every rating becomes a "rating" event valued at the rating. Raises FileNotFoundError when neither layout
    is there and `DataError` for a malformed row unless `drop_malformed`.
    """
    directory = Path(path)
    if (directory / "ratings.csv").is_file():
        return _load_movielens_latest(directory, drop_malformed)
    if (directory / "u.data").is_file():
        return _load_movielens_100k(directory, drop_malformed)
    raise FileNotFoundError(f"{directory}: expected ratings.csv + movies.csv (ml-latest) or u.data + u.item (ML-100K)")


def _load_movielens_latest(directory: Path, drop_malformed: bool) -> _Loaded:
    """ml-latest(-small): CSVs with header rows; movie titles may be quoted and hold commas."""
    ratings_path, movies_path = _require_files(directory, "ratings.csv", "movies.csv")
    problems = _Problems(LoadReport(), drop_malformed)
    rows = _file_rows(ratings_path)
    header = _read_header(ratings_path.name, rows, ("userId", "movieId", "rating", "timestamp"))
    events = _collect_events(ratings_path.name, rows, _movielens_rating_parser(header), problems)
    rows = _file_rows(movies_path)
    header = _read_header(movies_path.name, rows, ("movieId", "title", "genres"))
    items = _collect_items(movies_path.name, rows, _movielens_movie_parser(header), problems)
    return _assemble(events, items), problems.report


def _movielens_rating_parser(header: _Header) -> Callable[[Sequence[str]], _Event]:
    """A parser for ratings.csv rows with the columns where `header` found them."""
    width = header.width
    user, item, rating, timestamp = (header.positions[name] for name in ("userId", "movieId", "rating", "timestamp"))

    def parse(fields: Sequence[str]) -> _Event:
        _expect_fields(fields, width)
        return _rating_event(fields[user], fields[item], fields[rating], fields[timestamp])

    return parse


def _movielens_movie_parser(header: _Header) -> Callable[[Sequence[str]], _Item]:
    """A parser for movies.csv rows; "(no genres listed)" means no categories."""
    width = header.width
    movie, title, genres = (header.positions[name] for name in ("movieId", "title", "genres"))

    def parse(fields: Sequence[str]) -> _Item:
        _expect_fields(fields, width)
        return _Item(_parse_id(fields[movie], "movie id"), _split_categories(fields[genres]), fields[title].strip())

    return parse


def _load_movielens_100k(directory: Path, drop_malformed: bool) -> _Loaded:
    """ML-100K: tab-separated u.data without a header, pipe-separated latin-1 u.item with 19 genre flags."""
    data_path, item_path = _require_files(directory, "u.data", "u.item")
    problems = _Problems(LoadReport(), drop_malformed)
    rows = _with_progress(_delimited_rows(data_path, "\t", "latin-1"), lambda: _count_lines(data_path), "u.data")
    events = _collect_events(data_path.name, rows, _ml100k_rating, problems)
    items = _collect_items(item_path.name, _delimited_rows(item_path, "|", "latin-1"), _ml100k_item, problems)
    return _assemble(events, items), problems.report


def _ml100k_rating(fields: Sequence[str]) -> _Event:
    """One u.data row: user, item, rating, timestamp."""
    _expect_fields(fields, 4)
    return _rating_event(*fields)


def _ml100k_item(fields: Sequence[str]) -> _Item:
    """One u.item row: id, title, release date, video release date, IMDb URL, then one 0/1 flag per genre."""
    _expect_fields(fields, _ML100K_ITEM_FIELDS)
    flags = [flag.strip() for flag in fields[5:]]
    if any(flag not in ("0", "1") for flag in flags):
        raise _Malformed(BAD_GENRE_FLAG, f"genre flags must be 0 or 1, got {'|'.join(flags)}")
    genres = tuple(genre for genre, flag in zip(ML100K_GENRES, flags, strict=True) if flag == "1")
    return _Item(_parse_id(fields[0], "movie id"), genres, fields[1].strip())


# --- MovieTweetings --------------------------------------------------------------------------------------


def load_movietweetings(path: Path, drop_malformed: bool = False) -> _Loaded:
    """Load a MovieTweetings directory: `::`-separated ratings.dat and movies.dat, UTF-8, no headers.

    Movie ids stay verbatim strings ("0104257" keeps its zero). Every rating becomes a "rating" event.
    """
    ratings_path, movies_path = _require_files(Path(path), "ratings.dat", "movies.dat")
    problems = _Problems(LoadReport(), drop_malformed)
    rows = _with_progress(
        _delimited_rows(ratings_path, "::", "utf-8"), lambda: _count_lines(ratings_path), ratings_path.name
    )
    events = _collect_events(ratings_path.name, rows, _movietweetings_rating, problems)
    rows = _delimited_rows(movies_path, "::", "utf-8")
    items = _collect_items(movies_path.name, rows, _movietweetings_movie, problems)
    return _assemble(events, items), problems.report


def _movietweetings_rating(fields: Sequence[str]) -> _Event:
    """One ratings.dat row: user_id, movie_id, rating, unix timestamp."""
    _expect_fields(fields, 4)
    return _rating_event(*fields)


def _movietweetings_movie(fields: Sequence[str]) -> _Item:
    """One movies.dat row: id, title, genres (possibly empty). A `::` inside a title stays in the title."""
    if len(fields) < 3:
        raise _Malformed(WRONG_FIELD_COUNT, f"expected 3 fields, got {len(fields)}")
    title = "::".join(fields[1:-1]).strip()
    return _Item(_parse_id(fields[0], "movie id"), _split_categories(fields[-1]), title)


# --- The generic event format ----------------------------------------------------------------------------

_EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "event_type")
_ITEM_COLUMNS = ("categories", "title")


def load_events(path: Path, drop_malformed: bool = False) -> _Loaded:
    """Load hyperrec's generic format: interactions.csv|parquet, optionally items.csv|parquet.

    Interactions carry user_id, item_id, timestamp (unix seconds or ISO-8601 with timezone), event_type (one
    of EVENT_TYPES) and an optional value. Items in the items file without events stay in the catalogue.
    """
    directory = Path(path)
    events_path = _pick_table(directory, "interactions")
    if events_path is None:
        raise FileNotFoundError(f"{directory}: missing interactions.csv or interactions.parquet")
    problems = _Problems(LoadReport(), drop_malformed)
    rows = _file_rows(events_path)
    header = _read_header(events_path.name, rows, _EVENT_COLUMNS, ("value",))
    events = _collect_events(events_path.name, rows, _generic_event_parser(header), problems)
    items: dict[str, _Item] = {}
    items_path = _pick_table(directory, "items")
    if items_path is not None:
        rows = _file_rows(items_path)
        header = _read_header(items_path.name, rows, ("item_id",), _ITEM_COLUMNS)
        items = _collect_items(items_path.name, rows, _generic_item_parser(header), problems)
    return _assemble(events, items), problems.report


def _pick_table(directory: Path, stem: str) -> Path | None:
    """`stem`.csv or `stem`.parquet in `directory` (None if neither); both at once is ambiguous, so an error."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    found = [directory / f"{stem}{suffix}" for suffix in (".csv", ".parquet")]
    found = [candidate for candidate in found if candidate.is_file()]
    if len(found) > 1:
        raise ValueError(f"{directory}: both {stem}.csv and {stem}.parquet exist; keep one")
    return found[0] if found else None


def _generic_event_parser(header: _Header) -> Callable[[Sequence[str]], _Event]:
    """A parser for interactions rows; a "rating" event must carry its value."""
    width = header.width
    user, item, timestamp, event_type = (header.positions[name] for name in _EVENT_COLUMNS)
    value = header.positions.get("value")

    def parse(fields: Sequence[str]) -> _Event:
        _expect_fields(fields, width)
        code = _parse_event_type(fields[event_type])
        amount = math.nan if value is None else _parse_value(fields[value])
        if code == _RATING and math.isnan(amount):
            raise _Malformed(RATING_WITHOUT_VALUE)
        user_id = _parse_id(fields[user], "user_id")
        item_id = _parse_id(fields[item], "item_id")
        return _Event(user_id, item_id, _parse_timestamp(fields[timestamp], allow_iso=True), code, amount)

    return parse


def _generic_item_parser(header: _Header) -> Callable[[Sequence[str]], _Item]:
    """A parser for items rows; categories and title columns are optional."""
    width = header.width
    item = header.positions["item_id"]
    categories, title = (header.positions.get(name) for name in _ITEM_COLUMNS)

    def parse(fields: Sequence[str]) -> _Item:
        _expect_fields(fields, width)
        names = () if categories is None else _split_categories(fields[categories])
        return _Item(_parse_id(fields[item], "item_id"), names, "" if title is None else fields[title].strip())

    return parse


# --- Dispatch --------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[Path, bool], _Loaded]] = {
    "movielens": load_movielens,
    "movietweetings": load_movietweetings,
    "events": load_events,
}
#: The schemes `load_dataset` accepts.
SCHEMES: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(spec: str, drop_malformed: bool = False) -> _Loaded:
    """Load "SCHEME:PATH" with SCHEME one of SCHEMES (movielens, movietweetings, events).

    Raises ValueError for an unknown scheme or an empty path, naming the accepted schemes.
    """
    scheme, colon, location = spec.partition(":")
    loader = _LOADERS.get(scheme.strip()) if colon else None
    if loader is None:
        raise ValueError(f"unknown dataset {spec!r}: expected SCHEME:PATH with SCHEME one of {', '.join(SCHEMES)}")
    if not location.strip():
        raise ValueError(f"dataset {spec!r} has no path: expected SCHEME:PATH with SCHEME one of {', '.join(SCHEMES)}")
    return loader(Path(location).expanduser(), drop_malformed)
