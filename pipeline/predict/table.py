"""The prediction tables: one row per window, and one row per bar combining overlapping windows.

Windows (`windows/*.parquet`), for the model's tasks:
  instrument, window_id, split, index (shard input), bar_index (first bar in the instrument's
  series), first_ts, last_ts;
  type_prob [C], type_pred; pointer_center_bars, pointer_length_bars (bars within the window),
  pointer_center_ts, pointer_start_ts, pointer_end_ts (the bars they point at, rounded);
  span_prob [105], countdown_bars [105], valid [105] (false on warm-up bars);
  expansions: list of {start_bar, end_bar, start_ts, end_ts}, the contiguous runs of valid bars
  with span_prob above the run's val-chosen threshold (`pipeline.evaluate.windows.decode_runs`'
  definition, computed for all windows at once);
  with MC dropout, `<output>_std` beside each output (the mean is the output itself).
Bars (`bars/*.parquet`): instrument, bar_index, timestamp, windows (how many windows cover the
  bar), span_prob and countdown_bars (means over those windows), in_expansion (mean > threshold).

Timestamps are UTC microseconds; a shard set whose bar series is no longer reachable knows only
each window's first timestamp (t0), and the other timestamp columns are null.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

WINDOW = 105
TS = pa.timestamp("us", tz="UTC")
EXPANSION = pa.struct([("start_bar", pa.int16()), ("end_bar", pa.int16()),
                       ("start_ts", TS), ("end_ts", TS)])


def window_schema(tasks, num_classes: int, mc: bool) -> pa.Schema:
    fields = [("instrument", pa.string()), ("window_id", pa.string()), ("split", pa.string()),
              ("index", pa.int64()), ("bar_index", pa.int64()), ("first_ts", TS),
              ("last_ts", TS)]
    per_task = {
        "type": [("type_prob", pa.list_(pa.float32(), num_classes)), ("type_pred", pa.int8())],
        "pointer": [("pointer_center_bars", pa.float32()), ("pointer_length_bars", pa.float32()),
                    ("pointer_center_ts", TS), ("pointer_start_ts", TS), ("pointer_end_ts", TS)],
        "span": [("span_prob", pa.list_(pa.float32(), WINDOW))],
        "countdown": [("countdown_bars", pa.list_(pa.float32(), WINDOW))],
    }
    for task in ("type", "pointer", "span", "countdown"):
        if task in tasks:
            fields += per_task[task]
    fields.append(("valid", pa.list_(pa.bool_(), WINDOW)))
    if "span" in tasks:
        fields.append(("expansions", pa.list_(EXPANSION)))
    if mc:
        fields += [(f"{name}_std", type_) for name, type_ in list(fields)
                   if name in ("type_prob", "pointer_center_bars", "pointer_length_bars",
                               "span_prob", "countdown_bars")]
    return pa.schema(fields)


def parquet_options(schema: pa.Schema) -> dict:
    """Writer options for these tables: no dictionary attempt on floats (it is 4x the cost of
    the write and then falls back), statistics only where a reader filters (ids, times), and
    byte-stream-split floats (probabilities compress to about half with it)."""
    def is_list(t):
        return pa.types.is_fixed_size_list(t) or pa.types.is_list(t)
    floats = {}
    for f in schema:
        if pa.types.is_floating(f.type):
            floats[f.name] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type):
            floats[f"{f.name}.list.element"] = "BYTE_STREAM_SPLIT"
    return {"use_dictionary": [n for n in ("instrument", "split") if n in schema.names],
            "write_statistics": [f.name for f in schema if not is_list(f.type)
                                 and (pa.types.is_timestamp(f.type) or f.name in ("bar_index", "index"))],
            "column_encoding": floats}


def window_table(schema: pa.Schema, ident: dict, outputs: dict[str, np.ndarray],
                 valid: np.ndarray, bar_ts: np.ndarray | None, threshold: float) -> pa.Table:
    """One row per window. `ident`: instrument, window_id, split, index, bar_index (arrays or
    Arrow arrays) and `t0` (int64 us, used when `bar_ts` [n,105] is None)."""
    n = len(ident["bar_index"])
    rows = np.arange(n)

    def at(pos):  # timestamps of bar `pos` (int [n]) of each window, or nulls
        return _ts(None if bar_ts is None else bar_ts[rows, pos], n)

    cols = {"instrument": ident["instrument"], "window_id": ident["window_id"],
            "split": ident.get("split", pa.nulls(n, pa.string())),
            "index": ident.get("index", pa.nulls(n, pa.int64())),
            "bar_index": pa.array(np.asarray(ident["bar_index"], np.int64)),
            "first_ts": _ts(ident.get("t0") if bar_ts is None else bar_ts[:, 0], n),
            "last_ts": at(np.full(n, WINDOW - 1))}
    if "type_prob" in outputs:
        cols["type_prob"] = _fixed(outputs["type_prob"])
        cols["type_pred"] = pa.array(outputs["type_prob"].argmax(axis=1).astype(np.int8))
    if "pointer_center_bars" in outputs:
        center, length = outputs["pointer_center_bars"], outputs["pointer_length_bars"]
        cols["pointer_center_bars"], cols["pointer_length_bars"] = pa.array(center), pa.array(length)
        for name, pos in (("center", center), ("start", center - length / 2),
                          ("end", center + length / 2)):
            cols[f"pointer_{name}_ts"] = at(_bar(pos))
    for name in ("span_prob", "countdown_bars"):
        if name in outputs:
            cols[name] = _fixed(outputs[name])
    cols["valid"] = _fixed(np.ascontiguousarray(valid, bool))
    if "span_prob" in outputs:
        cols["expansions"] = _expansions(outputs["span_prob"], valid, threshold, bar_ts)
    for name in list(outputs):
        if name.endswith("_std"):
            cols[name] = _fixed(outputs[name]) if outputs[name].ndim == 2 else pa.array(outputs[name])
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def decode_batch(prob: np.ndarray, valid: np.ndarray, threshold: float):
    """`decode_runs` for every window at once: (runs per window [n], first bar, last bar) of
    each run, runs in window then bar order."""
    on = np.zeros((prob.shape[0], prob.shape[1] + 2), bool)
    on[:, 1:-1] = (prob > threshold) & valid
    rows, cols = np.nonzero(on[:, 1:] != on[:, :-1])  # row-major: start, end, start, end, ...
    counts = np.bincount(rows[0::2], minlength=prob.shape[0])
    return counts, cols[0::2], cols[1::2] - 1


def _expansions(prob, valid, threshold, bar_ts) -> pa.Array:
    counts, first, last = decode_batch(prob, valid, threshold)
    owner = np.repeat(np.arange(len(counts)), counts)
    times = [_ts(None if bar_ts is None else bar_ts[owner, c], len(c)) for c in (first, last)]
    runs = pa.StructArray.from_arrays(
        [pa.array(first.astype(np.int16)), pa.array(last.astype(np.int16)), *times],
        fields=list(EXPANSION))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), runs, type=pa.list_(EXPANSION))


def _bar(position: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(position), 0, WINDOW - 1).astype(np.int64)


def _fixed(a: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1)),
                                             a.shape[1])


def _ts(us, n: int) -> pa.Array:
    if us is None:
        return pa.nulls(n, TS)
    if isinstance(us, (pa.Array, pa.ChunkedArray)):
        return us.cast(TS)
    return pa.array(np.asarray(us, np.int64)).view(TS)


def fixed_column(table: pa.Table, name: str, width: int) -> np.ndarray:
    """A fixed-size list column as numpy [rows, width]."""
    col = table.column(name).combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(-1, width)


BAR_SCHEMA = pa.schema([("instrument", pa.string()), ("bar_index", pa.int64()),
                        ("timestamp", TS), ("windows", pa.int32()), ("span_prob", pa.float32()),
                        ("countdown_bars", pa.float32()), ("in_expansion", pa.bool_())])


class BarCombiner:
    """Per-bar means over the windows that cover each bar, fed window tables in any order."""

    def __init__(self, lengths: dict[str, int], times: dict[str, np.ndarray | None],
                 threshold: float):
        self.times, self.threshold = times, threshold
        self.acc = {k: np.zeros((3, n)) for k, n in lengths.items()}  # count, span, countdown

    def add(self, table: pa.Table) -> None:
        names = table.column_names
        span = fixed_column(table, "span_prob", WINDOW) if "span_prob" in names else None
        cd = fixed_column(table, "countdown_bars", WINDOW) if "countdown_bars" in names else None
        instrument = table.column("instrument").combine_chunks()
        bar_index = np.asarray(table.column("bar_index").to_numpy())
        for name in pc.unique(instrument).to_pylist():
            rows = np.flatnonzero(np.asarray(pc.equal(instrument, name), bool))
            lo = int(bar_index[rows].min())
            idx = (bar_index[rows, None] - lo + np.arange(WINDOW)).ravel()
            size = int(idx.max()) + 1
            acc = self.acc[name][:, lo:lo + size]
            acc[0] += np.bincount(idx, minlength=size)
            for k, values in ((1, span), (2, cd)):
                if values is not None:
                    acc[k] += np.bincount(idx, weights=values[rows].ravel(), minlength=size)

    def table(self) -> pa.Table:
        parts = []
        for name, (count, span, cd) in self.acc.items():
            bars = np.flatnonzero(count > 0)
            n = count[bars]
            times = self.times.get(name)
            mean_span = (span[bars] / n).astype(np.float32)
            parts.append(pa.table({
                "instrument": pa.array([name] * len(bars), pa.string()),
                "bar_index": pa.array(bars.astype(np.int64)),
                "timestamp": _ts(None if times is None else times[bars], len(bars)),
                "windows": pa.array(n.astype(np.int32)),
                "span_prob": pa.array(mean_span),
                "countdown_bars": pa.array((cd[bars] / n).astype(np.float32)),
                "in_expansion": pa.array(mean_span > self.threshold)}, schema=BAR_SCHEMA))
        return pa.concat_tables(parts) if parts else BAR_SCHEMA.empty_table()
