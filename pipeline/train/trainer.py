"""The driver side of a run: run directory, Ray, TorchTrainer assembly, the final summary.

Run directory = Ray Train storage: storage_path is the parent of OUT and the run name its basename,
so Ray's checkpoint_* directories and snapshot land in OUT next to our files, and a run restarted
with the same OUT (`--resume`) is restored by Ray from there. A fresh run refuses an OUT that
already holds a run, because Ray would silently resume it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass

from pipeline import storage
from pipeline.data.label_counts import label_counts
from pipeline.config import (TrainConfig, check_batch_fits, check_resources, load_config,
                             resume_conflicts, to_yaml)
from pipeline.errors import UserError
from pipeline.train import rundir

SCORE_ATTR = "best_score"


@dataclass
class RunSummary:
    out: str
    run_id: str
    epochs_done: int
    best_epoch: int | None
    best_checkpoint: str | None
    report: str | None
    last_record: dict | None
    finished_before: bool = False  # a --resume found the run already finished
    ray_log: str | None = None  # Ray's own output, when the console did not show it


def new_run_id(out: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{storage.basename(out)}-{stamp}-{secrets.token_hex(3)}"


def prepare_run(cfg: TrainConfig, resume: bool, overrides: dict | None = None) -> TrainConfig:
    """Check OUT for a fresh run or a resume; returns the config the run will use."""
    out = cfg.out
    config_uri = storage.join(out, rundir.CONFIG)
    has_run = storage.exists(config_uri) or bool(rundir.checkpoint_dirs(out))
    if resume:
        if not storage.exists(config_uri):
            raise UserError(f"--resume: {out} holds no run ({rundir.CONFIG} missing); "
                            "start it without --resume")
        saved = load_config(config_uri)
        # Flags given now (more epochs, another cluster) apply on top of the saved config.
        resumed = load_config(None, overrides, base=saved.to_dict())
        resumed.out, resumed.run_id = out, saved.run_id
        conflicts = resume_conflicts(saved, resumed)
        if conflicts:
            raise UserError(f"--resume of {out}: these settings differ from the run's "
                            f"{rundir.CONFIG}: {'; '.join(conflicts)}. Drop them from the command "
                            "or start a new run with another --out")
        cfg = resumed
    elif has_run:
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose "
                        "another --out (a new run never reuses a run directory)")
    elif storage.exists(out) and storage.listdir(out):
        raise UserError(f"{out} exists and is not empty: choose an empty or new --out")
    if not cfg.run_id:
        cfg.run_id = new_run_id(out)
    return cfg.validate()


def preflight(cfg: TrainConfig) -> dict:
    """Everything a user can get wrong, checked before anything is written: the data's manifest
    and splits, model, loss and weighting settings. Returns the manifest (as the run's fold
    sees it, with --fold)."""
    from dataclasses import asdict

    from pipeline.data.folds import fold_view
    from pipeline.data.manifest import load_manifest
    from pipeline.model import JadeConfig
    from pipeline.reducer import LossConfig, build_weighting

    # Every shard's size and sha256 now, before OUT gets anything: a corrupt shard must not
    # leave a config.yaml behind that makes the rerun "already hold a run".
    manifest = load_manifest(cfg.data, verify=True, flag="--data")
    # With --fold, "train" and "val" are the fold's train windows and test block: the counts
    # below (empty, unlabeled, batch size, auto loss weights) are the fold's. The run directory
    # still gets the data's own manifest.json.
    manifest = fold_view(manifest, cfg.fold, cfg.data)
    for split in ("train", "val"):
        if not manifest.get("splits", {}).get(split):
            raise UserError(f"{cfg.data}: the {split} split is empty; re-shard with a "
                            f"non-zero {split} fraction")
    counts = label_counts(cfg.data, manifest)
    for split in ("train", "val"):
        if not counts.get(split, {}).get("labeled"):
            raise UserError(
                f"{cfg.data}: the {split} split has no labeled window (all "
                f"{manifest['splits'][split]} are unlabeled), so every training loss would be 0. "
                "Train on labeled windows (ingest with --labels LABELS.csv, or moola's labeled "
                "Parquet); unlabeled bars are for pretraining (coming: moola-pipeline pretrain)")
    check_batch_fits(cfg, manifest["splits"])
    if cfg.cluster.address is None:  # a cluster's resources are checked once joined
        import torch
        check_resources(cfg, len(os.sched_getaffinity(0)), torch.cuda.device_count(),
                        "this machine")
        if cfg.cluster.workers == 0:  # local mode trains here: refuse graphs it cannot have
            from pipeline.train.step import graph_plan
            graph_plan(cfg.train.cuda_graphs, "cuda" if torch.cuda.is_available() else "cpu", 1,
                       where="local mode on this machine")
    model_cfg = JadeConfig(n_features=len(manifest["features"]), **asdict(cfg.model))
    loss_cfg = LossConfig(**asdict(cfg.loss))
    build_weighting(loss_cfg.weighting, model_cfg.tasks, loss_cfg.weighting_options)
    check_best_metric(cfg.train.best_metric, model_cfg.tasks, model_cfg.num_classes)
    return manifest


def apply_auto_loss_weights(cfg: TrainConfig, manifest: dict) -> list[str]:
    """Turn `loss.span_pos_weight: auto` and `loss.type_class_weight: auto` into the numbers of
    this data's train split (manifest label counts), in `cfg` itself, before config.yaml is
    written: the run, its record and a resume all see the numbers used. Returns what to print."""
    from pipeline.reducer.losses import resolve_auto_weights
    train = label_counts(cfg.data, manifest).get("train", {})
    resolved = resolve_auto_weights(cfg.loss, train, cfg.model.num_classes)
    for key, value in resolved.items():
        setattr(cfg.loss, key, value)
    return [f"loss.{key}: auto -> {value} (from the train split's label counts)"
            for key, value in resolved.items()]

def record_metric_keys(tasks, num_classes: int) -> set[str]:
    """The numeric keys (dotted) every metrics.jsonl record will have, known before training."""
    from pipeline.train.metrics import TaskMetrics
    keys = {"val_loss", "step", "samples_per_s", "epoch_time_s", "lr",
            "grad_ratio_countdown_pointer"}
    keys |= {f"{group}.{t}" for group in ("train", "val", "weights", "log_vars", "grad_norm",
                                           "grad_share") for t in tasks}
    for task, values in TaskMetrics(tasks, num_classes=num_classes).compute().items():
        keys |= {f"{task}.{k}" for k, v in values.items() if not isinstance(v, list)}
    return keys


def check_best_metric(name: str, tasks, num_classes: int) -> None:
    keys = record_metric_keys(tasks, num_classes)
    if name not in keys:
        raise UserError(f"train.best_metric (--best-metric) {name!r} is not a metrics key; "
                        f"choose one of: {', '.join(sorted(keys))}")


def claim_run_dir(cfg: TrainConfig) -> None:
    """A fresh run takes OUT by creating its config.yaml with O_CREAT|O_EXCL, so of two runs
    started at once on the same local OUT exactly one proceeds. S3 has no exclusive create that
    pyarrow exposes: there the check in prepare_run leaves a window of milliseconds (documented)."""
    if storage.is_s3(cfg.out):
        return
    storage.makedirs(cfg.out)
    path = storage.join(cfg.out, rundir.CONFIG)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise UserError(f"{cfg.out} already holds a run (another run just claimed it): pass "
                        "--resume to continue it, or choose another --out") from None
    with storage.user_errors(path), os.fdopen(fd, "w") as f:
        f.write(to_yaml(cfg))


def write_run_files(cfg: TrainConfig) -> None:
    from pipeline.data.manifest import manifest_uri
    storage.makedirs(cfg.out)
    storage.write_text_atomic(storage.join(cfg.out, rundir.CONFIG), to_yaml(cfg))
    storage.write_bytes_atomic(storage.join(cfg.out, rundir.MANIFEST),
                               storage.read_bytes(manifest_uri(cfg.data)))


def init_ray(cfg: TrainConfig, verbose: bool = False) -> None:
    """Start a local Ray sized to the machine, or join the cluster at --address. A local Ray's
    processes keep their output in Ray's session logs (copied to OUT/ray.log at the end) unless
    `verbose`: the console gets our epoch lines and alarms, printed by the driver."""
    import ray
    c = cfg.cluster
    # Worker processes chdir into Ray's session dir by default; all our paths are absolute,
    # and this keeps any relative path a user gives meaning the same thing.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if ray.is_initialized():
        return
    if c.address is None:
        _hush_token_auth_notice()
        need = c.workers * c.cpus_per_worker + 1  # + the Train controller
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 include_dashboard=False, log_to_driver=not quiet_ray(cfg, verbose),
                 object_store_memory=256 * 1024 * 1024, configure_logging=False,
                 logging_level="WARNING")
        return
    if c.address != "auto":
        _probe_gcs(c.address)  # ray.init retries an unreachable address for minutes
    try:  # the token, when the cluster wants one, comes from RAY_AUTH_TOKEN in the environment
        ray.init(address=c.address, log_to_driver=True, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--address {c.address}: cannot join the Ray cluster ({first}); check "
                        "the address and, with token auth, RAY_AUTH_TOKEN") from None


class _TokenAuthNotice:
    """Drops Ray 2.60's "Token authentication is enabled for this Ray cluster. Set
    RAY_AUTH_MODE=disabled to opt out" warning, logged by every local ray.init(): token auth on
    a local cluster is what we want, and the notice, on the console of every run, says nothing a
    user should act on. Other authentication warnings (disabled, missing token) pass."""

    TEXT = "Token authentication is enabled for this Ray cluster"

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.TEXT)


def _hush_token_auth_notice() -> None:
    import logging
    from ray._private.authentication import authentication_token_setup as setup
    logger = logging.getLogger(setup.__name__)
    if not any(isinstance(f, _TokenAuthNotice) for f in logger.filters):
        logger.addFilter(_TokenAuthNotice())


def _probe_gcs(address: str, timeout_s: float = 5.0) -> None:
    import socket
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address {address}: expected auto or HOST:PORT (the head's GCS port, "
                        "6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"--address {address}: cannot reach the Ray head ({exc.strerror or exc}); "
                        "is the cluster up and the port open?") from None


def check_storage_for_cluster(cfg: TrainConfig) -> None:
    """Multi-node with a local run dir fails late inside Ray; say so before training starts."""
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_s3(cfg.out) and not cfg.cluster.shared_fs:
        raise UserError(
            f"the cluster has {len(nodes)} nodes but --out {cfg.out} is a local path: "
            "checkpoints from other nodes cannot reach it. Use --out s3://bucket/prefix, or a "
            "file system mounted at the same path on every node with cluster.shared_fs: true")


def build_trainer(cfg: TrainConfig, resume_from: str | None):
    import ray.train

    from pipeline.train.failures import FailureReporter, PipelineTrainer
    from pipeline.train.loop import train_loop_per_worker

    c, t = cfg.cluster, cfg.train
    resources = {"CPU": c.cpus_per_worker}
    if c.gpus_per_worker:
        resources["GPU"] = c.gpus_per_worker
    storage_kwargs = {}
    if storage.is_s3(cfg.out):
        # Our filesystem carries the endpoint and retry settings from the environment; Ray then
        # wants the path without the scheme.
        storage_kwargs = {"storage_filesystem": storage.s3_filesystem(),
                          "storage_path": storage.parent(cfg.out)[len(storage.S3_SCHEME):]}
    else:
        storage_kwargs = {"storage_path": storage.parent(cfg.out)}
    # A local Ray has no dashboard, so Train's placement-group cleaner warns every few seconds
    # that the state API is missing; on a cluster its warnings matter and stay on.
    log_level = "ERROR" if c.address is None else "WARNING"
    run_config = ray.train.RunConfig(
        name=storage.basename(cfg.out),
        logging_config=ray.train.LoggingConfig(log_level=log_level),
        # Train's print patch would send each line of the epoch summary to the console twice.
        worker_runtime_env={"env_vars": _worker_env(cfg)},
        failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
        callbacks=[FailureReporter(c.max_failures)],  # says which workers died, what next
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=SCORE_ATTR,
            checkpoint_score_order=t.best_mode),
        **storage_kwargs)
    return PipelineTrainer(
        train_loop_per_worker,
        cleaner=c.address is not None,  # a local Ray has no state API for it (failures.py)
        train_loop_config={"config": cfg.to_dict(), "local_mode": c.workers == 0,
                           "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(num_workers=c.workers,
                                               use_gpu=bool(c.gpus_per_worker),
                                               resources_per_worker=resources if c.workers else None),
        run_config=run_config)


def _worker_env(cfg: TrainConfig) -> dict:
    """Environment of the worker processes (non-secret: it is visible in Ray's job records)."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    from pipeline.train.step import REPLAY_ENV  # the CPU test hook of the graphed schedule
    if REPLAY_ENV in os.environ:
        env[REPLAY_ENV] = os.environ[REPLAY_ENV]
    if cfg.train.cuda_graphs == "on" and cfg.cluster.workers > 1 and cfg.cluster.gpus_per_worker:
        # Graphed DDP: PyTorch's recipe turns NCCL's async error handling off before the
        # process group exists (Ray sets it to 1 only when unset). Its watchdog cannot see
        # collectives inside a graph anyway.
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
    return env


def latest_local_checkpoint(cfg: TrainConfig) -> str | None:
    """Local mode keeps its own checkpoints in OUT; the newest one continues a --resume."""
    # Whole checkpoints only: meta.json is written last, so a copy cut short (disk full, S3
    # down) lacks it and is never chosen.
    names = [n for n in rundir.checkpoint_dirs(cfg.out)
             if storage.exists(storage.join(cfg.out, n, "meta.json"))]
    if not names:
        return None
    uri = storage.join(cfg.out, names[-1])
    if storage.is_s3(uri):
        import tempfile
        import pyarrow.fs as pafs
        local = tempfile.mkdtemp(prefix="moola-resume-")
        fs, path = storage.resolve(uri)
        pafs.copy_files(path, local, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local
    return os.path.abspath(uri)


def _user_error_in(exc: BaseException) -> UserError | None:
    """A UserError raised inside a worker, found in Ray's wrapping of it."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        if isinstance(e, OSError) and (e.errno == 28 or "no space left" in str(e).lower()):
            return UserError("no space left on device while writing the run (checkpoint or run "
                             "file); free space, then continue with `train --out OUT --resume` "
                             "(only whole checkpoints are resumed)")
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__,
                 getattr(e, "controller_failure", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
    return None


def _name_out(message: str, cfg: TrainConfig) -> str:
    return f"{cfg.out}: {message}" if message.startswith("no space left") else message


POLL_S = 0.5  # how often the driver looks at metrics.jsonl while Ray trains
STOP_WAIT_S = 10.0  # how long a stop waits for local mode's training thread to reach a step


class RunInterrupted(UserError):
    """Ctrl-C or SIGTERM (`moola-pipeline stop`, a stopped Ray job): the run is kept for --resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


class StopSignals:
    """SIGTERM turned into an exception in the main thread (Python's default ends the process
    on the spot, leaving no report and no word on how to continue), except while the report is
    written: then it waits until the file is whole (`deferred`)."""

    def __init__(self):
        self.deferring, self.pending, self.previous = False, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _on_term(self, signum, frame):
        if self.deferring:
            self.pending = True
            return
        raise _Terminated()

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            if self.pending:
                raise _Terminated()


class RunReport:
    """report.html, written by the driver as soon as the run's last record is in (before Ray's
    teardown, which a stopped job may never finish), and again only if the records change."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.written_for: list[dict] | None = None
        self.uri: str | None = None

    def write(self, records: list[dict]) -> str | None:
        try:
            from pipeline.report.html import write_report
        except ImportError:
            return None
        if records and records != self.written_for:
            self.uri = str(write_report(self.cfg.out) or storage.join(self.cfg.out, rundir.REPORT))
            self.written_for = records
        return self.uri

    def at_last_record(self, signals: StopSignals) -> None:
        records = rundir.read_metrics(self.cfg.out)
        if records and self.written_for is None and run_finished(records[-1], self.cfg):
            with signals.deferred():
                self.write(records)


def run_finished(record: dict | None, cfg: TrainConfig) -> bool:
    """Whether `record` (one epoch's metrics) is the run's last: every epoch done, or early
    stopping (the loop's rule: `patience` epochs since the best one, or since the start)."""
    if record is None:
        return False
    done = record["epoch"] + 1
    if done >= cfg.train.epochs:
        return True
    patience = cfg.train.early_stop_patience
    best = record.get("best_epoch")
    return bool(patience) and (done - (best + 1 if best is not None else 0)) >= patience


def fit(trainer, cfg: TrainConfig, progress, report: RunReport) -> object:
    """trainer.fit() in a thread while the main thread shows per-epoch progress from OUT and
    writes the report once the last record is in."""
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the main thread
            box["error"] = exc

    from pipeline.train.worker import STOP
    STOP.clear()  # a stop of an earlier run in this process is not this run's
    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    with StopSignals() as signals:
        try:
            thread.start()
            seen = len(rundir.read_metrics(cfg.out))
            while thread.is_alive():
                thread.join(timeout=POLL_S)
                seen = progress.update(seen)
                report.at_last_record(signals)
        except (KeyboardInterrupt, _Terminated) as exc:
            signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
            raise interrupted(cfg, report, signum, thread) from None
    progress.update(seen)
    if "error" in box:
        exc = box["error"]
        user = _user_error_in(exc)
        if user is not None:
            raise UserError(_name_out(user.message, cfg)) from None
        from pipeline.train.failures import stopped_run_message
        stopped = stopped_run_message(exc, cfg)
        if stopped is not None:
            raise UserError(stopped) from None
        raise exc
    result = box["result"]
    if getattr(result, "error", None) is not None:
        user = _user_error_in(result.error)
        if user is not None:
            raise UserError(_name_out(user.message, cfg)) from None
        raise result.error
    return result


def interrupted(cfg: TrainConfig, report: RunReport, signum: int,
                thread: threading.Thread | None = None) -> RunInterrupted:
    """The report of the finished epochs, then where a --resume would continue. Training stops
    first, so the report does not compete with it: Ray's workers with Ray, local mode's training
    thread at its next step (worker.STOP)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not cut the report
    how = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM (a stop)"
    from pipeline.train.worker import STOP
    STOP.set()
    if thread is not None and cfg.cluster.workers == 0:
        thread.join(timeout=STOP_WAIT_S)
    stop_ray()  # Ray's workers stop here
    records = rundir.read_metrics(cfg.out)
    written = None
    if records:
        print(f"\n{how}: writing the report of the {len(records)} finished "
              f"epoch{'' if len(records) == 1 else 's'} "
              "(Ctrl-C again skips it)", file=sys.stderr, flush=True)
        try:
            written = report.write(records)
        except KeyboardInterrupt:
            pass
    point = resume_point(cfg)
    where = (f"a --resume continues from {point[0]} (step {point[1]['step']})" if point else
             "no whole checkpoint yet, so a --resume starts it fresh")
    shown = f"; report of {len(records)} epoch{'' if len(records) == 1 else 's'}: {written}" \
        if written else ""
    return RunInterrupted(
        f"training interrupted by {how}; {cfg.out} keeps the run: {where}{shown}. Continue "
        f"with `moola-pipeline train --out {cfg.out} --resume`", signum)


def stop_ray() -> None:
    """Leave Ray: a local cluster stops, and on a cluster this driver's job ends, so its
    workers go. Local mode (no Ray processes) has nothing to stop."""
    import ray
    if ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # stopping anyway: what is left dies with this process
            pass


def resume_point(cfg: TrainConfig) -> tuple[str, dict] | None:
    """The whole checkpoint a --resume continues from, as (name, meta.json), or None when a
    resume starts fresh. Ray (workers >= 1) restores the latest checkpoint its own snapshot
    lists, so a checkpoint cut short before Ray registered it is not it; local mode takes the
    newest whole one (latest_local_checkpoint)."""
    if cfg.cluster.workers == 0:
        names = [n for n in rundir.checkpoint_dirs(cfg.out) if _whole(cfg.out, n)]
        name = names[-1] if names else None
    else:
        name = rundir.ray_latest_checkpoint(cfg.out)
        if name is not None and not _whole(cfg.out, name):
            name = None
    if name is None:
        return None
    return name, json.loads(storage.read_text(storage.join(cfg.out, name, "meta.json")))


def _whole(out: str, name: str) -> bool:
    # meta.json is written last: a copy cut short (disk full, S3 down, a kill) lacks it.
    return storage.exists(storage.join(out, name, "meta.json"))


def describe_resume(cfg: TrainConfig, point: tuple[str, dict] | None) -> str:
    if point is None:
        cut = [n for n in rundir.checkpoint_dirs(cfg.out) if not _whole(cfg.out, n)]
        why = (f" ({', '.join(cut)} incomplete: cut short while it was written)" if cut else "")
        return (f"--resume: {cfg.out} has no whole checkpoint{why}; starting the run fresh "
                f"from epoch 1 of {cfg.train.epochs}")
    name, meta = point
    loader = meta.get("loader") or {}
    epoch, consumed = loader.get("epoch", meta["epoch"]), loader.get("batches_consumed", 0)
    where = (f"epoch {epoch + 1} of {cfg.train.epochs}" + (f", after its first {consumed} batches"
             if consumed else ""))
    return f"--resume: continuing from checkpoint {name} (step {meta['step']}) at {where}"


def finished_run(cfg: TrainConfig, point: tuple[str, dict] | None) -> RunSummary | None:
    """A --resume of a run whose last checkpoint closes its last epoch: nothing to train. Its
    report is written if a stop cut the run short of writing it."""
    if point is None or not run_finished(point[1].get("record"), cfg):
        return None
    summary = summarize(cfg, RunReport(cfg), write_missing_only=True)
    summary.finished_before = True
    return summary


def run_training(cfg: TrainConfig, resume: bool = False, overrides: dict | None = None,
                 progress=None, say=print, verbose: bool = False) -> RunSummary:
    cfg = prepare_run(cfg, resume, overrides)
    point = resume_point(cfg) if resume else None
    if resume:  # a finished run: say so before any data check or Ray start
        done = finished_run(cfg, point)
        if done is not None:
            return done
    manifest = preflight(cfg)
    for line in apply_auto_loss_weights(cfg, manifest):
        say(line)
    if resume:
        say(describe_resume(cfg, point))
    if cfg.cluster.workers > 0:
        init_ray(cfg, verbose)
        check_storage_for_cluster(cfg)
        if cfg.cluster.address is not None:
            import ray
            have = ray.cluster_resources()
            check_resources(cfg, have.get("CPU", 0), have.get("GPU", 0),
                            f"the cluster at --address {cfg.cluster.address}")
    if not resume:
        claim_run_dir(cfg)
    write_run_files(cfg)
    resume_from = latest_local_checkpoint(cfg) if (resume and cfg.cluster.workers == 0) else None
    progress = progress or PlainProgress(cfg)
    ray_log = RayLog(cfg, verbose)
    # Quiet local Ray: the workers' output stays in Ray's logs, so the driver prints the lines.
    progress.echo = ray_log.quiet and cfg.cluster.workers > 0
    report = RunReport(cfg)
    with ray_log:  # Ray logs from the trainer's construction on (local mode says so at INFO)
        fit(build_trainer(cfg, resume_from), cfg, progress, report)
    summary = summarize(cfg, report)
    summary.ray_log = ray_log.uri if ray_log.quiet else None
    return summary


def summarize(cfg: TrainConfig, report: RunReport, write_missing_only: bool = False) -> RunSummary:
    records = rundir.read_metrics(cfg.out)
    last = records[-1] if records else None
    best_epoch = last.get("best_epoch") if last else None
    best_ckpt = None
    if best_epoch is not None:
        # The checkpoint written at the end of the best epoch (name: completed epochs, step).
        best = next(r for r in records if r["epoch"] == best_epoch)
        from pipeline.train.checkpoint import checkpoint_name
        best_ckpt = storage.join(cfg.out, checkpoint_name(best_epoch + 1, best["step"]))
    existing = storage.join(cfg.out, rundir.REPORT)
    if write_missing_only and storage.exists(existing):
        uri = existing
    else:
        uri = report.write(records)
    return RunSummary(cfg.out, cfg.run_id, len(records), best_epoch, best_ckpt, uri, last)


RAY_LOG = "ray.log"


def quiet_ray(cfg: TrainConfig, verbose: bool) -> bool:
    """Whether Ray's output goes to OUT/ray.log instead of the console: a local Ray or local
    mode, a local OUT (ray.log is appended to), and no --verbose."""
    return cfg.cluster.address is None and not storage.is_s3(cfg.out) and not verbose


class RayLog:
    """Ray's own output (worker and controller lines, Ray's INFO logging) in OUT/ray.log instead
    of the console, for a run on a local Ray or in local mode; `verbose` shows it on the console
    instead.
    A run joining a cluster (--address) keeps Ray's output on the console: that is what its job
    logs hold. Real failures stay loud either way: the driver raises them."""

    def __init__(self, cfg: TrainConfig, verbose: bool):
        self.cfg = cfg
        self.quiet = quiet_ray(cfg, verbose)
        self.uri = storage.join(cfg.out, RAY_LOG)
        self._handler = None
        self._muted: list = []

    def __enter__(self):
        if not self.quiet:
            return self
        import logging

        import ray.train  # noqa: F401  (Ray adds its console handlers when imported)
        ray_logger = logging.getLogger("ray")
        self._handler = logging.FileHandler(self.uri, mode="a")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.addHandler(self._handler)
        for h in ray_logger.handlers:  # Ray's console handlers: warnings and errors only
            if h is not self._handler and isinstance(h, logging.StreamHandler) \
                    and not isinstance(h, logging.FileHandler):
                self._muted.append((h, h.level))
                h.setLevel(max(h.level, logging.WARNING))
        return self

    def __exit__(self, *exc):
        if not self.quiet:
            return
        import logging
        for h, level in self._muted:
            h.setLevel(level)
        logging.getLogger("ray").removeHandler(self._handler)
        self._handler.close()
        self._append_session_logs()

    def _append_session_logs(self) -> None:
        """The local Ray's worker and controller output (Ray's session logs, this job's)."""
        import glob
        import ray
        node = getattr(ray._private.worker, "_global_node", None)  # no public accessor
        if not ray.is_initialized() or node is None:
            return
        job = ray.get_runtime_context().get_job_id()
        files = sorted(glob.glob(os.path.join(node.get_logs_dir_path(), f"worker-*-{job}-*.*")))
        with open(self.uri, "a") as log:
            for path in files:
                if path.endswith((".out", ".err")) and os.path.getsize(path):
                    log.write(f"===== {os.path.basename(path)}\n")
                    with open(path, errors="replace") as f:
                        log.write(f.read())


class PlainProgress:
    """Not a TTY. Rank 0's EpochSink prints one summary line per epoch (with alarms); when the
    workers' output does not reach this console (`echo`), the driver prints those lines from
    metrics.jsonl and alarms.jsonl. `update(seen) -> seen` is the interface RichProgress fills."""

    echo = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.alarms_seen = len(rundir.read_jsonl(cfg.out, ALARMS)) if cfg.out else 0

    def update(self, seen: int) -> int:
        if not self.echo:
            return seen
        records = rundir.read_metrics(self.cfg.out)
        alarms = rundir.read_jsonl(self.cfg.out, ALARMS)

        def show_alarms(upto: int) -> None:
            # each alarm under the line of the epoch that raised it, as rank 0 prints them (rank
            # 0 logs it just after the record: a late one comes with the next poll)
            while self.alarms_seen < len(alarms) and \
                    alarms[self.alarms_seen].get("epoch", -1) <= upto:
                alarm = alarms[self.alarms_seen]
                self.show(f"ALARM [{alarm.get('kind')}] {alarm.get('message')}")
                self.alarms_seen += 1

        if records:
            show_alarms(records[min(seen, len(records)) - 1]["epoch"] if seen else -1)
        for record in records[seen:]:
            self.show(_summary_line(record, self.cfg.train.epochs))
            show_alarms(record["epoch"])
            if run_finished(record, self.cfg) and record["epoch"] + 1 < self.cfg.train.epochs:
                self.show(f"early stopping after epoch {record['epoch'] + 1}/"
                          f"{self.cfg.train.epochs}: {self.cfg.train.best_metric} has not "
                          f"improved for {self.cfg.train.early_stop_patience} epochs")
        return max(seen, len(records))

    def show(self, line: str) -> None:
        print(line, flush=True)


ALARMS = "alarms.jsonl"  # written by rank 0's EpochSink (pipeline.report.live)


def _summary_line(record: dict, epochs: int) -> str:
    try:
        from pipeline.report.live import summary_line
    except ImportError:
        return f"epoch {record['epoch'] + 1}/{epochs} | val_loss {record.get('val_loss')}"
    return summary_line(record, epochs)


class RichProgress(PlainProgress):
    """A rich progress bar over epochs (stderr is a TTY)."""

    def __init__(self, cfg: TrainConfig, bar):
        super().__init__(cfg)
        self.bar = bar
        self.task = bar.add_task("training", total=cfg.train.epochs)

    def update(self, seen: int) -> int:
        seen = super().update(seen)
        records = rundir.read_metrics(self.cfg.out)
        if records:
            r = records[-1]
            self.bar.update(self.task, completed=len(records),
                            description=f"epoch {r['epoch'] + 1} val_loss {r['val_loss']:.4f}")
        return max(seen, len(records))

    def show(self, line: str) -> None:
        self.bar.console.print(line, markup=False, highlight=False)


def summary_json(summary: RunSummary) -> str:
    return json.dumps({"out": summary.out, "run_id": summary.run_id,
                       "best_checkpoint": summary.best_checkpoint, "report": summary.report})
