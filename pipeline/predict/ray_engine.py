"""The Ray Data engine: the same Worker in an actor pool, Parquet written by Ray into staging.

    shard set:  read_parquet(shards) ----------------------------\
    bar file:   driver: check + features once per bar (series) -> from_arrow(chunks, a block
                each; every chunk carries its windows' 104 bars of left context)
                                    -> map_batches(RayWorker, ActorPoolStrategy(size=N),
                                       num_gpus=G, explicit batch_size)
                                    -> write_parquet(OUT/_staging/<id>/windows, mode=CREATE)
    then the per-bar table from the staged files, and publish (output.py) on the driver.

Why the driver computes a bar file's features: the range EMA and the zigzag carry state from a
segment's first bar, so a window's features depend on more than its 104 bars of context; the
pass is O(bars) (about a million bars a second, bench/features.py) while the model's work is
O(windows x 105), so the actors do the part that scales. Windows are cut inside the actors.

Ray stays here: a local Ray is started with `ray.init(address="local")` sized to the machine
(the trainer's `init_ray`), a cluster is joined only with --address, Ray's own output goes to a
log file for a local Ray (the trainer's `RayLog`), Ray Data's progress bars are off and the
driver shows its own progress from a counter the actors feed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data  # configures Ray Data's console logging now, before _quiet_ray_data mutes it

from pipeline import storage
from pipeline.config import ClusterSection, TrainConfig
from pipeline.errors import UserError
from pipeline.predict.chunks import chunk_table, chunks_of_table
from pipeline.predict.inputs import ShardInput
from pipeline.predict.job import SHARD_COLUMNS, Plan, Worker
from pipeline.predict.output import ROWS_PER_FILE, Staging
from pipeline.predict.table import parquet_options

POLL_S = 0.5


def run_ray(plan: Plan, staging: Staging, progress, *, address: str | None = None,
            actors: int | None = None, gpus_per_actor: float = 0.0,
            verbose: bool = False) -> dict:
    """Predict the plan's windows on Ray into `staging`; engine facts for the manifest."""
    # a local Ray's own output goes to a log file here (joining a cluster, to the console)
    log_dir = tempfile.mkdtemp(prefix="moola-predict-") if address is None else ""
    cfg = TrainConfig(out=log_dir, cluster=ClusterSection(
        address=address, workers=actors or max(1, (os.cpu_count() or 2) - 1)))
    with _ray(cfg, verbose) as ray_log:
        # no more actors than units of work: an idle actor costs its start and a Ray warning
        n = min(_pool_size(actors, gpus_per_actor, address), max(1, plan.n_chunks()))
        counter = _Counter.remote()
        ds = _dataset(plan).map_batches(
            # the model and its settings go to the object store once, for every actor (a
            # reference inside a list is passed as it is; each actor fetches it)
            RayWorker, fn_constructor_kwargs={"args": [ray.put(plan.worker_args())],
                                              "counter": counter},
            compute=ray.data.ActorPoolStrategy(size=n), num_cpus=1,
            num_gpus=gpus_per_actor or None, batch_format="pyarrow",
            batch_size=plan.options.batch_size if _is_shards(plan) else 1,
            udf_modifying_row_count=not _is_shards(plan))
        fs, path = storage.resolve(staging.table_uri("windows"))
        with _progress_from(counter, plan.windows, progress), warnings.catch_warnings():
            # Ray Data may read a small shard set as fewer blocks than actors and says so;
            # the pool is already sized to the work
            warnings.filterwarnings("ignore", "The minimum number of concurrent actors")
            ds.write_parquet(path, filesystem=fs, mode=ray.data.SaveMode.CREATE,
                             min_rows_per_file=ROWS_PER_FILE, **parquet_options(plan.schema()))
    _per_bar_table(plan, staging)
    return {"engine": "ray", "actors": n, "gpus_per_actor": gpus_per_actor,
            "address": address or "local",
            "ray_log": ray_log.uri if ray_log.quiet else None}


def _is_shards(plan: Plan) -> bool:
    return isinstance(plan.source, ShardInput)


@contextlib.contextmanager
def _ray(cfg: TrainConfig, verbose: bool):
    """Ray up (local or --address), quiet, Ray Data's own progress bars off; down afterwards
    if we started it."""
    from pipeline.train.trainer import RayLog, init_ray
    started = not ray.is_initialized()
    ray_log = RayLog(cfg, verbose)
    try:
        init_ray(cfg, verbose)  # it drops a local Ray's token-auth notice itself
        with ray_log, _quiet_ray_data(ray_log, verbose), _muted_notice(PROGRESS_LOGGER, True):
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            yield ray_log
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


# Ray Data warns that its progress bars are off (we show our own).
PROGRESS_LOGGER = "ray.data._internal.progress"


@contextlib.contextmanager
def _muted_notice(name: str, quiet: bool):
    """Drop one logger's sub-error records while `quiet` (a filter on the logger itself, so it
    holds whatever handlers ray.init installs meanwhile)."""
    import logging

    def below_error(record):
        return record.levelno >= logging.ERROR
    logger = logging.getLogger(name)
    if quiet:
        logger.addFilter(below_error)
    try:
        yield
    finally:
        logger.removeFilter(below_error)


@contextlib.contextmanager
def _quiet_ray_data(ray_log, verbose: bool):
    """Ray Data logs every execution at INFO on the console (its own handler on `ray.data`,
    which does not propagate to `ray`), and a local Ray warns about its defaults: on a local
    Ray all of it goes to our Ray log and only errors reach the console; joining a cluster,
    Ray Data's INFO lines stay off the console and warnings stay on."""
    import logging
    loud = logging.ERROR if ray_log.quiet else logging.WARNING
    loggers = [logging.getLogger("ray.data")] + ([logging.getLogger("ray")] if ray_log.quiet else [])
    muted = [(h, h.level) for lg in loggers for h in lg.handlers
             if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    muted = [] if verbose else muted
    for h, level in muted:
        h.setLevel(max(level, loud))
    file_handler = None
    if ray_log.quiet:
        file_handler = logging.FileHandler(ray_log.uri, mode="a")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        loggers[0].addHandler(file_handler)
    try:
        yield
    finally:
        for h, level in muted:
            h.setLevel(level)
        if file_handler is not None:
            loggers[0].removeHandler(file_handler)
            file_handler.close()


def _pool_size(actors: int | None, gpus: float, address: str | None) -> int:
    """--actors, or what the cluster holds: one CPU and `gpus` of a GPU each, and one CPU left
    for Ray Data's write tasks (a local Ray is started with actors + 1 CPUs for that)."""
    res = ray.cluster_resources()
    cpus, n_gpus = int(res.get("CPU", 1)), float(res.get("GPU", 0))
    where = f"the cluster at {address}" if address else "this machine's Ray"
    if gpus and n_gpus < gpus:
        raise UserError(f"--gpus-per-actor {gpus}: {where} has {n_gpus:g} GPUs")
    fits = min(cpus, int(n_gpus // gpus)) if gpus else max(1, cpus - 1)
    if actors is None:
        return max(1, fits)
    if actors > fits:
        raise UserError(f"--actors {actors}: {where} holds {fits} (one CPU"
                        f"{f' and {gpus:g} GPU' if gpus else ''} each; {cpus} CPUs"
                        f"{f', {n_gpus:g} GPUs' if gpus else ''})")
    return actors


def _dataset(plan: Plan) -> "ray.data.Dataset":
    if _is_shards(plan):
        fs, _ = storage.resolve(plan.source.files[0])
        paths = [storage.resolve(f)[1] for f in plan.source.files]
        return ray.data.read_parquet(paths, filesystem=fs, columns=SHARD_COLUMNS,
                                     override_num_blocks=max(1, plan.n_chunks()))
    return ray.data.from_arrow([chunk_table(c) for c in plan.chunks()])


class RayWorker:
    """The Worker in a Ray actor: a batch of chunk rows, or of shard rows, in; windows out."""

    def __init__(self, args: list, counter):
        self.worker = Worker(**ray.get(args[0]))
        self.counter = counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "chunk_id" in batch.column_names:
            out = pa.concat_tables([self.worker.chunk(c) for c in chunks_of_table(batch)])
        else:
            out = self.worker.shard_rows(batch)
        self.counter.add.remote(out.num_rows)
        return out


@ray.remote(num_cpus=0)
class _Counter:
    def __init__(self):
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def get(self) -> int:
        return self.done


@contextlib.contextmanager
def _progress_from(counter, total: int, progress):
    """Poll the actors' counter into `progress` while the body (the blocking write) runs."""
    stop = threading.Event()

    def poll():
        while not stop.wait(POLL_S):
            with contextlib.suppress(Exception):
                progress("windows", min(ray.get(counter.get.remote(), timeout=5), total), total)

    progress("windows", 0, total)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    progress("windows", ray.get(counter.get.remote()), total)


def _per_bar_table(plan: Plan, staging: Staging) -> None:
    """Combine the staged windows per bar, file by file (only the columns it needs)."""
    combiner = plan.combiner()
    if combiner is None:
        return
    columns = [c for c in ("instrument", "bar_index", "span_prob", "countdown_bars")
               if c in plan.schema().names]
    for name in staging.staged_files("windows"):
        uri = storage.join(staging.table_uri("windows"), name)
        combiner.add(pq.read_table(storage.open_input(uri), columns=columns))
    bars = combiner.table()
    with staging.writer("bars", bars.schema) as writer:
        writer.write(bars)
