"""`data shard`: canonical windows -> features -> splits -> Parquet shards + manifest.

Features come from the continuous bar series when the windows were cut from one (one pass over
the bars, state carried across windows, sessions reset at gaps) and from each window on its own
otherwise. Windows are then processed in chunks of CHUNK_WINDOWS in their source order, so
memory holds the per-bar features plus one chunk, never all windows' features: 1.8M bars are
~90 MB of per-bar features whatever the stride.

With folds (`--folds K`, pipeline/data/folds.py) the windows are written in time order instead
(`splits.time_order`), so each fold group is one index range per split in the manifest, and
each fold's label counts are gathered as the rows stream.
"""

from __future__ import annotations

from typing import Callable

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data import features as feats
from pipeline.data import folds as folds_lib
from pipeline.data import schema, splits
from pipeline.data.manifest import SPLITS, WINDOW
from pipeline.data.shards import ROW_GROUP_ROWS, ROWS_PER_SHARD, write_shard_set
from pipeline.errors import UserError

CHUNK_WINDOWS = 8192
# A bar spacing this many times the median spacing is a session gap: the feature state restarts
# (a 60-minute break between 1-minute bars is one; a missing minute or two is not).
SESSION_GAP_FACTOR = 10

Progress = Callable[[str, int, int], None]  # (step, done, total)


def segment_starts(timestamps_us: np.ndarray) -> np.ndarray:
    """bool [N]: bars that follow a session gap (and bar 0)."""
    n = len(timestamps_us)
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = True
    if n > 2:
        dt = np.diff(timestamps_us)
        starts[1:] = dt > SESSION_GAP_FACTOR * max(np.median(dt), 1)
    return starts


def read_windows(in_uri: str) -> schema.WindowSet:
    """`schema.read_dataset`, without holding an all-null `ohlc` column in memory.

    Arrow materialises the 420 child values of every null fixed_size_list row: windows cut
    from a bar series (ohlc null, bars in bars.parquet) would cost 3.4 kB each, 6 GB for 1.8M
    windows. When every window has a bar_index the column is not read; the validator gets an
    all-null stand-in whose child values sit in untouched calloc pages (np.zeros), which the OS
    maps only when read, and nothing reads them. Small inline data sets are read whole.
    """
    windows_uri = storage.join(in_uri, schema.WINDOWS_FILE)
    bars_uri = storage.join(in_uri, schema.BARS_FILE)
    if not storage.exists(windows_uri):
        return schema.read_dataset(in_uri)  # its error: no windows.parquet here
    try:
        with storage.user_errors(windows_uri):
            pf = pq.ParquetFile(storage.open_input(windows_uri))
            names = pf.schema_arrow.names
            if "bar_index" not in names or "ohlc" not in names or not storage.exists(bars_uri) \
                    or pf.read(columns=["bar_index"]).column(0).null_count:
                return schema.read_dataset(in_uri)
            table = pf.read(columns=[c for c in names if c != "ohlc"])
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise UserError(f"{windows_uri}: not a readable Parquet file "
                        f"({str(exc).splitlines()[0]})") from None
    n = table.num_rows
    lazy_values = pa.array(np.zeros(n * WINDOW * 4))  # zero-copy over untouched calloc pages
    null_ohlc = pa.FixedSizeListArray.from_arrays(lazy_values, WINDOW * 4,
                                                  mask=pa.array(np.ones(n, bool)))
    position = schema.WINDOWS_SCHEMA.get_field_index("ohlc")
    table = table.add_column(position, schema.WINDOWS_SCHEMA.field("ohlc"), null_ohlc)
    raw_meta = (pf.schema_arrow.metadata or {}).get(schema.META_KEY)
    ws = schema.WindowSet(table, schema.read_parquet(bars_uri),
                          json.loads(raw_meta) if raw_meta else {})
    schema.validate(ws, windows_uri)
    return ws


def shard_dataset(in_uri: str, out_uri: str, *, feature_set: str = "relativity12",
                  split_policy: str = "auto", val_fraction: float = 0.2,
                  test_fraction: float = 0.0, seed: int = 0,
                  rows_per_shard: int = ROWS_PER_SHARD, row_group_rows: int = ROW_GROUP_ROWS,
                  folds: folds_lib.FoldSpec | None = None,
                  progress: Progress | None = None) -> dict:
    """Read the canonical windows at `in_uri`, write shards and manifest to `out_uri`; with
    `folds`, the fold layout over the non-test windows goes into the manifest too."""
    progress = progress or (lambda step, done, total: None)
    names = feats.feature_names(feature_set)
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard {rows_per_shard}: must be at least 1")
    if storage.is_s3(out_uri):
        storage.check_bucket(out_uri)  # fail before the long work, not after it
    ws = read_windows(in_uri)
    n = len(ws)
    if n == 0:
        raise UserError(f"{storage.join(in_uri, schema.WINDOWS_FILE)}: no windows to shard")

    t0 = ws.t0_us()
    group_id = np.asarray(ws.windows.column("group_id").fill_null("").to_numpy(zero_copy_only=False),
                          dtype=object)
    bar_index = ws.bar_index()
    # Without bar ordinals a time split by t0 compares the windows' bars (inline data: in
    # memory already) to find windows that overlap across a halt, a weekend or another frequency.
    ohlc = ws.ohlc() if bar_index is None and t0 is not None else None
    split, report = splits.assign_splits(t0, group_id, split_policy, val_fraction, test_fraction,
                                         seed=seed, bar_index=bar_index, ohlc=ohlc)
    leak = splits.check_leakage(split, group_id, bar_index=bar_index, t0=t0, ohlc=ohlc)
    if not leak.ok:  # e.g. a group_id whose windows lie far apart in time, under --split time
        raise UserError(f"{in_uri}: the {report.policy} split would leak between splits "
                        f"({'; '.join(leak.examples)}); try --split group", hint=None)

    bar_state = None
    if bar_index is not None:
        progress("features (bars)", 0, ws.bars.num_rows)
        ts = np.asarray(ws.bars.column("timestamp").cast(pa.int64()).to_numpy())
        bar_ohlc = ws.bar_ohlc()
        bar_feat, bar_valid = feats.bar_features(bar_ohlc, segment_starts(ts))
        bar_state = (bar_ohlc, bar_feat, bar_valid)
        progress("features (bars)", ws.bars.num_rows, ws.bars.num_rows)

    source = {"uri": in_uri, **(ws.meta.get("source") or {})}  # where the windows came from
    extra = {"feature_set": feature_set, "split_policy": report.to_dict(), "source": source,
             "seed": ws.meta.get("seed"), "leakage": leak.to_dict(),
             "excluded": {"embargo": report.embargoed}, "split_summary": report.summary()}
    order, counter = np.arange(n), None
    if folds is not None:
        order, layout, counter = _fold_layout(folds, ws, split, t0, bar_index, group_id, ohlc)
        extra[folds_lib.FOLDS_KEY] = layout
    chunks = _chunks(ws, split, names, feature_set, bar_state, progress, order, counter)
    if counter is not None:
        # write_shard_set builds the manifest after the last chunk: the counts land in it
        chunks = _then(chunks, lambda: counter.write(extra[folds_lib.FOLDS_KEY]))
    return write_shard_set(out_uri, names, chunks, extra=extra, rows_per_shard=rows_per_shard,
                           row_group_rows=row_group_rows)


def _then(chunks, done: Callable[[], None]):
    yield from chunks
    done()


def _fold_layout(spec: folds_lib.FoldSpec, ws: schema.WindowSet, split: np.ndarray, t0,
                 bar_index, group_id: np.ndarray, ohlc):
    """(write order, manifest fold layout, label counter) for folds over the non-test windows.

    The rows are written in time order, so a split's index follows time and the fold windows'
    row space (the fold splits' rows, index order) is `order` restricted to each split in turn.
    """
    pos, key = splits.positions(t0, bar_index)
    if pos is None:
        raise UserError("--folds needs a position for every window (t0 or bar_index) to cut "
                        "them into groups in time; this data set has windows without one")
    window_id = np.asarray(ws.windows.column("window_id").to_numpy(zero_copy_only=False),
                           dtype=object)
    order = splits.time_order(pos, group_id, window_id)
    fold_splits = [s for s in ("train", "val") if (split == s).any()]
    members = np.concatenate([order[split[order] == s] for s in fold_splits])
    rows = [(s, int((split == s).sum())) for s in fold_splits]
    fold_ohlc = None
    if key == "t0":  # as the shards store them: `data validate` recomputes from those bytes
        fold_ohlc = (ohlc if ohlc is not None else ws.ohlc())[members].astype(np.float32)
    plan = folds_lib.plan_folds(spec, pos[members], group_id[members], window_id[members], key,
                                fold_ohlc)
    return order, folds_lib.build_layout(plan, rows), folds_lib.FoldLabelCounter(plan, rows)


def _chunks(ws: schema.WindowSet, split: np.ndarray, names: list[str], feature_set: str,
            bar_state, progress: Progress, order: np.ndarray,
            fold_counter: folds_lib.FoldLabelCounter | None = None):
    """(split, columns) per chunk of windows taken in `order` (source rows: source order, or
    time order with folds), with each split's running index."""
    n = len(ws)
    t = ws.windows
    label = ws.column("label")
    exp_start, exp_end = ws.column("expansion_start"), ws.column("expansion_end")
    starts = ws.column("bar_index")
    t0_col = t.column("t0")
    next_index = {s: 0 for s in SPLITS}
    for lo in range(0, n, CHUNK_WINDOWS):
        chunk = order[lo:lo + CHUNK_WINDOWS]
        ohlc, features, valid = _chunk_features(ws, chunk, starts, feature_set, bar_state)
        for name in SPLITS:
            rows = np.flatnonzero(split[chunk] == name)
            if rows.size == 0:
                continue
            source = chunk[rows]
            take = pa.array(source)
            columns = dict(
                window_id=t.column("window_id").take(take),
                group_id=t.column("group_id").take(take),
                t0=t0_col.take(take), bar_index=starts[source],
                index=np.arange(next_index[name], next_index[name] + rows.size),
                features=features[rows], valid=valid[rows], ohlc=ohlc[rows].astype(np.float32),
                label=label[source], expansion_start=exp_start[source],
                expansion_end=exp_end[source],
            )
            if fold_counter is not None:
                fold_counter.add(name, columns["index"], columns)
            yield name, columns
            next_index[name] += rows.size
        progress("shards", lo + len(chunk), n)


def _chunk_features(ws, rows, starts, feature_set, bar_state):
    """OHLC float64 [c,105,4], features float32 [c,105,F], valid [c,105] of the source rows."""
    chunk_starts = starts[rows]
    c = len(rows)
    from_bars = chunk_starts >= 0 if bar_state is not None else np.zeros(c, bool)
    ohlc = np.empty((c, WINDOW, 4), np.float64)
    n_f = len(feats.feature_names(feature_set))
    features = np.empty((c, WINDOW, n_f), np.float32)
    valid = np.empty((c, WINDOW), bool)
    if from_bars.any():
        bar_ohlc, bar_feat, bar_valid = bar_state
        s = chunk_starts[from_bars]
        ohlc[from_bars] = bar_ohlc[s[:, None] + np.arange(WINDOW)]
        features[from_bars], valid[from_bars] = feats.windows_from_bars(bar_feat, bar_valid, s,
                                                                        feature_set)
    inline = ~from_bars
    if inline.any():
        col = ws.windows.column("ohlc").take(pa.array(rows[inline])).combine_chunks()
        ohlc[inline] = col.flatten().to_numpy().reshape(-1, WINDOW, 4)
        base, valid[inline] = feats.window_features(ohlc[inline])
        features[inline] = feats.with_feature_set(base, feature_set)
    return ohlc, features, valid
