"""Per-window statistics: the rows a bootstrap resamples.

Every metric of `pipeline.train.metrics.TaskMetrics` is a function of summed sufficient
statistics, so the statistics of a set of windows are the sum of each window's own. One row per
window, [n, S], turns a bootstrap resample into a matrix product: the counts of each window in
resample b times the rows, then `TaskMetrics.compute` on each summed row. Decoded events (span
runs matched to the true expansion by IoU) add three columns of their own.

Pure numpy/torch, no Ray: the evaluation of a run, of a baseline and of a bootstrap share it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from pipeline.evaluate.baselines import PRIOR_KEY
from pipeline.train.metrics import CONFUSION_OFFSET, TaskMetrics

EVENT_COLUMNS = ("event_iou", "event_hit", "event_n")
EVENT_IOU_HIT = 0.5  # an expansion is found when a decoded run overlaps it with IoU >= 0.5


@functools.lru_cache(maxsize=64)
def _metrics(tasks: tuple, num_classes: int, countdown_scale: str, threshold: float) -> TaskMetrics:
    """compute() reads only its argument: one instance serves every resample."""
    return TaskMetrics(tasks, num_classes=num_classes, countdown_scale=countdown_scale,
                       span_threshold=threshold)


def window_rows(outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray], tasks,
                num_classes: int, countdown_scale: str, threshold: float) -> np.ndarray:
    """[n, S]: each window's TaskMetrics state, then its EVENT_COLUMNS (span only)."""
    n = len(batch["label"])
    metrics = TaskMetrics(tasks, num_classes=num_classes, countdown_scale=countdown_scale,
                          span_threshold=threshold)
    width = metrics.state().numel()
    rows = np.zeros((n, width + len(EVENT_COLUMNS)))
    if PRIOR_KEY in outputs:  # a random predictor in expectation: p_j into (true class, j)
        label = np.asarray(batch["label"])
        for i in np.flatnonzero(label >= 0):
            start = CONFUSION_OFFSET + label[i] * num_classes
            rows[i, start:start + num_classes] = outputs[PRIOR_KEY][i]
        return rows
    tensors_out = {k: torch.as_tensor(v) for k, v in outputs.items()}
    tensors_in = {k: torch.as_tensor(v) for k, v in batch.items()}
    for i in range(n):
        metrics.reset()
        metrics.update({k: v[i:i + 1] for k, v in tensors_out.items()},
                       {k: v[i:i + 1] for k, v in tensors_in.items()})
        rows[i, :width] = metrics.state().numpy()
    if "span" in tasks and "span_logits" in outputs:
        prob = 1.0 / (1.0 + np.exp(-np.asarray(outputs["span_logits"], np.float64)))
        rows[:, width:] = event_rows(prob, batch, threshold)
    return rows


def event_rows(prob: np.ndarray, batch: dict, threshold: float) -> np.ndarray:
    """[n, 3]: best IoU of a decoded run with the true expansion, hit (IoU >= 0.5), scored (1
    for a labeled window with an expansion). Runs: contiguous valid bars with p > threshold."""
    label, start, end = (np.asarray(batch[k]) for k in ("label", "expansion_start", "expansion_end"))
    valid = np.asarray(batch["valid"]).astype(bool)
    out = np.zeros((len(label), 3))
    for i in range(len(label)):
        if label[i] < 0 or start[i] < 0:
            continue
        best = max((_iou(run, (int(start[i]), int(end[i])))
                    for run in decode_runs(prob[i], valid[i], threshold)), default=0.0)
        out[i] = (best, float(best >= EVENT_IOU_HIT), 1.0)
    return out


def decode_runs(prob: np.ndarray, valid: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """The span mask as expansions: (first, last) bar of each contiguous run above threshold."""
    on = np.concatenate([[False], (prob > threshold) & valid, [False]])
    edges = np.flatnonzero(on[1:] != on[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = min(a[1], b[1]) - max(a[0], b[0]) + 1
    if inter <= 0:
        return 0.0
    return inter / ((a[1] - a[0] + 1) + (b[1] - b[0] + 1) - inter)


def metrics_of(summed: np.ndarray, tasks, num_classes: int, countdown_scale: str,
               threshold: float) -> dict[str, float | None]:
    """Flat {"span.f1": ..., "span.event_hit50": ...} from one summed row."""
    metrics = _metrics(tuple(tasks), num_classes, countdown_scale, threshold)
    width = metrics.state().numel()
    nested = metrics.compute(torch.as_tensor(summed[:width]))
    flat = {f"{task}.{k}": v for task, values in nested.items() for k, v in values.items()
            if not isinstance(v, list)}
    if "span" in tasks:
        iou, hit, n = summed[width:]
        flat["span.event_iou"] = float(iou / n) if n > 0 else None
        flat["span.event_hit50"] = float(hit / n) if n > 0 else None
    return flat
