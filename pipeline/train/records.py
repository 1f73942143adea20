"""One epoch's record: the reduction over ranks, the record itself, and where rank 0 sends it.

The epoch's train and val losses are per-element means over the whole epoch: each step adds its
element-loss sums and element counts per task, and the epoch divides the all-reduced sum by the
all-reduced count once (`pooled_losses`). So the figure is that of one pooled batch over the
split, whatever the batch size, the number of workers, a half-full last batch, batches with only
unlabeled rows, or a resume on another worker count in the middle of the epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import TrainConfig
from pipeline.report.live import EpochSink
from pipeline.train.rundir import MetricsLog
from pipeline.train.runtime import all_reduce_sum


@dataclass
class TrainedEpoch:
    """What one rank's pass over the train split leaves for the record."""
    loss_sums: torch.Tensor   # [2, T] float64 on the device: element-loss sums and counts
    samples: int              # rows this rank trained this epoch, a resumed part included
    resumed_samples: int      # of those, the ones trained before a mid-epoch resume
    time_s: float
    started_at: float
    graphed_steps: int        # steps replayed from the CUDA graph (this rank; 0 when eager)


@dataclass
class EpochTotals:
    """The epoch over all ranks."""
    train: dict            # task -> mean element loss (None: no element)
    val: dict
    train_elements: dict   # task -> element count
    val_elements: dict
    samples: float
    resumed_samples: float


def reduce_epoch(trained: TrainedEpoch, val_sums: torch.Tensor, tasks) -> EpochTotals:
    """One collective for the element sums and counts of train and val and the sample counts."""
    n = trained.loss_sums.numel()
    counts = torch.tensor([trained.samples, trained.resumed_samples], dtype=torch.float64,
                          device=trained.loss_sums.device)
    sums = all_reduce_sum(torch.cat([trained.loss_sums.flatten(), val_sums.flatten(), counts]))
    sums = sums.cpu()
    train, train_elements = pooled_losses(sums[:n], tasks)
    val, val_elements = pooled_losses(sums[n:2 * n], tasks)
    samples, resumed = sums[2 * n:].tolist()
    return EpochTotals(train, val, train_elements, val_elements, samples, resumed)


def pooled_losses(stats: torch.Tensor, tasks) -> tuple[dict, dict]:
    """(per-task mean loss, per-task element count) from all-reduced [2, T] sums and counts
    (flattened or not). A task without an element has no mean: None (JSON null), not 0."""
    sums, counts = stats.reshape(2, -1).double()
    means = {t: (float(sums[i] / counts[i]) if counts[i] > 0 else None)
             for i, t in enumerate(tasks)}
    return means, {t: int(counts[i]) for i, t in enumerate(tasks)}


def epoch_record(*, epoch: int, step: int, world: int, run_id: str, totals: EpochTotals,
                 trained: TrainedEpoch, figures: dict, lr: float) -> dict:
    """The metrics.jsonl record of epoch `epoch` (counted from 0); `figures`: the objective's
    part (loss weights, probe, val task metrics). `best_epoch` is added once it is scored."""
    time_s = trained.time_s
    return {
        "epoch": epoch, "step": step, "world_size": world, "run_id": run_id,
        "train": totals.train, "val": totals.val,
        "val_loss": sum(v for v in totals.val.values() if v is not None),
        "elements": {"train": totals.train_elements, "val": totals.val_elements},
        **figures,
        # the samples this process trained (a resumed epoch's earlier part ran before)
        "samples_per_s": (totals.samples - totals.resumed_samples) / time_s if time_s > 0 else None,
        "epoch_time_s": time_s, "started_at": trained.started_at, "lr": lr,
        "graphed_steps": trained.graphed_steps,
    }


def lookup(record: dict, key: str) -> float | None:
    """The record's value at a dotted key (checked against the record's keys before training);
    None when there was nothing to score (e.g. span F1 with no labeled val window)."""
    value = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None or isinstance(value, bool) or math.isnan(float(value)):
        return None
    return float(value)


def empty_task_warnings(record: dict) -> list[str]:
    """A task with no element in a split this epoch trained or scored on nothing: say so."""
    out = []
    for split, counts in record["elements"].items():
        empty = sorted(t for t, n in counts.items() if n == 0)
        if empty:
            out.append(f"warning: epoch {record['epoch'] + 1}: no {split} element for "
                       f"{', '.join(empty)} (no labeled window with a target): "
                       f"{'its loss is' if len(empty) == 1 else 'their losses are'} not defined")
    return out


class RecordSink:
    """Where records go: on rank 0 metrics.jsonl, then the epoch hook (console line,
    TensorBoard, MLflow, alarms); other ranks keep nothing. Made after the restore: a restarted
    run drops the records its checkpoint does not cover before the hook replays the rest."""

    def __init__(self, cfg: TrainConfig, rank: int, keep_before_epoch: int):
        self.rank = rank
        self.log = MetricsLog(cfg.out, keep_before_epoch=keep_before_epoch) if rank == 0 else None
        self.hook = EpochSink(cfg.out, cfg.to_dict()) if rank == 0 else None

    def publish(self, record: dict) -> None:
        if self.rank != 0:
            return
        for line in empty_task_warnings(record):
            print(line, flush=True)
        self.log.append(record)
        self.hook.on_epoch(record)

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)
