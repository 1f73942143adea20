"""The canonical windows data set: schema, validation, reading and writing.

A data set directory (local path or s3://) holds `windows.parquet` (one row per 105-bar window)
and, when the windows were cut from a continuous bar series, `bars.parquet` beside it (see
docs/internals.md "Canonical windows"). `data synth` and `data ingest` write it; `data shard`
and `data validate` read it.

Validation collects every problem of a file before raising, so a user fixes a file in one pass:
`bars.csv: 4 invalid rows, nothing was written: 3 rows with high < low: rows 4, 17, 90; ...`.
Row numbers count data rows from 0 (a CSV header line is not a row). Nothing is dropped, clipped
or rewritten: a file with any problem is refused whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError

WINDOW = 105                      # bars per window
OHLC_COLUMNS = ("open", "high", "low", "close")
LABELS = ("consolidation", "retracement")   # label code = index
SCHEMA_VERSION = 1
WINDOWS_FILE = "windows.parquet"
BARS_FILE = "bars.parquet"
META_KEY = b"moola.windows"
MAX_ROWS_LISTED = 10              # rows named per problem before "... and N more"

TIMESTAMP = pa.timestamp("us", tz="UTC")

WINDOWS_SCHEMA = pa.schema([
    pa.field("window_id", pa.string(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("t0", TIMESTAMP),
    pa.field("bar_index", pa.int64()),
    pa.field("ohlc", pa.list_(pa.float64(), WINDOW * 4)),
    pa.field("label", pa.int8()),
    pa.field("expansion_start", pa.int16()),
    pa.field("expansion_end", pa.int16()),
])

BARS_SCHEMA = pa.schema([
    pa.field("timestamp", TIMESTAMP, nullable=False),
    *(pa.field(name, pa.float64(), nullable=False) for name in OHLC_COLUMNS),
])


# --- collecting problems ---------------------------------------------------------------------

@dataclass
class Problems:
    """All problems found in one file; `raise_if_any()` turns them into one UserError."""

    source: str
    found: dict[str, list[str]] = field(default_factory=dict)  # what -> row descriptions
    notes: list[str] = field(default_factory=list)              # file-level problems

    def note(self, message: str) -> None:
        self.notes.append(message)

    def add(self, what: str, rows, details=None) -> None:
        """Record that `rows` (0-based data rows) have problem `what`; `details` per row."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size == 0:
            return
        if details is None:
            described = [str(r) for r in rows]
        else:
            described = [f"{r} ({d})" for r, d in zip(rows, details)]
        self.found.setdefault(what, []).extend(described)

    def add_mask(self, what: str, mask: np.ndarray, details=None) -> None:
        rows = np.flatnonzero(mask)
        self.add(what, rows, None if details is None else [details[r] for r in rows])

    def __bool__(self) -> bool:
        return bool(self.found or self.notes)

    def message(self) -> str:
        parts = list(self.notes)
        n_rows = 0
        for what, rows in self.found.items():
            n_rows += len(rows)
            shown = ", ".join(rows[:MAX_ROWS_LISTED])
            more = f" ... and {len(rows) - MAX_ROWS_LISTED} more" if len(rows) > MAX_ROWS_LISTED else ""
            noun = "row" if len(rows) == 1 else "rows"
            parts.append(f"{len(rows)} {noun} with {what}: {noun} {shown}{more}")
        head = f"{self.source}: "
        if self.found:
            head += f"{len(parts)} problem{'s' if len(parts) > 1 else ''} (rows count from 0), nothing was written: "
        else:
            head += "nothing was written: "
        return head + "; ".join(parts)

    def raise_if_any(self) -> None:
        if self:
            raise UserError(self.message())


def require_columns(names, required, source: str, optional=()) -> None:
    """Refuse a file whose columns miss any of `required`, naming what is missing and found."""
    names = list(names)
    missing = [c for c in required if c not in names]
    if missing:
        extra = [c for c in names if c not in required and c not in optional]
        hint = f"; unexpected columns: {', '.join(extra)}" if extra else ""
        raise UserError(f"{source}: missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} (found: {', '.join(names) or 'none'}{hint}); "
                        f"expected columns {', '.join(required)}")


# --- checks shared by every input format -----------------------------------------------------

def _first_bars(mask: np.ndarray):
    """For a [rows, bars] mask: the rows with any True and, per row, its first bar."""
    rows = np.flatnonzero(mask.any(axis=1))
    return rows, [f"bar {b}" for b in mask[rows].argmax(axis=1)]


def check_prices(ohlc: np.ndarray, problems: Problems, rows: np.ndarray | None = None) -> None:
    """OHLC sanity for bars [N,4] or windows [n,105,4]: finite, positive, low <= open/close <= high.

    `rows` maps the first axis of `ohlc` to the file's row numbers (default 0..n-1)."""
    ohlc = np.asarray(ohlc, dtype=np.float64)
    rows_of = (lambda r: r) if rows is None else (lambda r: np.asarray(rows)[r])
    o, h, lo, c = (ohlc[..., i] for i in range(4))
    finite = np.isfinite(ohlc).all(axis=-1)
    with np.errstate(invalid="ignore"):
        checks = [
            ("NaN or inf price", ~finite),
            ("non-positive price", finite & (ohlc <= 0).any(axis=-1)),
            ("high < low", finite & (h < lo)),
            ("open or close outside [low, high]",
             finite & (h >= lo) & ((o < lo) | (o > h) | (c < lo) | (c > h))),
        ]
    for what, mask in checks:
        if mask.ndim == 1:
            problems.add(what, rows_of(np.flatnonzero(mask)))
        else:
            bad, details = _first_bars(mask)
            problems.add(what, rows_of(bad), details)


def label_codes(values: list, problems: Problems) -> np.ndarray:
    """Label strings -> int codes (0 consolidation, 1 retracement, -1 null, -2 unknown: reported)."""
    lookup = {name: code for code, name in enumerate(LABELS)}
    codes = np.full(len(values), -1, dtype=np.int64)
    bad_rows, bad_values = [], []
    for row, value in enumerate(values):
        if value is None:
            continue
        code = lookup.get(value if isinstance(value, str) else None)
        if code is None:
            bad_rows.append(row)
            bad_values.append(repr(value))
            codes[row] = -2
        else:
            codes[row] = code
    problems.add(f"unknown label (expected {' or '.join(LABELS)})", bad_rows, bad_values)
    return codes


def int_column(values, name: str, problems: Problems) -> np.ndarray:
    """A column of integers (nulls -> -1); non-integer values are reported, never rounded."""
    arr = pa.array(values) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    null = np.asarray(arr.is_null(), dtype=bool) if len(arr) else np.zeros(0, bool)
    if pa.types.is_integer(arr.type) or pa.types.is_null(arr.type):
        out = np.asarray(arr.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64) \
            if not pa.types.is_null(arr.type) else np.full(len(arr), -1, np.int64)
        return out
    if pa.types.is_floating(arr.type):
        raw = np.asarray(arr.fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~null & ~(np.isfinite(raw) & (raw == np.round(raw)))
        problems.add_mask(f"non-integer {name}", bad, [repr(v) for v in raw])
        return np.where(null | bad, -1, np.nan_to_num(raw)).astype(np.int64)
    problems.note(f"column {name} has type {arr.type}, expected integers")
    return np.full(len(arr), -1, np.int64)


def check_labels(codes: np.ndarray, start: np.ndarray, end: np.ndarray, problems: Problems,
                 start_null: np.ndarray, end_null: np.ndarray) -> None:
    """Expansion bounds: both set on labeled rows, none on unlabeled, 0 <= start <= end <= 104."""
    labeled = codes != -1                      # an unknown label is reported by label_codes
    problems.add_mask("a label but no expansion_start/expansion_end",
                      labeled & (start_null | end_null))
    problems.add_mask("expansion_start/expansion_end but no label",
                      ~labeled & ~(start_null & end_null))
    both = ~start_null & ~end_null
    out = both & ((start < 0) | (start > WINDOW - 1) | (end < 0) | (end > WINDOW - 1))
    details = [f"{s}..{e}" for s, e in zip(start, end)]
    problems.add_mask(f"expansion_start or expansion_end outside 0..{WINDOW - 1}", out, details)
    problems.add_mask("expansion_start > expansion_end", both & ~out & (start > end), details)


def check_unique_ids(ids: list, problems: Problems, name: str = "window_id") -> None:
    seen: dict[str, int] = {}
    rows, details = [], []
    for row, value in enumerate(ids):
        if value is None or value == "":
            rows.append(row)
            details.append(f"empty {name}")
        elif value in seen:
            rows.append(row)
            details.append(f"{value!r} also on row {seen[value]}")
        else:
            seen[value] = row
    problems.add(f"duplicate or empty {name}", rows, details)


def check_bar_times(ts_us: np.ndarray, null: np.ndarray, problems: Problems) -> None:
    """Bars must be in strictly increasing time order: no duplicates, nothing out of order."""
    problems.add_mask("missing timestamp", null)
    if len(ts_us) < 2:
        return
    prev, cur = ts_us[:-1], ts_us[1:]
    ok = ~null[:-1] & ~null[1:]
    dup = np.flatnonzero(ok & (cur == prev)) + 1
    back = np.flatnonzero(ok & (cur < prev)) + 1
    problems.add("a duplicate timestamp (same as the previous row)", dup)
    problems.add("a timestamp earlier than the previous row (bars out of time order)", back)


# --- the canonical tables --------------------------------------------------------------------

def windows_table(window_id, group_id, *, t0=None, bar_index=None, ohlc=None, label=None,
                  expansion_start=None, expansion_end=None) -> pa.Table:
    """Build a canonical windows table; `label` etc. use -1 for null, `ohlc` is float64 [n,105,4]."""
    n = len(window_id)

    def nullable_int(values, type_):
        if values is None:
            return pa.nulls(n, type_)
        values = np.asarray(values, dtype=np.int64)
        return pa.array(values, type=type_, mask=values < 0)

    if ohlc is None:
        ohlc_col = pa.nulls(n, WINDOWS_SCHEMA.field("ohlc").type)
    else:
        flat = pa.array(np.ascontiguousarray(ohlc, dtype=np.float64).reshape(-1))
        ohlc_col = pa.FixedSizeListArray.from_arrays(flat, WINDOW * 4)
    if t0 is None:
        t0_col = pa.nulls(n, TIMESTAMP)
    else:
        t0_col = pa.array(t0).cast(TIMESTAMP) if not isinstance(t0, (pa.Array, pa.ChunkedArray)) \
            else t0.cast(TIMESTAMP)
    return pa.table([
        pa.array(list(window_id), pa.string()), pa.array(list(group_id), pa.string()), t0_col,
        nullable_int(bar_index, pa.int64()), ohlc_col, nullable_int(label, pa.int8()),
        nullable_int(expansion_start, pa.int16()), nullable_int(expansion_end, pa.int16()),
    ], schema=WINDOWS_SCHEMA)


def bars_table(timestamp_us: np.ndarray, ohlc: np.ndarray) -> pa.Table:
    ohlc = np.asarray(ohlc, dtype=np.float64)
    cols = [pa.array(np.asarray(timestamp_us, dtype=np.int64).astype("datetime64[us]")).cast(TIMESTAMP)]
    cols += [pa.array(ohlc[:, i]) for i in range(4)]
    return pa.table(cols, schema=BARS_SCHEMA)


@dataclass
class WindowSet:
    """A canonical data set in memory: windows, the optional bar series and the metadata."""

    windows: pa.Table
    bars: pa.Table | None
    meta: dict

    def __len__(self) -> int:
        return self.windows.num_rows

    def column(self, name: str, fill: int = -1) -> np.ndarray:
        """An integer column as int64 numpy with nulls as `fill` (label, expansion_*, bar_index)."""
        col = self.windows.column(name)
        return np.asarray(col.fill_null(fill).to_numpy(), dtype=np.int64)

    def t0_us(self) -> np.ndarray | None:
        """t0 as int64 microseconds since the epoch, or None when no window has a t0."""
        col = self.windows.column("t0")
        if col.null_count == len(col):
            return None
        return np.asarray(col.cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy())

    def bar_index(self) -> np.ndarray | None:
        col = self.windows.column("bar_index")
        if self.bars is None or col.null_count == len(col):
            return None
        return self.column("bar_index")

    def bar_ohlc(self) -> np.ndarray:
        """The bar series as float64 [N,4] (open, high, low, close)."""
        return np.stack([self.bars.column(c).to_numpy() for c in OHLC_COLUMNS], axis=1)

    def ohlc(self) -> np.ndarray:
        """Every window's bars as float64 [n,105,4] (gathered from the bar series where needed)."""
        n = len(self)
        out = np.empty((n, WINDOW, 4), dtype=np.float64)
        starts = self.column("bar_index")
        from_bars = starts >= 0
        if from_bars.any():
            bars = self.bar_ohlc()
            idx = starts[from_bars, None] + np.arange(WINDOW)
            out[from_bars] = bars[idx]
        if (~from_bars).any():
            inline = self.windows.column("ohlc").combine_chunks()
            flat = inline.filter(pa.array(~from_bars)).flatten().to_numpy()
            out[~from_bars] = flat.reshape(-1, WINDOW, 4)
        return out


def validate(ws: WindowSet, source: str) -> None:
    """Every contract of a canonical data set, all problems at once (used on write and read)."""
    problems = Problems(source)
    t = ws.windows
    for f in WINDOWS_SCHEMA:
        if f.name not in t.column_names:
            problems.note(f"missing column {f.name}")
        elif not t.schema.field(f.name).type.equals(f.type):
            problems.note(f"column {f.name} has type {t.schema.field(f.name).type}, expected {f.type}")
    problems.raise_if_any()
    check_unique_ids(t.column("window_id").to_pylist(), problems)
    problems.add_mask("empty group_id", np.asarray(
        t.column("group_id").fill_null("").to_numpy(zero_copy_only=False) == "", dtype=bool))
    label = ws.column("label")
    start_col, end_col = t.column("expansion_start"), t.column("expansion_end")
    label_null = np.asarray(t.column("label").is_null(), dtype=bool)
    problems.add_mask("label other than 0 or 1", ~label_null & ((label < 0) | (label > 1)))
    label = np.where(label_null, -1, np.maximum(label, 0))
    check_labels(label, ws.column("expansion_start"), ws.column("expansion_end"), problems,
                 np.asarray(start_col.is_null()), np.asarray(end_col.is_null()))
    starts = ws.column("bar_index")
    problems.add_mask("negative bar_index", ~np.asarray(t.column("bar_index").is_null()) & (starts < 0))
    inline_null = np.asarray(t.column("ohlc").is_null())
    problems.add_mask("neither bar_index nor ohlc", (starts < 0) & inline_null)
    if ws.bars is not None:
        n_bars = ws.bars.num_rows
        problems.add_mask(f"bar_index outside 0..{n_bars - WINDOW} (bars.parquet has {n_bars} bars)",
                          (starts >= 0) & (starts > n_bars - WINDOW))
        bar_problems = Problems(f"{source} ({BARS_FILE})")
        ts = ws.bars.column("timestamp")
        check_bar_times(np.asarray(ts.cast(pa.int64()).fill_null(0).to_numpy()),
                        np.asarray(ts.is_null()), bar_problems)
        check_prices(ws.bar_ohlc(), bar_problems)
        bar_problems.raise_if_any()
    else:
        problems.add_mask("a bar_index but no bars.parquet", starts >= 0)
    problems.raise_if_any()
    if (~inline_null).any():
        inline_rows = np.flatnonzero(~inline_null)
        check_prices(ws.ohlc()[inline_rows], problems, inline_rows)
        problems.raise_if_any()


# --- files -----------------------------------------------------------------------------------

def _write_parquet(uri: str, table: pa.Table) -> None:
    with storage.staged_file(uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_dataset(out: str, ws: WindowSet, *, source: dict, seed: int | None = None) -> None:
    """Validate, then publish: bars.parquet first, windows.parquet last (the data set is
    complete once windows.parquet exists). Invalid input raises before anything is written."""
    validate(ws, "output")
    meta = {"version": SCHEMA_VERSION, "source": source, "seed": seed}
    windows = ws.windows.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    storage.check_bucket(out)
    windows_uri, bars_uri = storage.join(out, WINDOWS_FILE), storage.join(out, BARS_FILE)
    if storage.exists(windows_uri):  # replacing a data set: it is incomplete until the new
        storage.remove(windows_uri)  # windows.parquet lands, never old windows on new bars
    if ws.bars is not None:
        _write_parquet(bars_uri, ws.bars.cast(BARS_SCHEMA))
    elif storage.exists(bars_uri):  # a stale bar series from an older data set in the same place
        storage.remove(bars_uri)
    _write_parquet(windows_uri, windows)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file (all columns or `columns`); a missing or unreadable file is a UserError."""
    if not storage.exists(uri):
        raise UserError(f"{uri}: not found")
    try:
        with storage.user_errors(uri):
            return pq.read_table(storage.open_input(uri), columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise UserError(f"{uri}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def read_parquet_schema(uri: str) -> pa.Schema:
    if not storage.exists(uri):
        raise UserError(f"{uri}: not found")
    try:
        with storage.user_errors(uri):
            return pq.read_schema(storage.open_input(uri))
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise UserError(f"{uri}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def read_dataset(uri: str, check: bool = True) -> WindowSet:
    """Read a canonical data set directory (local or s3://); validated unless `check=False`."""
    windows_uri = storage.join(uri, WINDOWS_FILE)
    if not storage.exists(windows_uri):
        raise UserError(f"{uri}: no {WINDOWS_FILE} here; create a data set with "
                        f"`moola-pipeline data synth` or `data ingest`")
    windows = read_parquet(windows_uri)
    raw_meta = (windows.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw_meta) if raw_meta else {}
    bars = None
    bars_uri = storage.join(uri, BARS_FILE)
    if "bar_index" in windows.column_names and windows.column("bar_index").null_count < len(windows) \
            and storage.exists(bars_uri):
        bars = read_parquet(bars_uri)
    ws = WindowSet(windows, bars, meta)
    if check:
        validate(ws, windows_uri)
    return ws
