"""A finished (or running) run directory, read once for the report and the comparison.

Everything goes through `pipeline.storage`, so RUN can be a local path or `s3://bucket/prefix`.
The report is tolerant of what a record holds (older runs, disabled tasks, strategies without
log-variances): helpers return None for what is absent and `Run.missing` says what was not there.
What is *broken* (a metrics line that is not JSON, an unreadable predictions file) is a
`UserError` naming the file and line: a report silently built from half a file would mislead.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import yaml

from pipeline import storage
from pipeline.errors import UserError

TASKS = ("type", "pointer", "span", "countdown")
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
PREDICTIONS = "best_val_predictions.npz"
ALARMS = "alarms.jsonl"
REPORT = "report.html"


@dataclass
class Run:
    uri: str
    records: list[dict]
    config: dict | None = None
    manifest: dict | None = None
    predictions: dict[str, np.ndarray] | None = None
    logged_alarms: list[dict] = field(default_factory=list)
    evaluations: dict[str, dict] = field(default_factory=dict)  # split -> RUN/eval/<split>.json
    threshold: dict | None = None                                # RUN/threshold.json
    missing: list[str] = field(default_factory=list)   # files not in the run directory
    notes: list[str] = field(default_factory=list)     # anything else left out, and why

    @property
    def name(self) -> str:
        return storage.basename(self.uri) or self.uri

    @property
    def tasks(self) -> list[str]:
        """Tasks that appear in any record's losses, in the canonical order."""
        seen = set()
        for r in self.records:
            for key in ("train", "val"):
                if isinstance(r.get(key), dict):
                    seen.update(r[key])
        return [t for t in TASKS if t in seen] + sorted(seen - set(TASKS) - {"total"})

    @property
    def epochs(self) -> list[int]:
        return [int(r.get("epoch", i)) for i, r in enumerate(self.records)]

    @property
    def best_epoch(self) -> int | None:
        """The run's own choice (`best_epoch` in the last record, or the last `best: true`)."""
        if not self.records:
            return None
        last = self.records[-1].get("best_epoch")
        if isinstance(last, (int, float)):
            return int(last)
        flagged = [int(r.get("epoch", i)) for i, r in enumerate(self.records) if r.get("best") is True]
        if flagged:
            return flagged[-1]
        if self.predictions is not None and "epoch" in self.predictions:
            return int(self.predictions["epoch"])
        return None

    @property
    def weighting(self) -> str | None:
        loss = (self.config or {}).get("loss") or {}
        return loss.get("weighting")

    def record_at(self, epoch: int | None) -> dict | None:
        for i, r in enumerate(self.records):
            if int(r.get("epoch", i)) == epoch:
                return r
        return None


def lookup(record: dict | None, path: str):
    """`lookup(r, "val.span")` -> r["val"]["span"], or None when any part is absent.

    Task metrics sit at the top level of a record (`span.f1`, as the trainer writes them) or
    under `metrics` (`metrics.span.f1`); both are found.
    """
    for candidate in (path, f"metrics.{path}"):
        value = record
        for part in candidate.split("."):
            if not isinstance(value, dict) or part not in value:
                value = None
                break
            value = value[part]
        if value is not None:
            return value
    return None


def number(value) -> float | None:
    """A plottable float, or None (None, bools, strings and lists are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def series(records: list[dict], path: str) -> list[float]:
    """One value per record (NaN where absent), so curves keep their x positions."""
    out = []
    for r in records:
        v = number(lookup(r, path))
        out.append(math.nan if v is None else v)
    return out


def has_series(records: list[dict], path: str) -> bool:
    return any(number(lookup(r, path)) is not None for r in records)


def shown_epoch(epoch) -> int:
    """The epoch as a person reads it: records count epochs from 0 (`metrics.jsonl` `epoch`,
    `alarms.jsonl`), everything printed or drawn counts from 1, like the progress bar and the
    checkpoint names."""
    return int(epoch) + 1


def epochs_text(n: int) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{n} epoch{'' if n == 1 else 's'}"


@dataclass
class Progress:
    epochs_done: int        # records in metrics.jsonl
    last_epoch: int | None  # 0-based `epoch` of the newest record
    total: int | None       # train.epochs of the run's config.yaml

    def __str__(self) -> str:
        if self.last_epoch is None:
            return "no epoch finished yet" + (f" (of {self.total})" if self.total else "")
        total = f" of {self.total}" if self.total else ""
        return f"epoch {shown_epoch(self.last_epoch)}{total} done"


def run_progress(uri: str) -> Progress | None:
    """How far the run in `uri` has got, from its metrics.jsonl and config.yaml; None when the
    run directory cannot be read from here (a path only the cluster sees, no credentials)."""
    try:
        if not storage.exists(uri):
            return None
        metrics_uri = storage.join(uri, METRICS)
        records = _read_metrics(metrics_uri)[0] if storage.exists(metrics_uri) else []
        config_uri = storage.join(uri, CONFIG)
        config = yaml.safe_load(storage.read_text(config_uri)) if storage.exists(config_uri) else {}
    except (UserError, yaml.YAMLError):
        return None
    total = ((config or {}).get("train") or {}).get("epochs")
    last = records[-1].get("epoch", len(records) - 1) if records else None
    return Progress(len(records), None if last is None else int(last),
                    int(total) if isinstance(total, int) else None)


def load_run(uri: str) -> Run:
    """Read RUN's metrics, config, manifest, predictions and logged alarms."""
    uri = str(uri).rstrip("/") or str(uri)
    metrics_uri = storage.join(uri, METRICS)
    if not storage.exists(metrics_uri):
        if not storage.exists(uri):
            raise UserError(f"{uri}: not found; pass a run directory (the --out of `train`)")
        raise UserError(f"{uri}: no {METRICS} here; is this a run directory (the --out of "
                        f"`train`), and has its first epoch finished?")
    records, partial = _read_metrics(metrics_uri)
    if not records:
        raise UserError(f"{metrics_uri}: no epochs recorded yet; run the report after the first "
                        f"epoch has finished")
    run = Run(uri=uri, records=records)
    if partial:
        run.notes.append(f"{METRICS}: its last line is incomplete (a run still writing it?) "
                           f"and was left out")
    run.config = _read_optional(run, CONFIG, lambda b: yaml.safe_load(b.decode("utf-8")))
    run.manifest = _read_optional(run, MANIFEST, lambda b: json.loads(b.decode("utf-8")))
    run.predictions = _read_optional(run, PREDICTIONS, _load_npz)
    alarms_uri = storage.join(uri, ALARMS)
    if storage.exists(alarms_uri):
        run.logged_alarms = _read_jsonl(alarms_uri)
    _read_evaluations(run)
    return run


def _read_evaluations(run: Run) -> None:
    """`evaluate`'s results and the span threshold, when the run has them (optional: a run
    not evaluated yet is not missing anything)."""
    from pipeline.evaluate import EVAL_DIR, THRESHOLD_FILE
    for split in ("test", "val"):
        uri = storage.join(run.uri, EVAL_DIR, f"{split}.json")
        if storage.exists(uri):
            run.evaluations[split] = json.loads(storage.read_bytes(uri))
    uri = storage.join(run.uri, THRESHOLD_FILE)
    if storage.exists(uri):
        run.threshold = json.loads(storage.read_bytes(uri))


def _read_metrics(uri: str) -> tuple[list[dict], bool]:
    """The records, and whether an unterminated last line was left out: a live run appends
    one line per epoch, so a report made mid-run may see half of the newest line."""
    text = storage.read_text(uri)
    body, _, tail = text.rpartition("\n") if not text.endswith("\n") else (text, "", "")
    if tail.strip():
        try:
            json.loads(tail)
        except json.JSONDecodeError:
            return _read_jsonl(uri, body), True
    return _read_jsonl(uri, text), False


def _read_jsonl(uri: str, text: str | None = None) -> list[dict]:
    out = []
    text = storage.read_text(uri) if text is None else text
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{uri} line {n}: not valid JSON ({exc.msg}); fix or remove the "
                            f"line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{uri} line {n}: expected a JSON object, got {type(obj).__name__}")
        out.append(obj)
    return out


def _read_optional(run: Run, name: str, parse):
    uri = storage.join(run.uri, name)
    if not storage.exists(uri):
        run.missing.append(name)
        return None
    data = storage.read_bytes(uri)
    try:
        return parse(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a broken file
        raise UserError(f"{uri}: cannot be read ({type(exc).__name__}: {exc}); delete or "
                        f"replace it") from None


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
