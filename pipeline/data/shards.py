"""Shard writer: per-split Parquet files whose row groups turn into [rows, 105, F] float32 arrays.

Layout (docs/internals.md, "Shards"): `features` is a fixed_size_binary(105*F*4) column holding
little-endian float32 [105, F] row-major. Reading it back is one `np.frombuffer` over the column's
data buffer: no per-value decoding (measured ~4x faster than a fixed_size_list<float32>). The big
binary columns are stored uncompressed and without dictionary or statistics (random floats do
not compress, and decoding is the hot path); the small columns use zstd.

Publishing: every shard is written under a temporary name and renamed (local) or uploaded (S3)
only once complete, and `manifest.json` is written after all shards, so a crash or a full disk
never leaves a manifest that points at a half-written shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.manifest import MANIFEST_NAME, SCHEMA_VERSION, WINDOW

ROW_GROUP_ROWS = 4096  # ~20 MB of F=12 features: big enough to read fast, small enough to stream
ROWS_PER_SHARD = 65536
SHARD_NAME = re.compile(r"^(train|val|test)-\d{5}\.parquet$")
BIG_COLUMNS = ("features", "valid", "ohlc")
SMALL_COLUMNS = ("window_id", "group_id", "t0", "bar_index", "split", "index", "label",
                 "expansion_start", "expansion_end")


def shard_schema(feature_names: list[str]) -> pa.Schema:
    n_features = len(feature_names)
    fields = [
        pa.field("window_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string()),
        pa.field("t0", pa.timestamp("us", tz="UTC")),
        # first bar in the source's bar series (-1: none): exact positions for `data validate`
        pa.field("bar_index", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("features", pa.binary(WINDOW * n_features * 4), nullable=False),
        pa.field("valid", pa.binary(WINDOW), nullable=False),
        pa.field("ohlc", pa.binary(WINDOW * 4 * 4), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("expansion_start", pa.int16(), nullable=False),
        pa.field("expansion_end", pa.int16(), nullable=False),
    ]
    meta = {"schema_version": SCHEMA_VERSION, "window": WINDOW, "features": list(feature_names),
            "dtype": "float32", "layout": "[105,F] row-major in fixed_size_binary",
            "valid": "uint8 [105]", "ohlc": "float32 [105,4] (open, high, low, close)"}
    return pa.schema(fields, metadata={"moola.shard": json.dumps(meta)})


def fixed_binary(array: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[n, ...] numpy array -> fixed_size_binary array over the same bytes (no copy)."""
    array = np.ascontiguousarray(array)
    n = array.shape[0]
    width = array.nbytes // n if n else int(np.prod(array.shape[1:])) * array.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(array)])


def rows_table(schema: pa.Schema, split: str, *, window_id, group_id, t0, index, features,
               valid, ohlc, label, expansion_start, expansion_end, bar_index=None) -> pa.Table:
    """One chunk of shard rows from numpy / arrow columns (features float32 [n,105,F])."""
    n = len(index)
    bar_index = np.full(n, -1, np.int64) if bar_index is None else np.asarray(bar_index, np.int64)
    columns = {
        "window_id": pa.array(window_id, pa.string()),
        "group_id": pa.array(group_id, pa.string()),
        "t0": pa.array(t0, pa.timestamp("us", tz="UTC")) if t0 is not None else pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "bar_index": pa.array(bar_index),
        "split": pa.array(np.full(n, split, dtype=object), pa.string()),
        "index": pa.array(np.asarray(index, np.int64)),
        "features": fixed_binary(np.asarray(features, "<f4")),
        "valid": fixed_binary(np.asarray(valid, np.uint8)),
        "ohlc": fixed_binary(np.asarray(ohlc, "<f4")),
        "label": pa.array(np.asarray(label, np.int8)),
        "expansion_start": pa.array(np.asarray(expansion_start, np.int16)),
        "expansion_end": pa.array(np.asarray(expansion_end, np.int16)),
    }
    return pa.Table.from_pydict(columns, schema=schema)


def binary_view(column, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed_size_binary column as a numpy [rows, *shape] array over its data buffer (no copy
    unless the column arrived in several chunks)."""
    chunk = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = chunk.type.byte_width
    data = chunk.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=len(chunk) * width, offset=chunk.offset * width)
    return flat.view(dtype).reshape((len(chunk), *shape))


class SplitWriter:
    """Writes one split's rows, in index order, into rolling shard files of full row groups."""

    def __init__(self, out_uri: str, split: str, schema: pa.Schema,
                 rows_per_shard: int = ROWS_PER_SHARD, row_group_rows: int = ROW_GROUP_ROWS):
        self.out_uri, self.split, self.schema = out_uri, split, schema
        self.rows_per_shard = max(1, rows_per_shard)
        self.row_group_rows = max(1, min(row_group_rows, self.rows_per_shard))
        self.shards: list[dict] = []  # manifest entries of published shards
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._stage: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp = ""
        self._rows_in_shard = 0
        self._row_groups: list[int] = []

    def append(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush_row_group()

    def close(self) -> list[dict]:
        while self._pending_rows:
            self._flush_row_group()
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file), publishing nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._stage is not None:
            self._stage.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._stage = None

    def _flush_row_group(self) -> None:
        if self._writer is None:
            self._open_shard()
        space = self.rows_per_shard - self._rows_in_shard
        take = min(self.row_group_rows, space, self._pending_rows)
        pending = pa.concat_tables(self._pending)
        self._writer.write_table(pending.slice(0, take), row_group_size=take)
        rest = pending.slice(take)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._rows_in_shard += take
        self._row_groups.append(take)
        if self._rows_in_shard >= self.rows_per_shard:
            self._close_shard()

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        self._uri = storage.join(self.out_uri, name)
        self._name = name
        self._stage = contextlib.ExitStack()
        self._tmp = self._stage.enter_context(storage.staged_file(self._uri))
        self._writer = pq.ParquetWriter(
            self._tmp, self.schema,
            compression={c: ("none" if c in BIG_COLUMNS else "zstd") for c in self.schema.names},
            use_dictionary=["split", "group_id"],
            write_statistics=["index", "label", "expansion_start", "expansion_end", "t0"],
        )
        self._rows_in_shard, self._row_groups = 0, []

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        digest, size = _sha256_and_size(self._tmp)
        first_index = sum(s["rows"] for s in self.shards)
        self._stage.close()  # publish: rename or upload, now that the file is complete
        self._stage = None
        self.shards.append({
            "path": self._name, "split": self.split, "rows": self._rows_in_shard,
            "bytes": size, "sha256": digest, "row_groups": len(self._row_groups),
            "row_group_rows": list(self._row_groups), "first_index": first_index,
        })


def _sha256_and_size(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def prepare_output(out_uri: str) -> None:
    """Withdraw an old manifest first: from here until the new one lands the set is incomplete."""
    if storage.is_s3(out_uri):
        storage.check_bucket(out_uri)
    old = storage.join(out_uri, MANIFEST_NAME)
    if storage.exists(old):
        storage.remove(old)
    storage.makedirs(out_uri)


def publish_manifest(out_uri: str, manifest: dict) -> None:
    """Write manifest.json (last), then remove shard files of an older run it does not list."""
    storage.write_json_atomic(storage.join(out_uri, MANIFEST_NAME), manifest)
    listed = {s["path"] for s in manifest["shards"]}
    for name in storage.listdir(out_uri):
        if SHARD_NAME.match(name) and name not in listed:
            storage.remove(storage.join(out_uri, name))


def write_shard_set(out_uri: str, feature_names: list[str], chunks, *, extra: dict | None = None,
                    rows_per_shard: int = ROWS_PER_SHARD,
                    row_group_rows: int = ROW_GROUP_ROWS) -> dict:
    """Write shards from `chunks` (an iterable of (split, columns) with the `rows_table` keyword
    columns, each split's rows arriving in index order), then the manifest; returns the manifest.

    On any exception nothing more is published and no manifest is written.
    """
    import datetime

    from pipeline.data.label_counts import count_chunks

    prepare_output(out_uri)
    schema = shard_schema(feature_names)
    writers: dict[str, SplitWriter] = {}
    counts: dict = {}
    try:
        for split, columns in chunks:
            count_chunks(counts, split, columns)
            # Only the writes become "OUT: no space left on device" (or S3 down): an error of
            # the input iterator is the input's, and stays as it is.
            with storage.user_errors(out_uri):
                if split not in writers:
                    writers[split] = SplitWriter(out_uri, split, schema, rows_per_shard,
                                                 row_group_rows)
                writers[split].append(rows_table(schema, split, **columns))
        with storage.user_errors(out_uri):
            shards = [entry for split in sorted(writers) for entry in writers[split].close()]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    manifest = {
        "schema_version": SCHEMA_VERSION, "window": WINDOW, "features": list(feature_names),
        "dtype": "float32", "shards": shards,
        "splits": {split: sum(s["rows"] for s in shards if s["split"] == split)
                   for split in sorted(writers)},
        # per split: labeled windows, classes, span positives/negatives (auto loss weights)
        "label_counts": {split: counts[split].to_dict() for split in sorted(counts)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    publish_manifest(out_uri, manifest)
    return manifest


def random_chunks(n_rows: int, n_features: int = 12, split: str = "train", chunk_rows: int = 8192,
                  seed: int = 0, labeled_fraction: float = 1.0):
    """Synthetic shard rows with random features (for loader tests and benchmarks only)."""
    rng = np.random.default_rng(seed)
    for lo in range(0, n_rows, chunk_rows):
        n = min(chunk_rows, n_rows - lo)
        start = rng.integers(0, WINDOW - 1, n)
        labeled = rng.random(n) < labeled_fraction
        yield split, dict(
            window_id=[f"{split}-{i}" for i in range(lo, lo + n)],
            group_id=[f"g{i // 4}" for i in range(lo, lo + n)], t0=None,
            index=np.arange(lo, lo + n),
            features=rng.standard_normal((n, WINDOW, n_features), dtype=np.float32),
            valid=rng.random((n, WINDOW)) < 0.95,
            ohlc=100 + rng.standard_normal((n, WINDOW, 4), dtype=np.float32),
            label=np.where(labeled, rng.integers(0, 2, n), -1),
            expansion_start=np.where(labeled, start, -1),
            expansion_end=np.where(labeled, np.minimum(start + rng.integers(0, 12, n), WINDOW - 1), -1),
        )
