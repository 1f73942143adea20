"""Live signals during training: the per-epoch hook and the per-epoch progress bar.

`EpochSink(run_dir, config)` is what rank 0 calls after appending each metrics record
(docs/internals.md "Epoch hook"). `on_epoch(record)`:
- prints one summary line (per-task losses and weights, the headline metrics, throughput);
- checks the balance alarms and prints each one the epoch it is first raised, appending it to
  RUN/alarms.jsonl (the report lists them at the top);
- writes TensorBoard scalars under RUN/tb/ and, when MLFLOW_TRACKING_URI is set and mlflow is
  installed, logs the same scalars to MLflow;
- returns the messages of every alarm active at this epoch.

Telemetry must not end a long run: a failing TensorBoard or MLflow writer prints one warning
and is switched off; the summary line and the alarms keep going.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import IO, Iterator

from pipeline import storage
from pipeline.report.alarms import Alarm, AlarmChecker, AlarmConfig
from pipeline.report.run import ALARMS, METRICS, TASKS, lookup, number, shown_epoch
from pipeline.report.tensorboard import scalars

SHORT = {"type": "type", "pointer": "ptr", "span": "span", "countdown": "cd"}


def _g(value) -> str:
    v = number(value)
    return "-" if v is None else f"{v:.3g}"


def summary_line(record: dict, total_epochs: int | None = None) -> str:
    """`epoch 3/20 | train type 0.91 ptr 0.015 ... | val ... | w ... | span F1 0.21 | 410 samples/s`

    The epoch counts from 1 (the record's `epoch` counts from 0), like the progress bar."""
    tasks = [t for t in TASKS if t in (record.get("train") or {})] or \
        [t for t in (record.get("train") or {})]
    epoch = record.get("epoch")
    shown = "?" if number(epoch) is None else str(shown_epoch(epoch))
    parts = [f"epoch {shown}" + (f"/{total_epochs}" if total_epochs else "")]
    for key, label in (("train", "train"), ("val", "val"), ("weights", "w")):
        block = record.get(key) or {}
        if block:
            parts.append(label + " " + " ".join(f"{SHORT.get(t, t)} {_g(block.get(t))}"
                                                for t in tasks if t in block))
    headline = [("span F1", "span.f1"), ("sep", "span.prob_separation"),
                ("hit3", "pointer.hit3_both"), ("cd MAE", "countdown.mae_bars"),
                ("type acc", "type.accuracy")]
    shown = [f"{label} {_g(lookup(record, path))}" for label, path in headline
             if number(lookup(record, path)) is not None]
    if shown:
        parts.append(" ".join(shown))
    tail = []
    if number(record.get("samples_per_s")) is not None:
        tail.append(f"{record['samples_per_s']:.0f} samples/s")
    if number(record.get("epoch_time_s")) is not None:
        tail.append(f"{record['epoch_time_s']:.1f}s")
    if record.get("graphed_steps"):  # CUDA graphs on: say how many steps were replays
        tail.append(f"{record['graphed_steps']} graphed")
    if tail:
        parts.append(" ".join(tail))
    return " | ".join(parts)


class EpochSink:
    def __init__(self, run_dir: str, config: dict | None = None, *,
                 alarm_config: AlarmConfig | None = None, stream: IO[str] | None = None,
                 tensorboard: bool = True):
        self.run_dir = str(run_dir)
        self.stream = stream or sys.stdout
        self.checker = AlarmChecker(alarm_config or AlarmConfig.from_run_config(config))
        self.total_epochs = _total_epochs(config)
        self.alarms_uri = storage.join(self.run_dir, ALARMS)
        self.logged: list[dict] = []
        self._resume()
        self.tb = None
        if tensorboard:
            self.tb = self._guard("TensorBoard", lambda: _tensorboard(self.run_dir))
        self.mlflow = _MLflow.from_env(self.run_dir, config, self._warn)

    def _resume(self) -> None:
        """A resumed run: replay the records already in metrics.jsonl, so streaks (3 epochs
        starving) continue, and keep the alarms already logged so none is logged twice. The
        sink is made before the trainer appends the records it will be given (as the loop does),
        so no epoch is counted twice."""
        if storage.exists(self.alarms_uri):
            text = storage.read_text(self.alarms_uri)
            self.logged = [json.loads(line) for line in text.splitlines() if line.strip()]
        metrics_uri = storage.join(self.run_dir, METRICS)
        if storage.exists(metrics_uri):
            for line in storage.read_text(metrics_uri).splitlines():
                if line.strip():
                    self.checker.check(json.loads(line))

    def on_epoch(self, record: dict) -> list[str]:
        active = self.checker.check(record)
        self._emit(summary_line(record, self.total_epochs))
        raised = {(a.get("kind"), a.get("task")) for a in self.logged}
        for alarm in active:
            if alarm.key not in raised:
                self._emit(f"ALARM [{alarm.kind}] {alarm.message}")
                self._log_alarm(alarm)
        if self.tb is not None and self._guard("TensorBoard", lambda: self.tb.write(record)) is None:
            self.tb = None
        if self.mlflow is not None and not self.mlflow.log(record):
            self.mlflow = None
        return [a.message for a in active]

    def _emit(self, line: str) -> None:
        # stream.write, not print: inside a Ray Train V2 worker `print` is patched to go to
        # the logger *and* (stdout being wrapped) to stdout, so every line reached the driver
        # twice; a plain write reaches it once, through the worker's stdout.
        self.stream.write(line + "\n")
        self.stream.flush()

    def _log_alarm(self, alarm: Alarm) -> None:
        self.logged.append(alarm.to_dict())
        line = json.dumps(alarm.to_dict(), sort_keys=True) + "\n"
        if storage.is_s3(self.alarms_uri):  # S3 has no append: rewrite the small object
            storage.write_text_atomic(self.alarms_uri, "".join(
                json.dumps(a, sort_keys=True) + "\n" for a in self.logged))
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.alarms_uri)), exist_ok=True)
            with open(self.alarms_uri, "a") as f:
                f.write(line)

    def _guard(self, what: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - telemetry never stops training
            self._warn(f"{what} logging switched off: {type(exc).__name__}: {exc}")
            return None

    def _warn(self, message: str) -> None:
        sys.stderr.write(f"warning: {message}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tb is not None:
            self._guard("TensorBoard", self.tb.close)
            self.tb = None
        if self.mlflow is not None:
            self.mlflow.close()
            self.mlflow = None


def _total_epochs(config) -> int | None:
    """train.epochs of a run config (a TrainConfig or its dict), for `epoch 3/20`."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    epochs = ((config or {}).get("train") or {}).get("epochs")
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def _tensorboard(run_dir: str):
    from pipeline.report.tensorboard import TensorBoardLog
    return TensorBoardLog(run_dir)


class _MLflow:
    """MLflow logging when MLFLOW_TRACKING_URI is set (the optional `mlflow` extra)."""

    def __init__(self, mlflow, warn):
        self.mlflow, self.warn = mlflow, warn

    @classmethod
    def from_env(cls, run_dir: str, config: dict | None, warn):
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            return None
        try:
            import mlflow
        except ImportError:
            warn("MLFLOW_TRACKING_URI is set but mlflow is not installed; install the extra "
                 "(pip install 'moola-pipeline[mlflow]') to log there")
            return None
        try:
            from pipeline.config import redact
            if hasattr(config, "to_dict"):
                config = config.to_dict()
            mlflow.start_run(run_name=storage.basename(run_dir))
            params = scalars_and_strings(redact(config or {}))
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        except Exception as exc:  # noqa: BLE001 - an unreachable server must not stop training
            warn(f"MLflow logging switched off: {type(exc).__name__}: {exc}")
            return None
        return cls(mlflow, warn)

    def log(self, record: dict) -> bool:
        try:
            self.mlflow.log_metrics(scalars(record), step=int(record.get("epoch", 0)))
            return True
        except Exception as exc:  # noqa: BLE001
            self.warn(f"MLflow logging switched off: {type(exc).__name__}: {exc}")
            return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mlflow.end_run()


def scalars_and_strings(config: dict, prefix: str = "") -> dict:
    """A nested config flattened to {"train.lr": 0.001, ...} for MLflow params."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(scalars_and_strings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------ progress bar


class _PlainProgress:
    """Non-TTY progress: a line at each quarter of the epoch (readable in logs and CI)."""

    def __init__(self, total: int, epoch: int, stream: IO[str]):
        self.total, self.stream, self.done, self.next_mark = total, stream, 0, 1
        self.epoch = shown_epoch(epoch)

    def advance(self, n: int = 1) -> None:
        self.done += n
        while self.total and self.next_mark <= 4 and self.done * 4 >= self.next_mark * self.total:
            self.stream.write(f"epoch {self.epoch}: {self.done}/{self.total} batches\n")
            self.stream.flush()
            self.next_mark += 1


class _RichProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


@contextlib.contextmanager
def epoch_progress(total_batches: int, epoch: int, stream: IO[str] | None = None) -> Iterator:
    """`with epoch_progress(len(loader), epoch) as bar: ... bar.advance()`: a rich bar when the
    stream (stderr by default) is a terminal, plain quarter-epoch lines otherwise. `epoch` is
    the record's (from 0); the bar shows it from 1."""
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        yield _PlainProgress(total_batches, epoch, stream)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeRemainingColumn
    with Progress(TextColumn(f"epoch {shown_epoch(epoch)}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(file=stream), transient=False) as progress:
        yield _RichProgress(progress, progress.add_task("train", total=total_batches))
