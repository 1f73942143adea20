"""Features as the run was trained on them, and the chunks of windows both engines work on.

The run's manifest says which features (`feature_set`, checked against its `features` list and
the model's input width) and how they were computed: on the continuous bar series (bars,
synth: `bar_features` once per bar, state carried across windows, reset at session gaps by
`segment_starts`, warm-up bars not valid) or on each window alone (moola's inline windows:
`window_features`). Predict calls exactly those functions; nothing is specified here by hand.

A chunk is CHUNK_WINDOWS consecutive windows of one instrument together with the bars they
cover: the first window's 104 bars of context travel with it, so a window never straddles two
chunks, and each chunk is cut into windows (strided views, `windows_from_bars`) where the model
runs. The chunks are the same for the local engine and for every Ray actor, so both see the same
windows in the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib.stride_tricks import sliding_window_view

from pipeline import storage
from pipeline.data import features as feats
from pipeline.data.shard_dataset import segment_starts
from pipeline.errors import UserError

WINDOW = feats.WINDOW
CHUNK_WINDOWS = 1024  # at least; a chunk is never smaller than a model batch


@dataclass(frozen=True)
class FeatureSpec:
    feature_set: str
    names: tuple[str, ...]
    continuous: bool            # on the bar series (True) or on each window alone
    warmup_bars: int = feats.WARMUP_BARS

    def describe(self) -> dict:
        return {"feature_set": self.feature_set, "features": list(self.names),
                "computed_on": "continuous bar series" if self.continuous else "each window",
                "warmup_bars": self.warmup_bars,
                "session_gap_factor": _session_gap_factor()}


def _session_gap_factor() -> int:
    from pipeline.data.shard_dataset import SESSION_GAP_FACTOR
    return SESSION_GAP_FACTOR


def feature_spec(run) -> FeatureSpec:
    """The featurization of the run's training data, from its manifest (a TrainedRun)."""
    m = run.manifest
    if not m or not m.get("features"):
        raise UserError(f"{run.uri}: no training data manifest in the run (manifest.json), so "
                        f"the features it was trained on are unknown; predict needs a run "
                        f"trained by this pipeline")
    names = list(m["features"])
    feature_set = m.get("feature_set") or next(
        (k for k, v in feats.FEATURE_SETS.items() if v == names), None)
    if feats.FEATURE_SETS.get(feature_set) != names:
        raise UserError(f"{run.uri}: trained on features {names} (feature set "
                        f"{feature_set or 'unnamed'}), which this version does not compute (it "
                        f"knows {', '.join(feats.FEATURE_SETS)}); predict with the version that "
                        f"trained the run")
    if run.net.cfg.n_features != len(names):
        raise UserError(f"{run.uri}: the model takes {run.net.cfg.n_features} features but the "
                        f"manifest lists {len(names)}; the run directory is inconsistent")
    continuous = (m.get("source") or {}).get("format") != "moola"
    return FeatureSpec(feature_set, tuple(names), continuous)


def training_bar_seconds(run) -> float | None:
    """The training bars' spacing: the manifest's `bar_seconds` when it has one, else measured
    on the training shards (t0 over bar_index between windows); None when unknowable."""
    if run.manifest.get("bar_seconds"):
        return float(run.manifest["bar_seconds"])
    data = getattr(run.config, "data", None)
    try:
        parts = [pq.read_table(storage.open_input(storage.join(data, s["path"])),
                               columns=["t0", "bar_index"]) for s in run.manifest["shards"]]
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None
    table = pa.concat_tables(parts) if parts else None
    if table is None or table.num_rows < 2:
        return None
    t0 = table.column("t0")
    bar = np.asarray(table.column("bar_index").to_numpy())
    keep = np.asarray(t0.is_valid(), bool) & (bar >= 0)
    t_us = np.asarray(t0.cast(pa.int64()).fill_null(0).to_numpy())[keep]
    bar = bar[keep]
    order = np.argsort(bar, kind="stable")
    d_bar, d_t = np.diff(bar[order]), np.diff(t_us[order])
    ok = d_bar > 0
    if not ok.any():
        return None
    return float(np.median(d_t[ok] / d_bar[ok])) / 1e6


@dataclass
class Chunk:
    """Windows starting at first_bar + k * stride (k < n_windows) of one instrument, with the
    per-bar arrays of every bar they cover (bar 0 here is bar `first_bar` of the series)."""

    instrument: str
    chunk_id: int
    first_bar: int
    stride: int
    n_windows: int
    timestamps: np.ndarray          # int64 [bars]
    features: np.ndarray | None     # float32 [bars, 12]: continuous series
    valid: np.ndarray | None        # bool [bars]
    ohlc: np.ndarray | None         # float64 [bars, 4]: features per window (not continuous)

    def windows(self, spec: FeatureSpec):
        """(features [n,105,F] float32, valid [n,105] bool, bar timestamps [n,105] int64):
        strided views where the feature set allows it."""
        starts = np.arange(self.n_windows, dtype=np.int64) * self.stride
        times = sliding_window_view(self.timestamps, WINDOW)[:: self.stride][: self.n_windows]
        if self.features is not None:
            x, valid = feats.windows_from_bars(self.features, self.valid, starts, spec.feature_set)
            return x, valid, times
        ohlc = sliding_window_view(self.ohlc, WINDOW, axis=0).transpose(0, 2, 1)
        base, valid = feats.window_features(ohlc[:: self.stride][: self.n_windows])
        return feats.with_feature_set(base, spec.feature_set), valid, times

    def bar_index(self) -> np.ndarray:
        return self.first_bar + np.arange(self.n_windows, dtype=np.int64) * self.stride


def window_starts(n_bars: int, stride: int) -> np.ndarray:
    return np.arange(0, max(n_bars - WINDOW + 1, 0), stride, dtype=np.int64)


def series_chunks(series, spec: FeatureSpec, stride: int, first_id: int = 0,
                  chunk_windows: int = CHUNK_WINDOWS):
    """The chunks of one instrument's series (features computed once, on the whole series)."""
    ts = series.timestamps
    if spec.continuous:
        bar_feat, bar_valid = feats.bar_features(series.ohlc, segment_starts(ts))
    starts = window_starts(len(ts), stride)
    for k, lo in enumerate(range(0, len(starts), chunk_windows)):
        group = starts[lo:lo + chunk_windows]
        a, b = int(group[0]), int(group[-1]) + WINDOW
        yield Chunk(series.instrument, first_id + k, a, stride, len(group), ts[a:b],
                    bar_feat[a:b] if spec.continuous else None,
                    bar_valid[a:b] if spec.continuous else None,
                    None if spec.continuous else series.ohlc[a:b])


def n_chunks(n_bars: int, stride: int, chunk_windows: int = CHUNK_WINDOWS) -> int:
    return -(-len(window_starts(n_bars, stride)) // chunk_windows)


# --- a chunk as one Arrow row (the Ray engine's unit of work) ----------------------------------

CHUNK_SCHEMA = pa.schema([
    ("instrument", pa.string()), ("chunk_id", pa.int64()), ("first_bar", pa.int64()),
    ("stride", pa.int64()), ("n_windows", pa.int64()), ("bars", pa.int64()),
    ("timestamps", pa.large_binary()), ("features", pa.large_binary()),
    ("valid", pa.large_binary()), ("ohlc", pa.large_binary()),
])


def chunk_table(chunk: Chunk) -> pa.Table:
    def raw(a):
        return None if a is None else np.ascontiguousarray(a).tobytes()
    return pa.Table.from_pylist([{
        "instrument": chunk.instrument, "chunk_id": chunk.chunk_id, "first_bar": chunk.first_bar,
        "stride": chunk.stride, "n_windows": chunk.n_windows, "bars": len(chunk.timestamps),
        "timestamps": raw(chunk.timestamps), "features": raw(chunk.features),
        "valid": raw(None if chunk.valid is None else chunk.valid.astype(np.uint8)),
        "ohlc": raw(chunk.ohlc)}], schema=CHUNK_SCHEMA)


def chunks_of_table(table: pa.Table):
    """chunk_table rows back into Chunks (views over the Arrow buffers, no copy)."""
    for row in range(table.num_rows):
        get = {name: table.column(name)[row] for name in table.column_names}
        bars = get["bars"].as_py()

        def array(name, dtype, width=None):
            value = get[name]
            if not value.is_valid:
                return None
            a = np.frombuffer(value.as_buffer(), dtype=dtype)
            return a.reshape(bars, width) if width else a
        valid = array("valid", np.uint8)
        yield Chunk(get["instrument"].as_py(), get["chunk_id"].as_py(), get["first_bar"].as_py(),
                    get["stride"].as_py(), get["n_windows"].as_py(), array("timestamps", np.int64),
                    array("features", np.float32, len(feats.BASE_FEATURES)),
                    None if valid is None else valid.view(np.bool_), array("ohlc", np.float64, 4))
