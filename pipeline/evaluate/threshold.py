"""The span threshold: chosen on val (window F1), stored in the run, applied unchanged on test.

A fixed 0.5 suits a calibrated model of balanced bars; with 3% of bars in span a model (and the
base-rate baseline) may never cross it, and span F1 reads 0 although the probabilities separate.
The threshold that maximises the mean per-window F1 on the val split is chosen once, at the end
of training, from the best epoch's val predictions, written to RUN/threshold.json and shown in
the report; `evaluate` applies it to test as it is (choosing it on test would be optimistic).
"""

from __future__ import annotations

import json

import numpy as np

from pipeline import storage

THRESHOLD_FILE = "threshold.json"
GRID = tuple(round(x, 2) for x in np.arange(0.05, 0.951, 0.05))


def window_f1(prob: np.ndarray, batch: dict, threshold: float) -> float | None:
    """Mean per-window span F1 at `threshold` over windows with a scored in-span bar (the
    definition of `TaskMetrics`' window_f1), None when there is none."""
    label, start, end = (np.asarray(batch[k]) for k in ("label", "expansion_start", "expansion_end"))
    bars = np.asarray(batch["valid"]).astype(bool) & ((label >= 0) & (start >= 0))[:, None]
    pos = np.arange(prob.shape[1])[None, :]
    true = (pos >= start[:, None]) & (pos <= end[:, None]) & bars
    keep = true.any(1)
    if not keep.any():
        return None
    pred = (prob > threshold) & bars
    tp = (pred & true).sum(1)
    denom = pred.sum(1) + true.sum(1)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[keep].mean())


def choose_threshold(prob: np.ndarray, batch: dict) -> float:
    """The grid value with the highest val window F1 (ties: the one nearest 0.5)."""
    scored = [(window_f1(prob, batch, t), -abs(t - 0.5), t) for t in GRID]
    scored = [s for s in scored if s[0] is not None]
    return max(scored)[2] if scored else 0.5


def write_threshold(out: str, threshold: float, source: str) -> None:
    storage.write_text_atomic(storage.join(out, THRESHOLD_FILE), json.dumps(
        {"span_threshold": threshold, "chosen_on": "val", "criterion": "window_f1",
         "source": source}, indent=2) + "\n")


def read_threshold(out: str) -> dict | None:
    uri = storage.join(out, THRESHOLD_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def threshold_from_predictions(out: str) -> float | None:
    """Choose from RUN/best_val_predictions.npz (the best epoch's val predictions) and store it;
    None when the run has none (no epoch scored)."""
    import io

    from pipeline.train.rundir import PREDICTIONS
    uri = storage.join(out, PREDICTIONS)
    if not storage.exists(uri):
        return None
    arrays = np.load(io.BytesIO(storage.read_bytes(uri)))
    if "span_prob" not in arrays or arrays["span_prob"].size == 0:
        return None
    threshold = choose_threshold(arrays["span_prob"], arrays)
    write_threshold(out, threshold, f"{PREDICTIONS} (epoch {int(arrays['epoch']) + 1})")
    return threshold
