"""What `predict --in` names: a bar file (one or several instruments) or a shard set, checked.

A bar file is read and checked by ingest's reader (`pipeline.data.ingest.read_bars`): the same
columns, timestamp rules, price checks and row naming (`line 17 (data row 15)` in a CSV) as
`data ingest`, so a file that ingest refuses is refused here with the same words. A `symbol`
column splits the file into instruments; each instrument's rows are checked as a series of
their own (time order and duplicates within the instrument), with rows named as in the file.
A shard set (a directory with manifest.json) holds windows whose features training computed
already; predict uses them as they are.

Everything here runs before anything is written or any Ray is started.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import ingest, schema
from pipeline.data.manifest import MANIFEST_NAME, load_manifest, shard_uri
from pipeline.errors import UserError

SYMBOL = "symbol"
WINDOW = schema.WINDOW
# A bar spacing this far from the training data's (relative) is "another frequency".
FREQUENCY_TOLERANCE = 0.01


@dataclass
class Series:
    """One instrument's bars in time order; `rows` are the file's data rows (for messages)."""

    instrument: str
    timestamps: np.ndarray      # int64 microseconds, UTC
    ohlc: np.ndarray            # float64 [N, 4]
    rows: np.ndarray            # int64 [N] data row of each bar in the file


@dataclass
class BarInput:
    uri: str
    series: list[Series]
    line_of: object = None      # data row -> file line (CSV), None for Parquet
    notes: list[str] = field(default_factory=list)

    kind = "bars"


@dataclass
class ShardInput:
    uri: str
    manifest: dict
    files: list[str]            # shard URIs, every split, in manifest order
    instrument: str
    bar_times: np.ndarray | None  # the source bar series' timestamps, when still reachable
    notes: list[str] = field(default_factory=list)

    kind = "shards"

    @property
    def windows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])


def read_input(uri: str, feature_names: list[str]):
    """A BarInput or a ShardInput; shard features must be the run's (`feature_names`)."""
    if storage.exists(storage.join(uri, MANIFEST_NAME)) or storage.is_dir(uri):
        return read_shards(uri, feature_names)
    return read_bar_file(uri)


# --- bar files ---------------------------------------------------------------------------------

def read_bar_file(uri: str) -> BarInput:
    """The bars of `uri`, every problem of the file in one UserError (ingest's checks)."""
    if not storage.exists(uri):
        raise UserError(f"--in {uri}: not found; give a bar file (.csv or .parquet) or a shard "
                        f"set (a directory with {MANIFEST_NAME})")
    if SYMBOL not in _column_names(uri):
        ts, ohlc, _, notes = ingest.read_bars(uri)
        line_of = _lazy_lines(uri) if ingest.is_csv(uri) else None
        return BarInput(uri, [Series(_stem(uri), ts, ohlc, np.arange(len(ts)))], line_of, notes)
    return _read_instruments(uri)


def _column_names(uri: str) -> list[str]:
    """The header only (a bar file can be gigabytes; ingest reads it once, after this)."""
    if ingest.is_parquet(uri):
        return schema.read_parquet_schema(uri).names
    if not ingest.is_csv(uri):
        return []  # ingest names the accepted file types
    fs, path = storage.resolve(uri)
    with storage.user_errors(uri):
        with fs.open_input_stream(path, compression="detect") as f:
            head = f.read(65536)
    first = head.decode("utf-8-sig", "replace").splitlines()[:1]
    return next(csv.reader(first), []) if first else []


def _lazy_lines(uri: str):
    """data row -> file line, computed (one more read of the file) only if a message needs it."""
    cache = []

    def line_of(row: int) -> int:
        if not cache:
            cache.append(ingest.read_table_lines(uri)[1])
        return cache[0](row)
    return line_of


def _read_instruments(uri: str) -> BarInput:
    """A file with a `symbol` column: ingest's per-column checks on the whole file, then the
    time-order checks within each instrument (rows of several instruments may interleave)."""
    table, line_of = ingest.read_table_lines(uri)
    if "timestamp" not in table.column_names and line_of is None:  # ingest's pandas-index rule
        index = ingest.pandas_time_index(table.schema)
        if index:
            table = table.rename_columns(["timestamp" if n == index else n
                                          for n in table.column_names])
    schema.require_columns(table.column_names, ingest.BARS_COLUMNS + (SYMBOL,), uri,
                           ingest.BARS_OPTIONAL)
    problems = ingest.problems_for(uri, line_of)
    symbol = pc.utf8_trim_whitespace(table.column(SYMBOL).combine_chunks().cast(pa.string()))
    problems.add_mask("missing symbol", np.asarray(symbol.is_null(), bool) |
                      np.asarray(pc.equal(symbol, "").fill_null(False), bool))
    ts, null = ingest.timestamp_column(table.column("timestamp"), "timestamp", problems)
    columns = [ingest.number_column(table, c, problems) for c in schema.OHLC_COLUMNS]
    ohlc = np.stack([values for values, _ in columns], axis=1)
    readable = ~np.any([unreadable for _, unreadable in columns], axis=0)
    codes, names = _codes(symbol)
    series = []
    for code, name in enumerate(names):
        rows = np.flatnonzero(codes == code)
        if len(rows) < WINDOW:
            problems.note(f"instrument {name!r}: {len(rows)} bars, fewer than one {WINDOW}-bar "
                          f"window")
        schema.check_bar_times(ts[rows], null[rows], _RowsOf(problems, rows))
        series.append(Series(name, ts[rows], ohlc[rows], rows))
    schema.check_prices(ohlc[readable], problems, np.flatnonzero(readable))
    problems.raise_if_any()
    return BarInput(uri, series, line_of)


def _codes(symbol: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Per row the instrument's number, instruments in name order."""
    encoded = pc.dictionary_encode(symbol.fill_null(""))
    names = encoded.dictionary.to_pylist()
    order = np.argsort(names)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[np.asarray(encoded.indices)], sorted(names)


class _RowsOf:
    """A view of a Problems that names rows of a subset (one instrument) as rows of the file."""

    def __init__(self, problems, rows: np.ndarray):
        self.problems, self.rows = problems, rows

    def add(self, what: str, rows, details=None) -> None:
        self.problems.add(what, self.rows[np.asarray(rows, dtype=np.int64)], details)

    def add_mask(self, what: str, mask: np.ndarray, details=None) -> None:
        self.add(what, np.flatnonzero(mask), details)


def _stem(uri: str) -> str:
    name = storage.basename(uri)
    for suffix in (".csv.gz", ".csv", ".txt", ".parquet", ".parq", ".pq"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- frequency ---------------------------------------------------------------------------------

def check_frequency(bars: BarInput, trained_s: float | None, allow: bool, run: str) -> list[str]:
    """Refuse bars of another spacing than the training bars' unless `allow`; notes to show."""
    if trained_s is None:
        return ["the training bars' frequency is unknown (its shards are not reachable), so "
                "the input's frequency was not compared"]
    notes = []
    for s in bars.series:
        if len(s.timestamps) < 2:
            continue
        dt = np.diff(s.timestamps)
        spacing = float(np.median(dt)) / 1e6
        if abs(spacing - trained_s) <= FREQUENCY_TOLERANCE * trained_s:
            continue
        at = int(np.flatnonzero(dt == np.median(dt))[0]) if (dt == np.median(dt)).any() else 0
        where = _rows_text(bars, s, at)
        what = (f"{bars.uri}: bars{_of(s, bars)} are {seconds_text(spacing)} apart (the median "
                f"spacing; e.g. {where}) but run {run} was trained on {seconds_text(trained_s)} "
                f"bars")
        if not allow:
            raise UserError(what + "; features such as bars_since_SH_norm count bars, so their "
                            "meaning changes with the frequency: resample the bars, or pass "
                            "--allow-frequency-change to predict anyway")
        notes.append(what + " (--allow-frequency-change)")
    return notes


def _of(s: Series, bars: BarInput) -> str:
    return f" of {s.instrument!r}" if len(bars.series) > 1 else ""


def _rows_text(bars: BarInput, s: Series, i: int) -> str:
    a, b = int(s.rows[i]), int(s.rows[i + 1])
    if bars.line_of is not None:
        return f"line {bars.line_of(a)} to line {bars.line_of(b)}"
    return f"data row {a} to data row {b}"


def seconds_text(seconds: float) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


# --- shard sets --------------------------------------------------------------------------------

def read_shards(uri: str, feature_names: list[str]) -> ShardInput:
    manifest = load_manifest(uri, verify=True, flag="--in")
    if list(manifest["features"]) != list(feature_names):
        raise UserError(
            f"--in {storage.join(uri, MANIFEST_NAME)}: features {manifest.get('feature_set') or ''}"
            f" {manifest['features']} are not the features the run was trained on "
            f"({feature_names}); rebuild the shards with the run's --features, or give the bars")
    files = [shard_uri(uri, s) for s in manifest["shards"]]
    source = manifest.get("source") or {}
    instrument = _stem(source["bars"]) if source.get("bars") else storage.basename(uri)
    bar_times = _source_bar_times(source)
    notes = [] if bar_times is not None else [
        "the shard set's bar series is not reachable: only each window's first timestamp (t0) "
        "is known; the other timestamp columns are null"]
    return ShardInput(uri, manifest, files, instrument, bar_times, notes)


def _source_bar_times(source: dict) -> np.ndarray | None:
    """Timestamps of the bar series the shards were cut from (its bars.parquet), if reachable."""
    where = source.get("uri")
    if not where:
        return None
    bars_uri = storage.join(where, schema.BARS_FILE)
    try:
        if not storage.exists(bars_uri):
            return None
        col = schema.read_parquet(bars_uri, columns=["timestamp"]).column(0)
    except UserError:
        return None
    return np.asarray(col.cast(pa.int64()).to_numpy())
