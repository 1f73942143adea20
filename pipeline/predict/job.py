"""A prediction job: everything checked up front (`prepare`), and the worker both engines run.

`prepare` opens the run, reads its featurization, reads and checks the input, compares bar
frequencies and settles the options, so that every mistake a user can make is one UserError
before anything is written or any Ray is started. `Worker` turns one unit of work (a chunk of a
bar series, or a batch of shard rows) into one window table; the local engine calls it in this
process, the Ray engine in each actor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.ingest import DEFAULT_STRIDE
from pipeline.data.shards import binary_view
from pipeline.errors import UserError
from pipeline.predict import chunks as chunking
from pipeline.predict.inputs import BarInput, ShardInput, check_frequency, read_input
from pipeline.predict.model import WindowPredictor
from pipeline.predict.output import check_out
from pipeline.predict.table import BarCombiner, window_schema, window_table

WINDOW = chunking.WINDOW
SHARD_COLUMNS = ["window_id", "split", "index", "t0", "bar_index", "features", "valid"]


@dataclass
class Options:
    stride: int | None = None           # None: DEFAULT_STRIDE for bars
    mc_samples: int = 0
    batch_size: int = 1024
    seed: int = 0
    allow_frequency_change: bool = False


@dataclass
class Plan:
    run: object                          # TrainedRun
    spec: chunking.FeatureSpec
    source: BarInput | ShardInput
    out: str
    options: Options
    threshold: float
    threshold_source: str
    windows: int                         # windows to predict
    bar_lengths: dict[str, int] | None   # per-bar table: bars per instrument (None: no table)
    bar_times: dict[str, np.ndarray | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def stride(self) -> int | None:
        return self.options.stride

    def schema(self) -> pa.Schema:
        net = self.run.net
        return window_schema(net.cfg.tasks, net.cfg.num_classes, self.options.mc_samples > 0)

    def worker_args(self) -> dict:
        """Everything a Worker needs, picklable (the Ray engine ships it to each actor)."""
        shard_times = self.source.bar_times if isinstance(self.source, ShardInput) else None
        instrument = self.source.instrument if isinstance(self.source, ShardInput) else None
        return {"net": self.run.net, "spec": self.spec, "schema": self.schema(),
                "threshold": self.threshold, "countdown_scale": self.run.loss.countdown_scale,
                "mc_samples": self.options.mc_samples, "batch_size": self.options.batch_size,
                "seed": self.options.seed, "instrument": instrument, "bar_times": shard_times}

    @property
    def chunk_windows(self) -> int:
        return max(chunking.CHUNK_WINDOWS, self.options.batch_size)

    def n_chunks(self) -> int:
        if isinstance(self.source, ShardInput):  # row groups: the smallest block Ray reads
            return sum(len(s["row_group_rows"]) for s in self.source.manifest["shards"])
        return sum(chunking.n_chunks(len(s.timestamps), self.stride, self.chunk_windows)
                   for s in self.source.series)

    def chunks(self):
        """The bar series' chunks, in instrument then time order (the same in every engine)."""
        next_id = 0
        for series in self.source.series:
            for chunk in chunking.series_chunks(series, self.spec, self.stride, next_id,
                                                self.chunk_windows):
                next_id = chunk.chunk_id + 1
                yield chunk

    def combiner(self) -> BarCombiner | None:
        if self.bar_lengths is None or "span" not in self.run.net.cfg.tasks:
            return None
        return BarCombiner(self.bar_lengths, self.bar_times, self.threshold)


def prepare(run_uri: str, checkpoint: str, in_uri: str, out: str, options: Options) -> Plan:
    """Check everything; raise the first UserError. Writes nothing."""
    from pipeline.trained_run import open_run

    run = open_run(run_uri, checkpoint)
    spec = chunking.feature_spec(run)
    out_notes = check_out(out, in_uri, run_uri)
    source = read_input(in_uri, list(spec.names))
    threshold, threshold_source = run.span_threshold()
    if options.batch_size < 1:
        raise UserError(f"--batch-size {options.batch_size}: must be at least 1")
    make = _shard_plan if isinstance(source, ShardInput) else _bar_plan
    plan = make(run, spec, source, out, options, threshold, threshold_source)
    plan.notes = out_notes + plan.notes
    return plan


def _bar_plan(run, spec, source: BarInput, out, options, threshold, threshold_source):
    options = dataclasses.replace(
        options, stride=DEFAULT_STRIDE if options.stride is None else options.stride)
    if options.stride < 1:
        raise UserError(f"--stride {options.stride}: must be at least 1")
    notes = list(source.notes)
    notes += check_frequency(source, chunking.training_bar_seconds(run),
                             options.allow_frequency_change, run.uri)
    lengths = {s.instrument: len(s.timestamps) for s in source.series}
    windows = 0
    for name, n in lengths.items():
        starts = chunking.window_starts(n, options.stride)
        windows += len(starts)
        if starts[-1] + WINDOW < n:
            notes.append(f"{name}: the last {n - starts[-1] - WINDOW} bars are in no window "
                         f"(--stride {options.stride}: windows start every {options.stride} "
                         f"bars from the first)")
    per_bar = lengths if options.stride < WINDOW else None
    times = {s.instrument: s.timestamps for s in source.series}
    return Plan(run, spec, source, out, options, threshold, threshold_source, windows, per_bar,
                times, notes)


def _shard_plan(run, spec, source: ShardInput, out, options, threshold, threshold_source):
    if options.stride is not None:
        raise UserError(f"--stride {options.stride}: a shard set's windows are predicted as "
                        f"they are; --stride applies to bar files")
    bar_index = np.concatenate([
        np.asarray(pq.read_table(storage.open_input(f), columns=["bar_index"])
                   .column(0).to_numpy()) for f in source.files]) if source.files else np.zeros(0)
    starts = np.sort(bar_index)
    overlapping = len(starts) > 1 and starts[0] >= 0 and np.diff(starts).min() < WINDOW
    lengths = None
    if overlapping:
        n_bars = len(source.bar_times) if source.bar_times is not None else int(starts[-1]) + WINDOW
        lengths = {source.instrument: n_bars}
    return Plan(run, spec, source, out, options, threshold, threshold_source, source.windows,
                lengths, {source.instrument: source.bar_times}, list(source.notes))


class Worker:
    """One unit of work -> one window table (plain torch; the same in every engine)."""

    def __init__(self, net, spec, schema, threshold, countdown_scale, mc_samples, batch_size,
                 seed, instrument=None, bar_times=None, device=None):
        self.spec, self.schema, self.threshold = spec, schema, threshold
        self.instrument, self.bar_times = instrument, bar_times
        self.predictor = WindowPredictor(net, countdown_scale=countdown_scale,
                                         mc_samples=mc_samples, batch_size=batch_size,
                                         seed=seed, device=device)

    def chunk(self, chunk: chunking.Chunk) -> pa.Table:
        x, valid, times = chunk.windows(self.spec)
        bar_index = chunk.bar_index()
        name = pa.repeat(chunk.instrument, chunk.n_windows)
        ident = {"instrument": name, "bar_index": bar_index,
                 "window_id": pc.binary_join_element_wise(
                     name, pc.utf8_lpad(pa.array(bar_index).cast(pa.string()), 9, "0"), "-")}
        outputs = self.predictor.predict(x, f"{chunk.instrument}:{chunk.first_bar}")
        return window_table(self.schema, ident, outputs, valid, times, self.threshold)

    def shard_rows(self, table: pa.Table) -> pa.Table:
        n_f = len(self.spec.names)
        x = binary_view(table.column("features"), np.float32, (WINDOW, n_f))
        valid = binary_view(table.column("valid"), np.uint8, (WINDOW,)).view(np.bool_)
        bar_index = np.asarray(table.column("bar_index").to_numpy())
        times = None
        if self.bar_times is not None and len(bar_index) and bar_index.min() >= 0 \
                and bar_index.max() + WINDOW <= len(self.bar_times):
            times = self.bar_times[bar_index[:, None] + np.arange(WINDOW)]
        ident = {"instrument": pa.repeat(self.instrument, table.num_rows),
                 "window_id": table.column("window_id"), "split": table.column("split"),
                 "index": table.column("index"), "bar_index": bar_index,
                 "t0": table.column("t0")}
        key = table.column("window_id")[0].as_py() if table.num_rows else ""
        outputs = self.predictor.predict(x, key)
        return window_table(self.schema, ident, outputs, valid, times, self.threshold)


def shard_batches(files: list[str], batch_size: int):
    """Shard rows in manifest order, `batch_size` rows at a time (the local engine's reader)."""
    for uri in files:
        f = pq.ParquetFile(storage.open_input(uri))
        for batch in f.iter_batches(batch_size=batch_size, columns=SHARD_COLUMNS):
            yield pa.Table.from_batches([batch])
