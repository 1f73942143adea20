"""The run directory (local path or s3://) as the worker loop and the driver see it.

Layout (docs/internals.md "Run directory"): config.yaml, metrics.jsonl, manifest.json,
best_val_predictions.npz, checkpoint_* (Ray Train storage: storage_path = parent of OUT,
name = basename of OUT), workers/rank*.json (which process runs which rank, for operators and
the fault tests), report.html.
"""

from __future__ import annotations

import io
import json
import os
import socket
import re
import time

import numpy as np

from pipeline import storage

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
MANIFEST = "manifest.json"
PREDICTIONS = "best_val_predictions.npz"
REPORT = "report.html"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's checkpoint bookkeeping
CHECKPOINT_NAME = re.compile(r"^checkpoint_e\d{4}_s\d{8}$")  # checkpoint.checkpoint_name()


def read_metrics(out: str) -> list[dict]:
    return read_jsonl(out, METRICS)


def read_jsonl(out: str, name: str) -> list[dict]:
    """OUT/name's JSON lines; a last line still being written is not one yet."""
    uri = storage.join(out, name)
    if not storage.exists(uri):
        return []
    records = []
    for line in storage.read_text(uri).splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
    return records


class MetricsLog:
    """metrics.jsonl, one JSON object per epoch, written by rank 0 only.

    On a (re)start the records of epochs that the checkpoint does not cover are dropped: a
    worker that died after writing epoch e's line but before its checkpoint will write it again.
    """

    def __init__(self, out: str, keep_before_epoch: int):
        self.uri = storage.join(out, METRICS)
        self.records = [r for r in read_metrics(out) if r["epoch"] < keep_before_epoch]
        self._write_all()

    def append(self, record: dict) -> None:
        self.records.append(record)
        line = json.dumps(record, sort_keys=True) + "\n"
        if storage.is_s3(self.uri):
            self._write_all()  # S3 has no append: rewrite the (small) object whole
        else:
            with open(self.uri, "a") as f:
                f.write(line)
                f.flush()

    def _write_all(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        storage.write_text_atomic(self.uri, text)


def write_worker_marker(out: str, rank: int, world: int) -> None:
    """workers/rank{R}.json: pid and host of the process now running this rank."""
    storage.write_json_atomic(storage.join(out, "workers", f"rank{rank}.json"), {
        "rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.time()})


def write_predictions(out: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    storage.write_bytes_atomic(storage.join(out, PREDICTIONS), buf.getvalue())


def checkpoint_dirs(out: str) -> list[str]:
    """checkpoint_* directory names under OUT, oldest first."""
    if not storage.exists(out):
        return []
    return sorted(n for n in storage.listdir(out) if CHECKPOINT_NAME.match(n))


def ray_latest_checkpoint(out: str) -> str | None:
    """The checkpoint Ray Train restores a run from (workers >= 1): the latest one its snapshot
    lists. No snapshot, or one this Ray cannot read: Ray starts the run fresh, and so None."""
    uri = storage.join(out, RAY_SNAPSHOT)
    if not storage.exists(uri):
        return None
    try:
        latest = json.loads(storage.read_text(uri)).get("latest_checkpoint_result") or {}
    except ValueError:
        return None
    name = latest.get("checkpoint_dir_name")
    return name if isinstance(name, str) and CHECKPOINT_NAME.match(name) else None
