"""Ingest: read and validate the behaviour log, the item catalogue and optional user attributes.

Pure: this module only reads files and returns validated DataFrames, or raises ``InputError``
with one line naming the file, the line (or Parquet row), the column and the fix. Writing to
the workspace is the store's job, so a bad file can never leave half an ingest behind.

All checks are vectorised with pandas; Python only touches the first few bad rows, to word
their messages. When a file has several problems, the first one in file order is reported.

Line numbers are physical line numbers in the file (the header is line 1). To keep them
exact, every record must sit on one line: a quoted field that spans lines is rejected as
malformed ("unbalanced quote"), like a ragged row. Blank lines are ignored. Parquet files
have no lines, so messages say "row N" (1-based data row) instead, and the delimiter and
encoding checks do not apply.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from segrec.errors import InputError

MAX_PROBLEMS = 20
"""How many "file:line: reason" messages a report keeps for skipped rows."""

_PARQUET_SUFFIXES = {".parquet", ".pq"}
_DELIMITERS = (",", ";", "\t", "|")
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, as decoded by surrogateescape
_QUOTED = r'"[^"]*"'
_TIMESTAMP_LIMIT = 1e11  # |unix seconds| beyond this (year ~5138) are not seconds at all
_EPOCH = pd.Timestamp(0, tz="UTC")

# Auto-detected column names, in priority order, compared after _norm().
_USER = ("user_id", "userId", "user", "customer_id")
_ITEM = ("item_id", "movieId", "itemId", "item", "product_id")
_BEHAVIOR = ("behavior", "behaviour", "event", "event_type", "action")
_VALUE = ("value", "rating", "score", "amount")
_TIMESTAMP = ("timestamp", "time", "ts", "datetime", "date")
_TITLE = ("title", "name", "item_name")
_DESCRIPTION = ("description", "desc", "overview", "summary")
_CATEGORIES = ("category", "categories", "genres", "genre", "tags")
_NO_CATEGORY = "(no genres listed)"  # MovieLens's marker for an item without genres

_PII_NAMES = {
    "name", "firstname", "lastname", "fullname", "surname", "username",
    "email", "mail", "emailaddress",
    "phone", "phonenumber", "mobile", "mobilenumber", "tel", "telephone",
    "address", "streetaddress", "street", "postcode", "postalcode", "zip", "zipcode",
    "ssn", "ip", "ipaddress",
    "birthdate", "birthday", "dob", "dateofbirth",
}  # fmt: skip
_EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}"
# A phone number: 7-15 digits written the way phone numbers are (+ and digits, a leading 0,
# or groups split by spaces, dots or dashes). A bare integer is not enough (it may be an
# amount or an id), and dates like 2024-05-01 or 01.05.2024 are not phone numbers.
_PHONE = (
    r"(?!\d{4}-\d{1,2}-\d{1,2}$)(?!\d{1,2}[./-]\d{1,2}[./-]\d{2,4}$)"
    r"(?=(?:\D*\d){7,15}\D*$)"
    r"(?:\+\d+|0\d+|\+?\(?\d{1,4}\)?(?:[\s.-]\d{2,4}){2,})"
)
_PII_SAMPLE = 10_000
CHUNK_BYTES = 64 << 20
"""The log is read, checked and parsed this many bytes (CSV) at a time."""
CHUNK_ROWS = 1_000_000
"""… or this many rows (Parquet)."""
FIELD_LIMIT = 131_072
"""Longest field accepted, in characters (Python's csv default; nothing segrec shows an LLM
comes near it, and a longer one is almost always a broken export)."""
_PII_FIX = "drop the column; segrec never sends personal data to an LLM"


@dataclass(frozen=True)
class LogColumns:
    """Column names in the behaviour log; None means auto-detect."""

    user: str | None = None
    item: str | None = None
    behavior: str | None = None
    value: str | None = None
    timestamp: str | None = None


@dataclass(frozen=True)
class ItemColumns:
    """Column names in the item catalogue; None means auto-detect."""

    item: str | None = None
    title: str | None = None
    description: str | None = None
    categories: tuple[str, ...] | None = None


@dataclass
class IngestReport:
    """What loading read, kept, skipped and assumed, for the CLI to show."""

    log_rows: int
    item_rows: int
    loaded: int
    skipped: int
    duplicates: int
    problems: list[str]
    notes: list[str]
    behaviors: dict[str, int]


@dataclass
class Dataset:
    """Validated input, ready for the store.

    ``interactions``: user_id, item_id, behavior (str), value (float64, NaN if absent),
    timestamp (Int64 unix seconds, NA if absent), line (int, 1-based line in the log).
    ``items``: item_id, title, description (str), categories (list[str]), text (str).
    ``attributes``: user_id plus one str column per attribute, or None.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    attributes: pd.DataFrame | None
    report: IngestReport


def item_text(title: str, description: str, categories: list[str]) -> str:
    """The one text that stands for an item wherever it is embedded or shown to an LLM.

    "Title. Description. Categories: A, B." with empty parts left out, so that item
    embeddings and prompts never drift apart.
    """
    parts = [title.strip(), description.strip()]
    if categories:
        parts.append("Categories: " + ", ".join(categories))
    return " ".join(p if p.endswith((".", "!", "?")) else p + "." for p in parts if p)


def read_table(path: Path, *, delimiter: str = ",") -> pd.DataFrame:
    """Read a CSV or Parquet file (by suffix .parquet/.pq) with every column as str.

    Adds a ``line`` column (CSV: physical line, header = 1; Parquet: 1-based row). Raises
    InputError for the first unreadable row (bad UTF-8, ragged, unbalanced quote).
    """
    source = _source(Path(path), skip_hint="")
    problems = _Problems(source)
    frame, _ = _read(source, _parse_delimiter(delimiter), problems)
    problems.raise_first()
    return frame


def load_dataset(
    log: Path,
    items: Path,
    attributes: Path | None = None,
    *,
    log_columns: LogColumns = LogColumns(),
    item_columns: ItemColumns = ItemColumns(),
    attribute_user_column: str | None = None,
    delimiter: str = ",",
    skip_bad_rows: bool = False,
    chunk_bytes: int | None = CHUNK_BYTES,
    chunk_rows: int = CHUNK_ROWS,
) -> Dataset:
    """Read and validate the behaviour log, the item catalogue and optional attributes.

    ``skip_bad_rows`` applies to the log only: bad rows are skipped and counted, duplicates
    keep their first occurrence. The catalogue and the attributes must be clean, since a
    silently dropped item or user would change every later stage. The log is read in
    chunks of ``chunk_bytes`` (CSV; None: at once) or ``chunk_rows`` (Parquet); the result
    does not depend on them.
    """
    delimiter = _parse_delimiter(delimiter)
    hint = "" if skip_bad_rows else " (or pass --skip-bad-rows)"
    log_source = _source(Path(log), skip_hint=hint)
    item_source = _source(Path(items), skip_hint="")
    attr_source = _source(Path(attributes), skip_hint="") if attributes is not None else None

    notes: list[str] = []
    catalogue, item_rows = _load_items(item_source, item_columns, delimiter, notes)
    interactions, log_rows, skipped, duplicates, problems = _load_log(
        log_source,
        log_columns,
        delimiter,
        skip_bad_rows,
        catalogue["item_id"],
        item_source,
        notes,
        chunk_bytes,
        chunk_rows,
    )
    unused = int((~_isin(catalogue["item_id"], interactions["item_id"])).sum())
    if unused:
        notes.append(f"{item_source.path}: {unused} items have no interactions in the log")
    users = None
    if attr_source is not None:
        users = _load_attributes(
            attr_source, attribute_user_column, delimiter, interactions["user_id"], notes
        )

    counts = interactions["behavior"].value_counts()
    behaviors = {
        str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    }
    report = IngestReport(
        log_rows=log_rows,
        item_rows=item_rows,
        loaded=len(interactions),
        skipped=skipped,
        duplicates=duplicates,
        problems=problems,
        notes=notes,
        behaviors=behaviors,
    )
    return Dataset(interactions=interactions, items=catalogue, attributes=users, report=report)


# --- sources and problems ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One input file: where it is, how its rows are named, and the hint for skippable rows."""

    path: Path
    parquet: bool
    skip_hint: str

    def at(self, line: int) -> str:
        return f"{self.path}: row {line}" if self.parquet else f"{self.path}:{line}"

    def ref(self, line: int) -> str:
        return f"row {line}" if self.parquet else f"line {line}"

    @property
    def header(self) -> str:
        return f"{self.path}" if self.parquet else f"{self.path}:1"


def _source(path: Path, *, skip_hint: str) -> _Source:
    if path.is_dir():
        raise InputError(
            f"{path}: is a directory, not a file; pass the path of a CSV or Parquet file"
        )
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path")
    return _Source(path, path.suffix.lower() in _PARQUET_SUFFIXES, skip_hint)


class _Problems:
    """Bad rows found by vectorised checks: all their lines, and the first few messages.

    Keeping the first MAX_PROBLEMS lines of every check is enough to know the first
    MAX_PROBLEMS bad lines overall, and so the first problem in file order.
    """

    def __init__(self, source: _Source) -> None:
        self.source = source
        self._lines: list[np.ndarray] = []
        self._first: list[tuple[int, int, str]] = []  # (line, check order, reason)

    def add(self, lines: np.ndarray, reasons: Callable[[int], str]) -> None:
        """Record bad ``lines`` (ascending); ``reasons(i)`` words the i-th of them."""
        if len(lines) == 0:
            return
        order = len(self._lines)
        self._lines.append(lines)
        self._first.extend(
            (int(line), order, reasons(i)) for i, line in enumerate(lines[:MAX_PROBLEMS])
        )

    def flag(self, frame: pd.DataFrame, mask: Any, reason: Callable[[dict[str, Any]], str]) -> None:
        """Record the rows of ``frame`` (in line order) where ``mask`` is true."""
        bad = frame.loc[np.asarray(mask, dtype=bool)]
        rows = bad.head(MAX_PROBLEMS).to_dict("records")
        self.add(bad["line"].to_numpy(), lambda i: reason(rows[i]))

    def bad_lines(self) -> np.ndarray:
        if not self._lines:
            return np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate(self._lines))

    def messages(self) -> list[str]:
        first: dict[int, str] = {}
        for line, _, reason in sorted(self._first):
            first.setdefault(line, reason)
        return [f"{self.source.at(line)}: {reason}" for line, reason in sorted(first.items())][
            :MAX_PROBLEMS
        ]

    def raise_first(self) -> None:
        if self._first:
            line, _, reason = min(self._first)
            raise InputError(f"{self.source.at(line)}: {reason}")


def _show(value: Any, limit: int = 40) -> str:
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _norm(name: str) -> str:
    """Column names compare case-insensitively and ignoring separators: userId == user_id."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _parse_delimiter(delimiter: str) -> str:
    """Accept the delimiter as typed on a shell: a literal \\t (or "tab") means a tab."""
    if delimiter in ("\\t", "tab", "TAB"):
        return "\t"
    if len(delimiter) != 1 or delimiter in '"\r\n':
        raise InputError(
            f"--delimiter {delimiter!r}: must be one character such as ',', ';', '|' or '\\t'"
        )
    return delimiter


def _shell_delimiter(delimiter: str) -> str:
    return "'\\t'" if delimiter == "\t" else repr(delimiter)


# --- reading -------------------------------------------------------------------------------------


def _read(source: _Source, delimiter: str, problems: _Problems) -> tuple[pd.DataFrame, int]:
    """All columns as str plus ``line``; unreadable rows go to ``problems``. Returns rows read.

    The whole file as one frame (catalogues and attributes); the log is read in chunks."""
    frames, rows_read = [], 0
    for frame, rows in _read_chunks(source, delimiter, problems, chunk_bytes=None):
        frames.append(frame)
        rows_read += rows
    return (frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)), rows_read


def _read_chunks(
    source: _Source,
    delimiter: str,
    problems: _Problems,
    *,
    chunk_bytes: int | None = CHUNK_BYTES,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[pd.DataFrame, int]]:
    """Frames of all columns as str plus ``line``, one per chunk of the file (CSV: about
    ``chunk_bytes`` cut at a line end, None = whole file; Parquet: ``chunk_rows`` rows), and
    the rows each chunk read. Unreadable rows go to ``problems``, with file line numbers."""
    chunks = (
        _parquet_chunks(source, chunk_rows if chunk_bytes is not None else None)
        if source.parquet
        else _csv_chunks(source, delimiter, problems, chunk_bytes)
    )
    for frame, lines, rows_read in chunks:
        if "line" in frame.columns:
            raise InputError(
                f"{source.header}: column 'line' is reserved for segrec's line numbers; rename it"
            )
        frame["line"] = lines
        yield frame, rows_read


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror}); check its permissions") from err


def _pieces(path: Path, chunk_bytes: int | None) -> Iterator[bytes]:
    """The file's bytes in pieces of about ``chunk_bytes`` that end at a line end (the last
    may not); one piece when ``chunk_bytes`` is None. Pieces never split a UTF-8 character."""
    if chunk_bytes is None:
        yield _read_bytes(path)
        return
    rest = b""
    try:
        with path.open("rb") as handle:
            while block := handle.read(chunk_bytes):
                data = rest + block
                cut = data.rfind(b"\n") + 1
                if cut:
                    yield data[:cut]
                rest = data[cut:]
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror}); check its permissions") from err
    if rest:
        yield rest


def _csv_chunks(
    source: _Source, delimiter: str, problems: _Problems, chunk_bytes: int | None
) -> Iterator[tuple[pd.DataFrame, np.ndarray, int]]:
    path = source.path
    names: list[str] | None = None
    offset = 0  # lines before this piece
    data_rows = 0
    for index, raw in enumerate(_pieces(path, chunk_bytes)):
        try:
            text, clean = raw.decode("utf-8"), True
        except UnicodeDecodeError:  # keep bad bytes as lone surrogates, to name their lines
            text, clean = raw.decode("utf-8", errors="surrogateescape"), False
        if index == 0:
            text = text.removeprefix("\ufeff")
        text = text.replace("\r\n", "\n").removesuffix("\n")
        # Lone surrogates cannot go into Arrow strings; only bad bytes pay for objects.
        lines = pd.Series(text.split("\n"), dtype=str if clean else object)
        first = offset
        offset += len(lines)
        blank = (lines.str.strip() == "").to_numpy()
        keep = ~blank
        if names is None:
            if blank.all():
                continue
            header_at = int(np.argmax(keep))
            names = _csv_header(path, first + header_at + 1, lines.iloc[header_at], delimiter)
            keep[: header_at + 1] = False
        data = lines[keep]
        if data.empty:
            continue
        data_rows += len(data)
        line_no = data.index.to_numpy() + first + 1
        yield _csv_rows(source, data, line_no, names, delimiter, clean, problems)
    if names is None:
        raise InputError(f"{path}: the file is empty; expected a header line and data rows")
    if not data_rows:
        raise InputError(f"{path}: the file has a header but no data rows")


def _csv_header(path: Path, line: int, header: str, delimiter: str) -> list[str]:
    """The column names of a header line, checked (bad bytes, one column, repeated names)."""
    if _SURROGATE.search(header):
        raise InputError(f"{path}:{line}: {_undecodable(header, path)}")
    try:
        names = [n.strip() for n in next(csv.reader([header], delimiter=delimiter))]
    except csv.Error as exc:  # a column name over the csv module's field limit, NUL bytes
        longest = max(len(field) for field in header.split(delimiter))
        why = (
            f"a column name holds {longest:,} characters, over the limit of {FIELD_LIMIT:,}"
            if longest > FIELD_LIMIT
            else f"the header cannot be read as CSV ({exc})"
        )
        raise InputError(
            f"{path}:{line}: {why}; the first line must be the column names — fix the header"
        ) from None
    if len(names) == 1:
        _check_single_column(path, line, header, delimiter)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            fix = "name them, or drop a trailing delimiter" if not name else "rename one"
            raise InputError(f"{path}:{line}: column {name!r} appears twice in the header; {fix}")
        seen.add(name)
    return names


def _csv_rows(
    source: _Source,
    data: pd.Series,
    line_no: np.ndarray,
    names: list[str],
    delimiter: str,
    clean: bool,
    problems: _Problems,
) -> tuple[pd.DataFrame, np.ndarray, int]:
    """Check lines (one record each) and parse the good ones; returns the frame, its line
    numbers, and how many lines were read."""
    path = source.path
    undecodable = (
        np.zeros(len(data), dtype=bool) if clean else data.str.contains(_SURROGATE).to_numpy()
    )
    quotes = _count(data, '"')
    unbalanced = (quotes % 2 == 1) & ~undecodable
    fields = _count(data, delimiter) + 1
    quoted = quotes > 0
    if quoted.any():
        if delimiter != " ":  # a space before an opening quote is not part of the field
            start = "^|" + re.escape(delimiter)
            data[quoted] = data[quoted].str.replace(f'({start}) +"', r'\1"', regex=True)
        outside = data[quoted].str.replace(_QUOTED, "", regex=True)
        fields[quoted] = _count(outside, delimiter) + 1
    ragged = (fields != len(names)) & ~undecodable & ~unbalanced

    bad = data[undecodable].tolist()
    problems.add(line_no[undecodable], lambda i: _undecodable(bad[i], path))
    problems.add(
        line_no[unbalanced],
        lambda _: (
            "unbalanced quote: a quoted field must close on the same line (fields that "
            'span lines are not supported); close the quote, or double a literal quote as ""'
            + source.skip_hint
        ),
    )
    counts = fields[ragged]
    problems.add(
        line_no[ragged],
        lambda i: (
            f"{counts[i]} fields but the header has {len(names)}; quote values that "
            f"contain {_shell_delimiter(delimiter)} or fix the row{source.skip_hint}"
        ),
    )
    good = ~(undecodable | unbalanced | ragged)
    lengths = data.str.len().to_numpy()
    long = np.flatnonzero(good & (lengths > FIELD_LIMIT))
    if long.size:
        oversized = [_oversized(path, data.iloc[i], names, delimiter) for i in long]
        found = [i for i, why in zip(long, oversized, strict=True) if why]
        reasons = [why for why in oversized if why]
        problems.add(line_no[found], lambda i: reasons[i] + source.skip_hint)
        good[found] = False
    frame = _parse_lines(path, data[good], names, delimiter, int(lengths[good].max(initial=0)))
    return frame, line_no[good], len(data)


def _oversized(path: Path, line: str, names: list[str], delimiter: str) -> str | None:
    """Why a long line is refused (its first field over FIELD_LIMIT), or None if none is."""
    row = _parse_lines(path, pd.Series([line]), names, delimiter, len(line)).iloc[0]
    for name in names:
        if len(row[name]) > FIELD_LIMIT:
            return (
                f"column {name!r} holds {len(row[name]):,} characters, over the limit of "
                f"{FIELD_LIMIT:,} per field; shorten the value"
            )
    return None


def _count(lines: pd.Series, literal: str) -> np.ndarray:
    """How often ``literal`` occurs in each line, with Arrow's literal search when it can
    (pandas's str.count always compiles a regex, several times slower)."""
    try:
        array = pa.array(lines)
    except (pa.ArrowException, UnicodeError):  # lines with undecodable bytes stay objects
        return lines.str.count(re.escape(literal)).to_numpy(dtype=np.int64)
    return pc.count_substring(array, literal).to_numpy(zero_copy_only=False).astype(np.int64)


def _parse_lines(
    path: Path, rows: pd.Series, names: list[str], delimiter: str, longest: int
) -> pd.DataFrame:
    """Parse lines already checked to hold one record each, so row i is line i of ``rows``
    (``longest``: the longest line's length, so that Arrow's blocks can hold it)."""
    if rows.empty:
        return pd.DataFrame({name: pd.Series(dtype=str) for name in names})
    columns = [f"c{i}" for i in range(len(names))]
    block = max(1 << 20, 4 * (longest + 1))  # characters may take up to 4 bytes
    try:
        table = pa_csv.read_csv(
            io.BytesIO("\n".join(rows.tolist()).encode("utf-8")),
            read_options=pa_csv.ReadOptions(column_names=columns, block_size=block),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=False),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as err:  # the line checks above should leave nothing to fail here
        reason = str(err).strip().splitlines()[0]
        raise InputError(f"{path}: malformed CSV ({reason}); check quoting") from err
    if table.num_rows != len(rows):
        raise InputError(f"{path}: malformed CSV (rows do not match lines); check quoting")
    return pd.DataFrame(
        {
            name: table.column(c).to_pandas().str.strip()
            for name, c in zip(names, columns, strict=True)
        }
    )


def _undecodable(line: str, path: Path) -> str:
    found = _SURROGATE.search(line)
    assert found is not None
    byte = ord(found.group()) - 0xDC00
    return (
        f"byte 0x{byte:02x} at character {found.start() + 1} is not UTF-8; convert the file "
        f"with `iconv -f latin1 -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)}`"
    )


def _check_single_column(path: Path, line: int, header: str, delimiter: str) -> None:
    """A header that parses as one column but holds another separator means the wrong one."""
    counts = {d: header.count(d) for d in _DELIMITERS if d != delimiter}
    likely = max(counts, key=lambda d: counts[d])
    if counts[likely]:
        raise InputError(
            f"{path}:{line}: the header {_show(header, 60)} reads as one column with delimiter "
            f"{_shell_delimiter(delimiter)} but looks {_shell_delimiter(likely)}-separated; "
            f"pass --delimiter {_shell_delimiter(likely)}"
        )


def _parquet_chunks(
    source: _Source, chunk_rows: int | None
) -> Iterator[tuple[pd.DataFrame, np.ndarray, int]]:
    """The Parquet file's rows as str columns, ``chunk_rows`` at a time (None: all at once)."""
    path = source.path
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; expected a Parquet table with rows")
    try:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows == 0:
            raise InputError(f"{path}: the Parquet file has no rows")
        names = parquet.schema_arrow.names
        if len(set(names)) != len(names):
            raise InputError(f"{path}: two columns have the same name; rename one")
        batches = (
            [parquet.read()]
            if chunk_rows is None
            else (pa.Table.from_batches([b]) for b in parquet.iter_batches(chunk_rows))
        )
        done = 0
        for table in batches:
            frame = _parquet_text(path, table)
            yield frame, np.arange(done + 1, done + table.num_rows + 1), table.num_rows
            done += table.num_rows
    except (pa.ArrowException, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{path}: not a readable Parquet file ({reason}); write it with pandas.to_parquet "
            "or pass a CSV file"
        ) from err


def _parquet_text(path: Path, table: pa.Table) -> pd.DataFrame:
    """Every column of a Parquet table as stripped str (lists joined by |, times as seconds)."""
    columns: dict[str, pd.Series] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        try:
            if pa.types.is_dictionary(kind):
                column = column.cast(kind.value_type)
                kind = column.type
            if pa.types.is_list(kind) or pa.types.is_large_list(kind):
                column = pc.binary_join(column.cast(pa.list_(pa.string())), "|")
            elif pa.types.is_timestamp(kind):
                column = column.cast(pa.timestamp("s", tz=kind.tz), safe=False).cast(pa.int64())
            text = column.cast(pa.string()).to_pandas().fillna("")
        except (pa.ArrowException, TypeError) as err:
            raise InputError(
                f"{path}: column {name!r} has type {kind}, which segrec cannot read; store it "
                "as text or numbers"
            ) from err
        columns[str(name)] = text.astype(str).str.strip()
    return pd.DataFrame(columns)


# --- column mapping ------------------------------------------------------------------------------


def _resolve(
    source: _Source,
    names: Sequence[str],
    explicit: str | None,
    candidates: Sequence[str],
    flag: str,
    taken: Sequence[str] = (),
) -> str | None:
    """The column for one role: the explicit name if given (must exist), else the first
    candidate present (case- and separator-insensitive)."""
    if explicit is not None:
        if explicit in names:
            return explicit
        folded = [n for n in names if n.lower() == explicit.lower()]
        if len(folded) == 1:
            return folded[0]
        raise InputError(
            f"{source.path}: column {explicit!r} ({flag}) not found; columns found: {_found(names)}"
        )
    by_norm: dict[str, str] = {}
    for name in names:
        if name not in taken:
            by_norm.setdefault(_norm(name), name)
    return next((by_norm[_norm(c)] for c in candidates if _norm(c) in by_norm), None)


def _require(source: _Source, names: Sequence[str], explicit: str, flag: str) -> str:
    """An explicitly named column, which must exist."""
    column = _resolve(source, names, explicit, (), flag)
    assert column is not None  # _resolve raises for a missing explicit column
    return column


def _found(names: Sequence[str]) -> str:
    return ", ".join(n if n else "''" for n in names if n != "line")


def _missing(
    source: _Source, role: str, candidates: Sequence[str], names: Sequence[str], fix: str
) -> InputError:
    return InputError(
        f"{source.path}: no {role} column (looked for {', '.join(candidates)}); "
        f"columns found: {_found(names)}; {fix}"
    )


def _distinct(source: _Source, mapping: dict[str, str | None]) -> None:
    seen: dict[str, str] = {}
    for role, column in mapping.items():
        if column is None:
            continue
        if column in seen:
            raise InputError(
                f"{source.path}: column {column!r} is mapped to both {seen[column]} and {role}; "
                "map each role to its own column"
            )
        seen[column] = role


def _isin(column: pd.Series, values: pd.Series) -> np.ndarray:
    """``column.isin(values)`` through a hash index: pandas's Arrow-string isin loops in Python
    over ``values``, which takes seconds for a whole log."""
    return pd.Index(values.unique()).get_indexer(column) >= 0


def _repeats(frame: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, dict[int, int]]:
    """Rows whose keys repeat an earlier row's, and for the first few the earlier line."""
    repeat = frame.duplicated(keys).to_numpy()
    if not repeat.any():
        return repeat, {}
    first = frame.groupby(keys, dropna=False, sort=False)["line"].transform("min").to_numpy()
    lines = frame["line"].to_numpy()[repeat][:MAX_PROBLEMS]
    return repeat, dict(zip(lines.tolist(), first[repeat][:MAX_PROBLEMS].tolist(), strict=True))


# --- item catalogue ------------------------------------------------------------------------------


def _load_items(
    source: _Source, columns: ItemColumns, delimiter: str, notes: list[str]
) -> tuple[pd.DataFrame, int]:
    problems = _Problems(source)
    raw, rows_read = _read(source, delimiter, problems)
    names = [c for c in raw.columns if c != "line"]
    item = _resolve(source, names, columns.item, _ITEM, "--item-id-col")
    if item is None:
        raise _missing(source, "item id", _ITEM, names, "pass --item-id-col NAME")
    title = _resolve(source, names, columns.title, _TITLE, "--title-col", [item])
    description = _resolve(
        source, names, columns.description, _DESCRIPTION, "--description-col", [item]
    )
    if title is None and description is None:
        raise _missing(
            source,
            "title or description",
            _TITLE + _DESCRIPTION,
            names,
            "pass --title-col NAME or --description-col NAME",
        )
    used = [c for c in (item, title, description) if c is not None]
    if columns.categories is None:
        wanted = {_norm(c) for c in _CATEGORIES}
        categories = [c for c in names if _norm(c) in wanted and c not in used]
    else:
        categories = [_require(source, names, c, "--category-col") for c in columns.categories]
    _distinct(
        source,
        {"item id": item, "title": title, "description": description}
        | {f"categories ({c})": c for c in categories},
    )

    ids = raw[item]
    titles = raw[title] if title else pd.Series("", index=raw.index, dtype=str)
    descriptions = raw[description] if description else pd.Series("", index=raw.index, dtype=str)
    problems.flag(raw, ids == "", lambda _: f"column {item!r} is empty; every item needs an id")
    problems.flag(
        raw,
        (ids != "") & (titles == "") & (descriptions == ""),
        lambda r: f"item {_show(r[item])} has neither a title nor a description; fill one in",
    )
    named = raw.loc[ids != ""]
    repeat, earlier = _repeats(named, [item])
    problems.flag(
        named,
        repeat,
        lambda r: (
            f"item id {_show(r[item])} already appears on {source.ref(earlier[r['line']])}; "
            "item ids must be unique, remove one of the rows"
        ),
    )
    problems.raise_first()

    cats, no_genres = _split_categories(raw, categories)
    frame = pd.DataFrame(
        {
            "item_id": ids,
            "title": titles,
            "description": descriptions,
            "categories": pd.Series(cats, index=raw.index, dtype=object),
        }
    )
    frame["text"] = [
        item_text(t, d, c)
        for t, d, c in zip(titles.tolist(), descriptions.tolist(), cats, strict=True)
    ]

    parts = [f"item={item}"]
    parts += [f"title={title}"] if title else []
    parts += [f"description={description}"] if description else []
    parts += [f"categories={c}" for c in categories]
    layout = [_norm(n) for n in names] == ["movieid", "title", "genres"]
    notes.append(
        f"{source.path}: MovieLens layout (movieId, title, genres); genres split on '|'"
        if layout
        else f"{source.path}: columns {', '.join(parts)}"
    )
    if no_genres:
        notes.append(f"{source.path}: {no_genres} items say {_NO_CATEGORY!r}: no categories")
    return frame, rows_read


def _split_categories(raw: pd.DataFrame, columns: Sequence[str]) -> tuple[list[list[str]], int]:
    """One list per row from every category column, split on | or ; (and , for tags),
    de-duplicated in order of appearance. Also returns how many rows said "no genres"."""
    if not columns:
        return [[] for _ in range(len(raw))], 0
    parts = []
    for order, column in enumerate(columns):
        pattern = r"[|;,]" if _norm(column) in ("tags", "tag") else r"[|;]"
        # from objects: a column parsed from a large file is a chunked Arrow array
        cells = pa.array(raw[column].to_numpy(dtype=object), type=pa.string())
        lists = pc.split_pattern_regex(cells, pattern)
        parts.append(
            pd.DataFrame(
                {
                    "row": pc.list_parent_indices(lists).to_numpy(),
                    "order": order,
                    "category": pc.utf8_trim_whitespace(pc.list_flatten(lists)).to_pandas(),
                }
            )
        )
    long = pd.concat(parts, ignore_index=True)
    marker = (long["category"].str.lower() == _NO_CATEGORY).to_numpy()
    no_genres = long.loc[marker, "row"].nunique()
    long = long.loc[(long["category"] != "").to_numpy() & ~marker]
    # Row order, then column order, then order within the cell (the stable sort keeps it).
    long = long.sort_values(["row", "order"], kind="stable").drop_duplicates(["row", "category"])
    offsets = np.concatenate([[0], np.cumsum(np.bincount(long["row"], minlength=len(raw)))])
    lists = pa.ListArray.from_arrays(offsets, pa.array(long["category"], type=pa.string()))
    return lists.to_pylist(), int(no_genres)


# --- behaviour log -------------------------------------------------------------------------------


def _load_log(
    source: _Source,
    columns: LogColumns,
    delimiter: str,
    skip_bad_rows: bool,
    known_items: pd.Series,
    catalogue: _Source,
    notes: list[str],
    chunk_bytes: int | None,
    chunk_rows: int,
) -> tuple[pd.DataFrame, int, int, int, list[str]]:
    """The validated interactions, rows read, rows skipped, duplicates dropped, problems.

    The log is read and checked chunk by chunk (only the compact, validated rows are kept);
    duplicates are found over the whole log at the end, so the result and every message are
    the same whatever the chunk size.
    """
    problems = _Problems(source)
    roles: _LogRoles | None = None
    parts: list[pd.DataFrame] = []
    rows_read = 0
    iso = False
    known = pd.Index(known_items.unique())
    chunks = _read_chunks(
        source, delimiter, problems, chunk_bytes=chunk_bytes, chunk_rows=chunk_rows
    )
    for raw, read in chunks:
        rows_read += read
        if roles is None:
            roles = _LogRoles.resolve(source, [c for c in raw.columns if c != "line"], columns)
        part, part_iso = _check_log_rows(raw, roles, source, problems, known, catalogue)
        parts.append(part)
        iso = iso or part_iso
    assert roles is not None  # _read_chunks raises for a file without data rows
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    bad = problems.bad_lines()
    repeat, earlier = _repeats(frame, ["user_id", "item_id", "behavior", "timestamp"])
    duplicates = int(repeat.sum())
    if skip_bad_rows and duplicates:
        line = int(frame["line"].to_numpy()[repeat][0])
        notes.append(
            f"{source.at(line)}: dropped {duplicates} duplicate rows (same user, item, behavior "
            f"and timestamp) like this one, a duplicate of {source.ref(earlier[line])}; "
            "kept the first of each"
        )
    elif duplicates:
        problems.flag(
            frame,
            repeat,
            lambda r: (
                f"duplicate of {source.ref(earlier[r['line']])} (same user, item, behavior "
                "and timestamp); remove it (or pass --skip-bad-rows to keep the first)"
            ),
        )
    if not skip_bad_rows:
        problems.raise_first()
    frame = frame.loc[~repeat].reset_index(drop=True)
    if frame.empty:
        raise InputError(
            f"{source.path}: no usable rows left after skipping {len(bad)} bad rows; first "
            f"problem: {problems.messages()[0]}"
        )

    notes.extend(
        _log_notes(
            source,
            roles.names,
            roles.user,
            roles.item,
            roles.behavior,
            roles.value,
            roles.timestamp,
            iso,
            frame["timestamp"],
        )
    )
    if len(bad):
        notes.append(f"{source.path}: skipped {len(bad)} bad rows")
    return frame, rows_read, len(bad), duplicates, problems.messages()


@dataclass(frozen=True)
class _LogRoles:
    """Which log column plays which role (from the header, once for every chunk)."""

    names: list[str]
    user: str
    item: str
    behavior: str | None
    value: str | None
    timestamp: str | None

    @classmethod
    def resolve(cls, source: _Source, names: list[str], columns: LogColumns) -> _LogRoles:
        user = _resolve(source, names, columns.user, _USER, "--user-col")
        if user is None:
            raise _missing(source, "user id", _USER, names, "pass --user-col NAME")
        item = _resolve(source, names, columns.item, _ITEM, "--item-col", [user])
        if item is None:
            raise _missing(source, "item id", _ITEM, names, "pass --item-col NAME")
        taken = [user, item]
        behavior = _resolve(source, names, columns.behavior, _BEHAVIOR, "--behavior-col", taken)
        value = _resolve(source, names, columns.value, _VALUE, "--value-col", taken)
        timestamp = _resolve(source, names, columns.timestamp, _TIMESTAMP, "--timestamp-col", taken)
        _distinct(
            source,
            {
                "user": user,
                "item": item,
                "behavior": behavior,
                "value": value,
                "timestamp": timestamp,
            },
        )
        return cls(names, user, item, behavior, value, timestamp)


def _check_log_rows(
    raw: pd.DataFrame,
    roles: _LogRoles,
    source: _Source,
    problems: _Problems,
    known_items: pd.Index,
    catalogue: _Source,
) -> tuple[pd.DataFrame, bool]:
    """One chunk's rows checked (problems recorded) and converted; bad rows left out.
    Also returns whether ISO timestamps were seen."""
    user, item, behavior, value, timestamp = (
        roles.user,
        roles.item,
        roles.behavior,
        roles.value,
        roles.timestamp,
    )
    hint = source.skip_hint
    if behavior is not None:
        behaviors = raw[behavior]
    else:
        assumed = "rating" if value is not None and _norm(value) == "rating" else "interaction"
        behaviors = pd.Series(assumed, index=raw.index, dtype=str)
    values, bad_values = _parse_values(raw[value]) if value else (None, None)
    times, bad_times, iso = _parse_timestamps(raw[timestamp]) if timestamp else (None, None, False)

    checks: list[tuple[Any, Callable[[dict[str, Any]], str]]] = [
        (raw[user] == "", lambda _: f"column {user!r} is empty; fill in the user{hint}"),
        (raw[item] == "", lambda _: f"column {item!r} is empty; fill in the item{hint}"),
    ]
    if behavior is not None:
        checks.append(
            (behaviors == "", lambda _: f"column {behavior!r} is empty; fill it in{hint}")
        )
    if value is not None:
        checks.append(
            (
                bad_values,
                lambda r: (
                    f"column {value!r}: {_show(r[value])} is not a number; write it like 4.5, "
                    f"or leave it empty{hint}"
                ),
            )
        )
    if timestamp is not None:
        checks.append((bad_times, lambda r: _bad_timestamp(timestamp, r[timestamp], hint)))
    checks.append(
        (
            (raw[item] != "").to_numpy() & (known_items.get_indexer(raw[item]) < 0),
            lambda r: (
                f"item {_show(r[item])} (column {item!r}) is not in the catalogue "
                f"{catalogue.path}; add it there{hint}"
            ),
        )
    )
    bad = np.zeros(len(raw), dtype=bool)
    for mask, reason in checks:
        problems.flag(raw, mask, reason)
        bad |= np.asarray(mask, dtype=bool)

    frame = pd.DataFrame(
        {
            "user_id": raw[user],
            "item_id": raw[item],
            "behavior": behaviors,
            "value": values if values is not None else np.nan,
            "timestamp": times if times is not None else pd.NA,
            "line": raw["line"],
        }
    ).astype({"value": "float64", "timestamp": "Int64", "line": "int64"})
    return frame.loc[~bad], iso


def _log_notes(
    source: _Source,
    names: list[str],
    user: str,
    item: str,
    behavior: str | None,
    value: str | None,
    timestamp: str | None,
    iso: bool,
    times: pd.Series,
) -> list[str]:
    path = source.path
    if [_norm(n) for n in names] == ["userid", "movieid", "rating", "timestamp"]:
        notes = [f"{path}: MovieLens layout ({', '.join(names)}); behavior=rating"]
    else:
        mapping = {"user": user, "item": item, "behavior": behavior, "value": value}
        mapping["timestamp"] = timestamp
        shown = ", ".join(f"{role}={col}" for role, col in mapping.items() if col is not None)
        notes = [f"{path}: columns {shown}"]
        if behavior is None and value is not None and _norm(value) == "rating":
            notes.append(
                f"{path}: no behavior column; column {value!r} holds ratings, so behavior=rating"
            )
        elif behavior is None:
            notes.append(
                f"{path}: no behavior column and no rating column; "
                "behavior=interaction for every row"
            )
    if value is None:
        notes.append(f"{path}: no value column; value is empty (NaN)")
    if timestamp is None:
        notes.append(
            f"{path}: no timestamp column; the order of rows in the file is the order of events"
        )
    else:
        if iso:
            notes.append(
                f"{path}: ISO-8601 timestamps converted to unix seconds (UTC where no "
                "offset is given)"
            )
        missing = int(times.isna().sum())
        if missing:
            notes.append(f"{path}: {missing} rows have no timestamp")
    return notes


def _numbers(column: pd.Series) -> np.ndarray:
    """float64 per cell, NaN where empty or not a number (Arrow's cast when every cell parses,
    which is the common case and ten times faster than pandas.to_numeric)."""
    try:
        return pc.cast(pa.array(column), pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowException, UnicodeError):
        return pd.to_numeric(column.where(column != ""), errors="coerce").to_numpy(dtype="float64")


def _parse_values(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Numbers as float64 (empty = NaN) and the mask of non-empty cells that are not numbers."""
    numbers = _numbers(column)
    return numbers, (column != "").to_numpy() & ~np.isfinite(numbers)


def _parse_timestamps(column: pd.Series) -> tuple[pd.Series, np.ndarray, bool]:
    """Unix seconds (Int64, empty = NA) from integer seconds or ISO-8601 strings.

    Returns the seconds, the mask of unparseable cells and whether any ISO string was seen.
    """
    empty = (column == "").to_numpy()
    numbers = _numbers(column)
    numeric = np.isfinite(numbers) & (np.abs(numbers) <= _TIMESTAMP_LIMIT)
    seconds = pd.Series(pd.NA, index=column.index, dtype="Int64")
    seconds[numeric] = np.floor(numbers[numeric]).astype("int64")
    text = ~empty & np.isnan(numbers)
    iso = bool(text.any())
    parsed = np.zeros(len(column), dtype=bool)
    if iso:
        dates = pd.to_datetime(column[text], format="ISO8601", utc=True, errors="coerce")
        ok = dates.notna().to_numpy()
        where = np.flatnonzero(text)[ok]
        seconds.iloc[where] = ((dates[ok] - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy("int64")
        parsed[where] = True
    bad = ~empty & ~numeric & ~parsed
    return seconds, bad, iso and bool(parsed.any())


def _bad_timestamp(column: str, value: str, hint: str) -> str:
    number = pd.to_numeric(value, errors="coerce")
    if pd.notna(number) and abs(number) > _TIMESTAMP_LIMIT:
        why = "is too large for unix seconds (milliseconds? divide by 1000)"
    else:
        why = "is neither unix seconds nor an ISO-8601 date like 2024-05-01T12:00:00Z"
    return f"column {column!r}: {_show(value)} {why}; fix it{hint}"


# --- user attributes -----------------------------------------------------------------------------


def _load_attributes(
    source: _Source,
    user_column: str | None,
    delimiter: str,
    known_users: pd.Series,
    notes: list[str],
) -> pd.DataFrame:
    problems = _Problems(source)
    raw, _ = _read(source, delimiter, problems)
    names = [c for c in raw.columns if c != "line"]
    user = _resolve(source, names, user_column, _USER, "--attributes-user-col")
    if user is None:
        raise _missing(source, "user id", _USER, names, "pass --attributes-user-col NAME")
    attributes = [c for c in names if c != user]
    for column in attributes:
        if _norm(column) in _PII_NAMES:
            raise InputError(
                f"{source.header}: column {column!r} looks like personal data; {_PII_FIX}"
            )
        if column == "user_id":
            raise InputError(
                f"{source.header}: column 'user_id' is not the user column {user!r}; rename it"
            )
    sample = raw.head(_PII_SAMPLE)
    for column in attributes:
        values = sample[column][sample[column] != ""]
        if values.empty:
            continue
        if values.str.contains(_EMAIL, regex=True).any():
            kind = "e-mail addresses"
        elif values.str.fullmatch(_PHONE).mean() >= 0.5:
            kind = "phone numbers"
        else:
            continue
        raise InputError(
            f"{source.header}: column {column!r} holds what look like {kind}; {_PII_FIX}"
        )

    ids = raw[user]
    problems.flag(raw, ids == "", lambda _: f"column {user!r} is empty; every row needs a user")
    named = raw.loc[ids != ""]
    repeat, earlier = _repeats(named, [user])
    problems.flag(
        named,
        repeat,
        lambda r: (
            f"user {_show(r[user])} already appears on {source.ref(earlier[r['line']])}; "
            "keep one row per user"
        ),
    )
    problems.raise_first()

    frame = raw[[user, *attributes]].rename(columns={user: "user_id"})
    known = _isin(frame["user_id"], known_users)
    if not known.all():
        notes.append(f"{source.path}: dropped {int((~known).sum())} rows for users not in the log")
    frame = frame.loc[known].reset_index(drop=True).astype(str)
    notes.append(
        f"{source.path}: attributes {', '.join(attributes) or '(none)'} for {len(frame)} users"
    )
    return frame
