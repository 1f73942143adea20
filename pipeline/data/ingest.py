"""Real data in: moola's labeled Parquet, or a bar series (CSV/Parquet) with an optional labels CSV.

Both produce a canonical `schema.WindowSet`; nothing is written here (the command validates
everything first, then writes). Every file is checked whole and all its problems are reported at
once. Rules that a reader might not guess:

- Timestamps without a zone are taken as UTC (moola's raw NQ file is tz-naive UTC wall time);
  timestamps with an offset are converted to UTC.
- `volume` is optional and ignored; other extra columns are listed in the summary as ignored.
- moola: `group_id` = `base_window_id` when present (overlap copies share it), else `window_id`
  with an `_offset<+/-N>` suffix removed; `start_ts`, when present, becomes `t0`.
- labels CSV `start`: an integer is a row of the bar series (0-based), anything else a timestamp
  that must equal one bar's timestamp exactly.
- Problems in a CSV name each row as an editor shows it, `line 17 (data row 15)`: the file line
  (1-based, the header is line 1) and the data row (0-based, what `start` counts). Parquet rows
  are data rows, counted from 0.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline import storage
from pipeline.data import schema
from pipeline.data.schema import MAX_ROWS_LISTED, WINDOW, Problems
from pipeline.errors import UserError

BARS_COLUMNS = ("timestamp", "open", "high", "low", "close")
BARS_OPTIONAL = ("volume",)
LABELS_COLUMNS = ("window_id", "start", "label", "expansion_start", "expansion_end")
LABELS_OPTIONAL = ("group_id",)
MOOLA_COLUMNS = ("window_id", "features", "label", "expansion_start", "expansion_end")
MOOLA_OPTIONAL = ("base_window_id", "offset", "start_ts", "source", "quality", "overlap_fraction")
DEFAULT_STRIDE = 52

NUMBER_RE = r"(?i)^[+-]?((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|nan|inf|infinity)$"
INTEGER_RE = r"^[+-]?\d+$"
ISO_TIME_RE = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}:?\d{2})?$"
ZONE_RE = r"(Z|[+-]\d{2}:?\d{2})$"
OFFSET_SUFFIX = re.compile(r"_offset[+-]?\d+$")


@dataclass
class Ingested:
    windows: schema.WindowSet
    source: dict
    ignored_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)          # said in the summary


class Quoted:
    """Per-row detail for a problem message, `repr` of the row's value, computed only for the
    rows that are reported (a bar file has millions of rows)."""

    def __init__(self, values: pa.Array):
        self.values = values

    def __getitem__(self, row) -> str:
        return repr(self.values[int(row)].as_py())


@dataclass
class CsvProblems(Problems):
    """Problems of a CSV file, each row named as an editor shows it: `line 17 (data row 15)`.
    `line_of` maps a 0-based data row to its 1-based file line."""

    line_of: Callable[[int], int] = lambda row: row + 2

    def add(self, what: str, rows, details=None) -> None:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size == 0:
            return
        details = [None] * rows.size if details is None else list(details)
        self.found.setdefault(what, []).extend(
            f"line {self.line_of(int(r))} (data row {r}" + (f": {d})" if d is not None else ")")
            for r, d in zip(rows, details))

    def message(self) -> str:
        parts = list(self.notes)
        for what, rows in self.found.items():
            shown = ", ".join(rows[:MAX_ROWS_LISTED])
            more = f" ... and {len(rows) - MAX_ROWS_LISTED} more" if len(rows) > MAX_ROWS_LISTED else ""
            parts.append(f"{len(rows)} row{'' if len(rows) == 1 else 's'} with {what}: {shown}{more}")
        count = f"{len(parts)} problem{'s' if len(parts) > 1 else ''}, " if self.found else ""
        return f"{self.source}: {count}nothing was written: " + "; ".join(parts)


def problems_for(uri: str, line_of: Callable[[int], int] | None) -> Problems:
    """CSV files name rows by file line; Parquet files by data row."""
    return Problems(uri) if line_of is None else CsvProblems(uri, line_of=line_of)


def csv_line_of(data: bytes, n_rows: int) -> Callable[[int], int]:
    """data row (0-based) -> file line (1-based) of a CSV's bytes, for the error messages.

    When every row is one line after a header on line 1 (no blank lines, which pyarrow skips),
    row r is on line r + 2: one count of newlines says so (~1/20 of the read). Otherwise the
    file is walked with the csv module, on the first call only: a valid file never pays it."""
    end = len(data)
    while end and data[end - 1] in b"\r\n":
        end -= 1
    if data.count(b"\n", 0, end) == n_rows and data[:1] not in (b"\n", b"\r"):
        return lambda row: row + 2
    starts = functools.cache(lambda: _record_lines(data))

    def line_of(row: int) -> int:
        lines = starts()
        return lines[row] if row < len(lines) else row + 2
    return line_of


def _record_lines(data: bytes) -> list[int]:
    """The first file line of every data row (the header and blank lines are no rows)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig", "replace"), newline=""))
    starts, previous = [], 0
    for record in reader:
        if record:  # a blank line is no row, here as in pyarrow
            starts.append(previous + 1)
        previous = reader.line_num
    return starts[1:]


# --- reading files -------------------------------------------------------------------------

def is_csv(uri: str) -> bool:
    return uri.lower().endswith((".csv", ".csv.gz", ".txt"))


def is_parquet(uri: str) -> bool:
    return uri.lower().endswith((".parquet", ".pq", ".parq"))


def read_table(uri: str) -> pa.Table:
    """A CSV (every column as text, so bad values are reported per row) or a Parquet file."""
    return read_table_lines(uri)[0]


def read_table_lines(uri: str) -> tuple[pa.Table, Callable[[int], int] | None]:
    """`read_table`, and for a CSV the map of data rows to file lines (`csv_line_of`)."""
    if not storage.exists(uri):
        raise UserError(f"{uri}: not found")
    if is_parquet(uri):
        return schema.read_parquet(uri), None
    if not is_csv(uri):
        raise UserError(f"{uri}: unknown file type; use a .csv or .parquet file")
    data = storage.read_bytes(uri)
    if uri.lower().endswith(".gz"):
        import gzip
        data = gzip.decompress(data)
    header = next(csv.reader(io.StringIO(data[:65536].decode("utf-8-sig", "replace"))), [])
    if not header:
        raise UserError(f"{uri}: empty file, expected a header line")
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=True, null_values=[""]))
    except pa.ArrowInvalid as exc:
        raise UserError(f"{uri}: not a readable CSV file ({str(exc).splitlines()[0]})") from None
    return table, csv_line_of(data, table.num_rows)


def _as_strings(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return pc.utf8_trim_whitespace(col.cast(pa.string()))


def number_column(table: pa.Table, name: str, problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """float64 values of a column and a mask of unreadable rows (missing or non-numeric, both
    reported; NaN in the values)."""
    col = table.column(name)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        null = np.asarray(col.is_null(), dtype=bool)
        problems.add_mask(f"missing {name}", null)
        return np.asarray(col.cast(pa.float64()).fill_null(np.nan).to_numpy(), dtype=np.float64), null
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        problems.note(f"column {name} has type {col.type}, expected numbers")
        return np.full(len(col), np.nan), np.ones(len(col), bool)
    text = _as_strings(col)
    null = np.asarray(text.is_null(), dtype=bool)
    ok = np.asarray(pc.match_substring_regex(text, NUMBER_RE).fill_null(False), dtype=bool)
    problems.add_mask(f"missing {name}", null)
    bad = ~null & ~ok
    problems.add_mask(f"non-numeric {name}", bad, Quoted(text))
    clean = pc.if_else(pa.array(ok), text, pa.scalar(None, pa.string()))
    values = np.asarray(clean.cast(pa.float64()).fill_null(np.nan).to_numpy(), dtype=np.float64)
    return values, null | bad


def timestamp_column(col: pa.ChunkedArray | pa.Array, name: str, problems: Problems,
                     ok_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int64 microseconds (UTC) and a null mask; unparseable values are reported.

    `ok_rows`: only these rows are expected to hold timestamps (others are left null)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if pa.types.is_timestamp(col.type):
        ts = col if col.type.tz else pc.assume_timezone(col, "UTC")
        ts = ts.cast(pa.timestamp("us", tz="UTC"))
        null = np.asarray(ts.is_null(), dtype=bool)
        return np.asarray(ts.cast(pa.int64()).fill_null(0).to_numpy()), null
    if pa.types.is_date(col.type):
        ts = col.cast(pa.timestamp("us"))
        null = np.asarray(ts.is_null(), dtype=bool)
        return np.asarray(ts.cast(pa.int64()).fill_null(0).to_numpy()), null
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        problems.note(f"column {name} has type {col.type}; expected timestamps or ISO 8601 text "
                      f"like 2024-01-02T14:30:00Z")
        return np.zeros(n, np.int64), np.ones(n, bool)
    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    null = np.asarray(text.is_null(), dtype=bool)
    wanted = ~null if ok_rows is None else ~null & ok_rows
    good = np.asarray(pc.match_substring_regex(text, ISO_TIME_RE).fill_null(False), bool) & wanted
    zoned = np.asarray(pc.match_substring_regex(text, ZONE_RE).fill_null(False), bool) & good
    problems.add_mask(f"unreadable {name} (use ISO 8601, like 2024-01-02T14:30:00Z)",
                      wanted & ~good, Quoted(text))
    out = np.zeros(n, np.int64)
    for mask, type_ in ((zoned, pa.timestamp("us", tz="UTC")), (good & ~zoned, pa.timestamp("us"))):
        if mask.any():
            idx = np.flatnonzero(mask)
            part = text.take(pa.array(idx))
            try:
                parsed = part.cast(type_)
            except pa.ArrowInvalid:  # the pattern matched but the date does not exist (Feb 30)
                parsed = pa.array([_parse_one(v, type_) for v in part.to_pylist()], type_)
                problems.add_mask(f"impossible {name}", _scatter(n, idx, parsed.is_null()),
                                  Quoted(text))
            out[idx] = np.asarray(parsed.cast(pa.int64()).fill_null(0).to_numpy())
            good[idx[np.asarray(parsed.is_null(), bool)]] = False
    return out, ~good


def _parse_one(value, type_):
    try:
        return pa.array([value]).cast(type_)[0].as_py()
    except pa.ArrowInvalid:
        return None


def _scatter(n: int, idx: np.ndarray, mask: pa.Array) -> np.ndarray:
    out = np.zeros(n, bool)
    out[idx] = np.asarray(mask, dtype=bool)
    return out


def _ignored(names, required, optional) -> list[str]:
    return [c for c in names if c not in required and c not in optional]


# --- bars + labels ---------------------------------------------------------------------------

def _bars_parquet(uri: str) -> tuple[pa.Table, list[str], list[str]]:
    """Only the bar columns of a Parquet file (a raw NQ file also has symbol, rtype, ...).

    A file written by pandas with the time as its DatetimeIndex (moola's raw NQ file) keeps the
    index as a column named after it; with no `timestamp` column, that index is the timestamp,
    and the summary says so."""
    file_schema = schema.read_parquet_schema(uri)
    names = file_schema.names
    notes: list[str] = []
    rename = {}
    if "timestamp" not in names:
        index = pandas_time_index(file_schema)
        if index:
            rename[index] = "timestamp"
            notes.append(f"timestamp from the pandas index {index!r}")
    wanted = [rename.get(n, n) for n in names]
    schema.require_columns(wanted, BARS_COLUMNS, uri, BARS_OPTIONAL)
    keep = [n for n in names if rename.get(n, n) in BARS_COLUMNS]
    table = schema.read_parquet(uri, columns=keep)
    table = table.rename_columns([rename.get(n, n) for n in table.column_names])
    ignored = [n for n in names if rename.get(n, n) not in BARS_COLUMNS + BARS_OPTIONAL
               and not n.startswith("__index_level_")]
    return table, ignored, notes


def pandas_time_index(file_schema: pa.Schema) -> str | None:
    import json

    raw = (file_schema.metadata or {}).get(b"pandas")
    if not raw:
        return None
    try:
        index = json.loads(raw).get("index_columns", [])
    except ValueError:
        return None
    if len(index) == 1 and isinstance(index[0], str) and index[0] in file_schema.names \
            and pa.types.is_timestamp(file_schema.field(index[0]).type):
        return index[0]
    return None


def read_bars(uri: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(timestamps int64 us UTC [N], ohlc float64 [N,4], ignored columns, notes), fully checked."""
    notes: list[str] = []
    line_of = None
    if is_parquet(uri):
        table, ignored, notes = _bars_parquet(uri)
    else:
        table, line_of = read_table_lines(uri)
        schema.require_columns(table.column_names, BARS_COLUMNS, uri, BARS_OPTIONAL)
        ignored = _ignored(table.column_names, BARS_COLUMNS, BARS_OPTIONAL)
    problems = problems_for(uri, line_of)
    ts, null = timestamp_column(table.column("timestamp"), "timestamp", problems)
    columns = [number_column(table, c, problems) for c in schema.OHLC_COLUMNS]
    ohlc = np.stack([values for values, _ in columns], axis=1)
    readable = ~np.any([unreadable for _, unreadable in columns], axis=0)
    if table.num_rows < WINDOW:
        problems.note(f"{table.num_rows} bars, fewer than one {WINDOW}-bar window")
    schema.check_bar_times(ts, null, problems)
    schema.check_prices(ohlc[readable], problems, np.flatnonzero(readable))
    problems.raise_if_any()
    return ts, ohlc, ignored, notes


def ingest_bars(bars_uri: str, labels_uri: str | None = None,
                stride: int = DEFAULT_STRIDE) -> Ingested:
    ts, ohlc, ignored, notes = read_bars(bars_uri)
    n_bars = len(ts)
    bars = schema.bars_table(ts, ohlc)
    source = {"format": "bars", "bars": bars_uri, "labels": labels_uri, "bars_count": n_bars}
    if labels_uri is None:
        if stride < 1:
            raise UserError(f"--stride {stride}: must be at least 1")
        starts = np.arange(0, n_bars - WINDOW + 1, stride, dtype=np.int64)
        ids = [f"bars-{s:09d}" for s in starts]
        windows = schema.windows_table(ids, ids, t0=_t0(ts, starts), bar_index=starts)
        source["stride"] = stride
        return Ingested(schema.WindowSet(windows, bars, {}), source, ignored, notes)
    table, line_of = read_table_lines(labels_uri)
    schema.require_columns(table.column_names, LABELS_COLUMNS, labels_uri, LABELS_OPTIONAL)
    problems = problems_for(labels_uri, line_of)
    if table.num_rows == 0:
        problems.note("no labeled windows (a header line only)")
    ids = table.column("window_id").cast(pa.string()).to_pylist()
    schema.check_unique_ids(ids, problems)
    starts = _label_starts(table.column("start"), ts, problems)
    labels = table.column("label").cast(pa.string()).to_pylist()
    problems.add_mask("missing label", np.array([v is None for v in labels], dtype=bool))
    codes = schema.label_codes(labels, problems)
    s_col, e_col = table.column("expansion_start"), table.column("expansion_end")
    s = schema.int_column(_ints(s_col, "expansion_start", problems), "expansion_start", problems)
    e = schema.int_column(_ints(e_col, "expansion_end", problems), "expansion_end", problems)
    schema.check_labels(codes, s, e, problems, np.asarray(s_col.is_null()), np.asarray(e_col.is_null()))
    problems.raise_if_any()
    groups = table.column("group_id").cast(pa.string()).to_pylist() \
        if "group_id" in table.column_names else ids
    groups = [g if g else w for g, w in zip(groups, ids)]
    windows = schema.windows_table(ids, groups, t0=_t0(ts, starts), bar_index=starts,
                                   label=codes, expansion_start=s, expansion_end=e)
    ignored += [f"{c} (labels)" for c in _ignored(table.column_names, LABELS_COLUMNS, LABELS_OPTIONAL)]
    return Ingested(schema.WindowSet(windows, bars, {}), source, ignored, notes)


def _t0(ts: np.ndarray, starts: np.ndarray) -> pa.Array:
    return pa.array(ts[starts].astype("datetime64[us]")).cast(schema.TIMESTAMP)


def _ints(col: pa.ChunkedArray, name: str, problems: Problems) -> pa.Array:
    """Integer text -> int64 (non-integers reported, left null)."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col.combine_chunks()
    text = _as_strings(col)
    ok = np.asarray(pc.match_substring_regex(text, INTEGER_RE).fill_null(True), bool)
    problems.add_mask(f"non-integer {name}", ~ok, Quoted(text))
    return pc.if_else(pa.array(ok), text, pa.scalar(None, pa.string())).cast(pa.int64())


def _label_starts(col: pa.ChunkedArray, ts: np.ndarray, problems: Problems) -> np.ndarray:
    """Each labels row's first bar: an integer bar index, or a timestamp found in the series."""
    col = col.combine_chunks()
    n_bars, n = len(ts), len(col)
    starts = np.full(n, -1, dtype=np.int64)
    null = np.asarray(col.is_null(), bool)
    t, t_bad = np.zeros(n, np.int64), np.ones(n, bool)
    if pa.types.is_integer(col.type):
        is_int = ~null
        starts[is_int] = np.asarray(col.fill_null(-1).to_numpy(), dtype=np.int64)[is_int]
    else:
        text = col if pa.types.is_timestamp(col.type) else _as_strings(col)
        is_int = np.zeros(n, bool)
        if not pa.types.is_timestamp(text.type):
            is_int = np.asarray(pc.match_substring_regex(text, INTEGER_RE).fill_null(False), bool)
            starts[is_int] = np.asarray(text.filter(pa.array(is_int)).cast(pa.int64()).to_numpy())
        t, t_bad = timestamp_column(text, "start", problems, ok_rows=~is_int)
    by_time = ~null & ~is_int & ~t_bad
    pos = np.searchsorted(ts, t)
    hit = by_time & (pos < n_bars) & (ts[np.minimum(pos, n_bars - 1)] == t)
    starts[hit] = pos[hit]
    found = (is_int & (starts >= 0) & (starts < n_bars)) | hit
    problems.add_mask("missing start", null)
    problems.add_mask(f"a start that is not in the bar series ({n_bars} bars)",
                      (is_int | by_time) & ~found, Quoted(col.cast(pa.string())))
    runs_past = found & (starts + WINDOW > n_bars)
    problems.add_mask(f"a window that runs past the last bar (needs {WINDOW} bars from start)",
                      runs_past, [f"start bar {s}" for s in starts])
    return np.where(found & ~runs_past, starts, -1)


# --- moola labeled parquet -------------------------------------------------------------------

def ingest_moola(uri: str) -> Ingested:
    if not is_parquet(uri):
        raise UserError(f"{uri}: --format moola reads a Parquet file (.parquet)")
    table = schema.read_parquet(uri)
    schema.require_columns(table.column_names, MOOLA_COLUMNS, uri, MOOLA_OPTIONAL)
    problems = Problems(uri)
    n = table.num_rows
    if n == 0:
        problems.note("no windows in the file")
    ids = table.column("window_id").cast(pa.string()).to_pylist()
    schema.check_unique_ids(ids, problems)
    ohlc, shaped = _moola_ohlc(table.column("features"), problems)
    schema.check_prices(ohlc[shaped], problems, np.flatnonzero(shaped))
    codes = schema.label_codes(table.column("label").to_pylist(), problems)
    s_col, e_col = table.column("expansion_start"), table.column("expansion_end")
    s = schema.int_column(s_col.combine_chunks(), "expansion_start", problems)
    e = schema.int_column(e_col.combine_chunks(), "expansion_end", problems)
    schema.check_labels(codes, s, e, problems, np.asarray(s_col.is_null()), np.asarray(e_col.is_null()))
    t0 = None
    if "start_ts" in table.column_names:
        t0_us, t0_null = timestamp_column(table.column("start_ts"), "start_ts", problems)
        t0 = pa.array(t0_us.astype("datetime64[us]"), mask=t0_null).cast(schema.TIMESTAMP)
    problems.raise_if_any()
    base = table.column("base_window_id").cast(pa.string()).to_pylist() \
        if "base_window_id" in table.column_names else [None] * n
    groups = [b if b else OFFSET_SUFFIX.sub("", w) for b, w in zip(base, ids)]
    windows = schema.windows_table(ids, groups, t0=t0, ohlc=ohlc, label=codes,
                                   expansion_start=s, expansion_end=e)
    source = {"format": "moola", "file": uri, "rows": n}
    return Ingested(schema.WindowSet(windows, None, {}), source,
                    _ignored(table.column_names, MOOLA_COLUMNS, ("base_window_id", "start_ts")))


def _moola_ohlc(col: pa.ChunkedArray, problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """moola `features` (105 lists of [o,h,l,c], or 420 numbers) -> float64 [n,105,4] and a mask
    of rows with the right shape (the others are reported and left NaN)."""
    col = col.combine_chunks()
    n = len(col)
    out = np.full((n, WINDOW, 4), np.nan)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        problems.note(f"column features has type {col.type}; expected {WINDOW} [open, high, low, "
                      f"close] lists per row")
        return out, np.zeros(n, bool)
    null = np.asarray(col.is_null(), bool)
    lengths = np.asarray(pc.list_value_length(col).fill_null(0).to_numpy(), dtype=np.int64)
    problems.add_mask("missing features", null)
    inner = col.type.value_type
    nested = pa.types.is_list(inner) or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner)
    want = WINDOW if nested else WINDOW * 4
    wrong = ~null & (lengths != want)
    unit = "bars" if nested else "values"
    problems.add_mask(f"a window that is not {WINDOW} bars", wrong,
                      [f"{k} {unit}" + ("" if nested else f", expected {WINDOW}x4={WINDOW * 4}")
                       for k in lengths])
    shaped = ~null & ~wrong
    values = col.flatten()  # drops null rows; rows of wrong length are handled by `keep` below
    parent = np.asarray(pc.list_parent_indices(col).to_numpy(), dtype=np.int64)
    if nested:
        bar_len = np.asarray(pc.list_value_length(values).fill_null(0).to_numpy(), dtype=np.int64)
        bad_bar = np.zeros(n, bool)
        bad_bar[parent[bar_len != 4]] = True
        problems.add_mask("a bar that is not 4 numbers [open, high, low, close]", bad_bar & shaped)
        shaped &= ~bad_bar
        keep = shaped[parent]
        numbers = values.filter(pa.array(keep)).flatten()
    else:
        numbers = values.filter(pa.array(shaped[parent]))
    if not (pa.types.is_integer(numbers.type) or pa.types.is_floating(numbers.type)):
        problems.note(f"column features holds {numbers.type}, expected numbers")
        return out, np.zeros(n, bool)
    flat = np.asarray(numbers.cast(pa.float64()).fill_null(np.nan).to_numpy(), dtype=np.float64)
    out[shaped] = flat.reshape(-1, WINDOW, 4)
    return out, shaped
