"""`data validate` and `data inspect` over a shard set: every check, and per-split statistics.

Both stream the shards one row group at a time (bounded memory) and read features through the
same zero-copy view the loader uses. `validate_shard_set` collects every problem of every shard
before it reports, so one run lists all that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data import folds as folds_lib
from pipeline.data import splits as splits_lib
from pipeline.data.manifest import WINDOW, load_manifest, shard_uri, verify_shard
from pipeline.data.shards import binary_view, shard_schema
from pipeline.errors import UserError

MAX_LISTED = 10


@dataclass
class SplitStats:
    windows: int = 0
    labeled: int = 0
    classes: list[int] = field(default_factory=lambda: [0, 0])
    span_bars: int = 0
    lengths: list[np.ndarray] = field(default_factory=list)
    valid_bars: int = 0
    feature_sum: np.ndarray | None = None
    non_finite: int = 0

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        label, s, e = arrays["label"], arrays["expansion_start"], arrays["expansion_end"]
        labeled = label >= 0
        self.windows += len(label)
        self.labeled += int(labeled.sum())
        for c in (0, 1):
            self.classes[c] += int((label == c).sum())
        length = (e - s + 1)[labeled].astype(np.int64)
        self.span_bars += int(length.sum())
        self.lengths.append(length)
        self.valid_bars += int(arrays["valid"].sum())
        x = arrays["features"]
        finite = np.isfinite(x)
        self.non_finite += int(x.size - finite.sum())
        total = np.where(finite, x, 0).sum(axis=(0, 1), dtype=np.float64)
        self.feature_sum = total if self.feature_sum is None else self.feature_sum + total

    def summary(self) -> dict:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        n = max(self.windows, 1)
        return {
            "windows": self.windows, "labeled": self.labeled,
            "consolidation": self.classes[0], "retracement": self.classes[1],
            "in_span_fraction": self.span_bars / max(self.labeled * WINDOW, 1),
            "length_mean": float(lengths.mean()) if lengths.size else float("nan"),
            "length_median": float(np.median(lengths)) if lengths.size else float("nan"),
            "length_min": int(lengths.min()) if lengths.size else 0,
            "length_max": int(lengths.max()) if lengths.size else 0,
            "valid_fraction": self.valid_bars / (n * WINDOW),
            "feature_means": (self.feature_sum / (n * WINDOW)).tolist()
            if self.feature_sum is not None else [],
            "non_finite": self.non_finite,
        }


def read_row_group(pf: pq.ParquetFile, i: int, n_features: int, columns=None) -> dict:
    columns = columns or ["index", "features", "valid", "label", "expansion_start", "expansion_end"]
    table = pf.read_row_group(i, columns=columns)
    out = {}
    for name in columns:
        col = table.column(name)
        if name == "features":
            out[name] = binary_view(col, np.float32, (WINDOW, n_features))
        elif name == "valid":
            out[name] = binary_view(col, np.uint8, (WINDOW,))
        elif name == "ohlc":
            out[name] = binary_view(col, np.float32, (WINDOW, 4))
        elif pa.types.is_integer(col.type):
            out[name] = col.to_numpy()
        else:
            out[name] = col
    return out


def _open(uri: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(storage.open_input(uri))
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"{uri}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def split_stats(uri: str, manifest: dict) -> dict[str, dict]:
    """Per split: counts, class balance, in-span fraction, expansion lengths, feature means."""
    n_features = len(manifest["features"])
    stats: dict[str, SplitStats] = {}
    for shard in manifest["shards"]:
        pf = _open(shard_uri(uri, shard))
        for i in range(pf.num_row_groups):
            stats.setdefault(shard["split"], SplitStats()).add(read_row_group(pf, i, n_features))
    return {split: s.summary() for split, s in stats.items()}


def validate_shard_set(uri: str) -> tuple[dict, dict[str, dict], list[str]]:
    """(manifest, per-split stats, problems): every problem of every shard, not just the first."""
    manifest = load_manifest(uri, verify=False)  # structure only; sha256 per shard below
    problems: list[str] = []
    n_features = len(manifest["features"])
    expected_schema = shard_schema(manifest["features"])
    stats: dict[str, SplitStats] = {}
    ids, groups, t0s, split_col, starts, ohlcs, indices = [], [], [], [], [], [], []
    for shard in manifest["shards"]:
        s_uri = shard_uri(uri, shard)
        try:
            verify_shard(uri, shard)
            pf = _open(s_uri)
        except UserError as exc:
            problems.append(str(exc.message))
            continue
        problems += _schema_problems(s_uri, pf, expected_schema, shard)
        if any(p.startswith(s_uri) for p in problems):
            continue
        next_index = shard["first_index"]
        for i in range(pf.num_row_groups):
            arrays = read_row_group(pf, i, n_features, columns=[
                "index", "features", "valid", "label", "expansion_start", "expansion_end",
                "window_id", "group_id", "t0", "split", "bar_index", "ohlc"])
            problems += _row_problems(s_uri, i, arrays, shard["split"], next_index)
            next_index += len(arrays["index"])
            stats.setdefault(shard["split"], SplitStats()).add(arrays)
            ids.append(arrays["window_id"])
            groups.append(arrays["group_id"])
            t0s.append(arrays["t0"])
            split_col.append(arrays["split"])
            starts.append(arrays["bar_index"])
            ohlcs.append(arrays["ohlc"])
            indices.append(arrays["index"])
    summaries = {split: s.summary() for split, s in stats.items()}
    for split, summary in summaries.items():
        if summary["non_finite"]:
            problems.append(f"{uri}: split {split!r} has {summary['non_finite']} NaN/inf feature values")
    if ids and not problems:
        problems += _leakage_problems(uri, ids, groups, t0s, split_col, starts, ohlcs)
    if ids and not problems and folds_lib.FOLDS_KEY in manifest:
        problems += _fold_problems(uri, manifest, ids, groups, t0s, split_col, starts, ohlcs,
                                   indices)
    return manifest, summaries, problems


def _schema_problems(s_uri, pf, expected: pa.Schema, shard: dict) -> list[str]:
    found = pf.schema_arrow
    out = []
    for f in expected:
        if f.name not in found.names:
            out.append(f"{s_uri}: missing column {f.name}")
        elif not found.field(f.name).type.equals(f.type):
            out.append(f"{s_uri}: column {f.name} is {found.field(f.name).type}, expected {f.type}")
    meta = (found.metadata or {}).get(b"moola.shard")
    if meta is None:
        out.append(f"{s_uri}: no moola.shard schema metadata (dtype, shape, feature names)")
    elif pa.py_buffer(meta).to_pybytes() != expected.metadata[b"moola.shard"]:
        out.append(f"{s_uri}: moola.shard metadata does not match the manifest's features")
    if pf.metadata.num_rows != shard["rows"]:
        out.append(f"{s_uri}: {pf.metadata.num_rows} rows, the manifest says {shard['rows']}")
    rg_rows = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    if rg_rows != shard["row_group_rows"]:
        out.append(f"{s_uri}: row groups {rg_rows[:5]}... differ from the manifest")
    return out


def _rows(mask: np.ndarray, first: int) -> str:
    rows = (np.flatnonzero(mask) + first).tolist()
    more = f" ... and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    noun = "row" if len(rows) == 1 else "rows"
    return f"{len(rows)} {noun} (index {', '.join(map(str, rows[:MAX_LISTED]))}{more})"


def _row_problems(s_uri, rg, a, split, first_index) -> list[str]:
    out = []
    where = f"{s_uri} row group {rg}"
    expected_index = np.arange(first_index, first_index + len(a["index"]))
    if not np.array_equal(a["index"], expected_index):
        out.append(f"{where}: index column is not {first_index}..{expected_index[-1]}")
    if a["split"].to_pylist() != [split] * len(a["index"]):
        out.append(f"{where}: rows of another split in a {split!r} shard")
    label, s, e = a["label"], a["expansion_start"], a["expansion_end"]
    checks = {
        "label other than -1, 0, 1": ~np.isin(label, (-1, 0, 1)),
        "expansion_start > expansion_end or outside 0..104":
            (label >= 0) & ((s < 0) | (e > WINDOW - 1) | (s > e)),
        "unlabeled rows with an expansion": (label < 0) & ((s != -1) | (e != -1)),
        "valid mask bytes other than 0/1": (a["valid"] > 1).any(axis=1),
        "NaN/inf features": ~np.isfinite(a["features"]).all(axis=(1, 2)),
    }
    for what, mask in checks.items():
        if mask.any():
            out.append(f"{where}: {_rows(mask, first_index)} with {what}")
    return out


def _leakage_problems(uri, ids, groups, t0s, split_col, starts, ohlcs) -> list[str]:
    """Duplicate ids, and windows of two splits that share a group or a bar: by bar ordinal
    where every row has one, else by the rows' own bars (t0 minutes are not bars)."""
    window_id = pa.chunked_array(ids).to_numpy(zero_copy_only=False)
    unique, counts = np.unique(window_id.astype(str), return_counts=True)
    out = []
    if (counts > 1).any():
        out.append(f"{uri}: duplicate window_id {list(unique[counts > 1][:MAX_LISTED])}")
    t0 = pa.chunked_array(t0s)
    t0_us = None
    if t0.null_count == 0:
        t0_us = np.asarray(t0.cast(pa.int64()).to_numpy())
    bar_index = np.concatenate(starts)
    exact = bool((bar_index >= 0).all())
    leak = splits_lib.check_leakage(
        pa.chunked_array(split_col).to_numpy(zero_copy_only=False),
        pa.chunked_array(groups).fill_null("").to_numpy(zero_copy_only=False), t0=t0_us,
        bar_index=bar_index if exact else None, ohlc=None if exact else np.concatenate(ohlcs))
    if not leak.ok:
        out.append(f"{uri}: leakage between splits: {'; '.join(leak.examples)}")
    return out


def _fold_problems(uri, manifest, ids, groups, t0s, split_col, starts, ohlcs, indices) -> list[str]:
    """The fold layout recomputed from the rows (`folds.check_folds`): the rows of the splits
    the folds cover, put in the row space (split by split, index order), with their positions
    found as the folds found them (bar ordinals where every row has one, else t0 minutes)."""
    layout = manifest[folds_lib.FOLDS_KEY]
    split = pa.chunked_array(split_col).to_numpy(zero_copy_only=False).astype(str)
    index = np.concatenate(indices)
    row = np.concatenate([np.flatnonzero(split == s)[np.argsort(index[split == s], kind="stable")]
                          for s in layout["splits"]])
    bar_index = np.concatenate(starts)[row]
    t0 = pa.chunked_array(t0s).take(pa.array(row))
    t0_us = None if t0.null_count else np.asarray(t0.cast(pa.int64()).to_numpy())
    if layout["key"] == "bar_index":  # the key the folds were made by, if the rows allow it
        pos, key = splits_lib.positions(None, bar_index if (bar_index >= 0).all() else None)
    else:
        pos, key = splits_lib.positions(t0_us, None)
    ohlc = np.concatenate(ohlcs)[row] if key == "t0" else None
    return folds_lib.check_folds(
        layout, folds_lib.split_rows(manifest), pos, key,
        pa.chunked_array(groups).fill_null("").to_numpy(zero_copy_only=False)[row],
        pa.chunked_array(ids).to_numpy(zero_copy_only=False)[row], ohlc, where=uri)
