"""Per-element task losses with masks, each reduced by the DDP-exact `element_mean`.

An element is one scalar prediction that has a target:
- type:      one per labeled row (cross-entropy over the classes);
- pointer:   two per labeled row (center, length; Huber, delta 0.08 in window units);
- span:      one per valid bar of a labeled row (BCE with logits, optional pos_weight);
- countdown: one per valid bar of a labeled row (Huber, delta 1).
Unlabeled rows (label == -1) contribute no elements; bars with valid == False (warm-up,
missing data) are not elements. So every task loss is a mean over its own elements, whatever
their number, and a task with no elements in the global batch contributes 0 with a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import LossSection
from pipeline.errors import UserError
from pipeline.reducer.element_mean import (element_mean, global_counts, masked_sum_count,
                                           rank_scaled_mean)
from pipeline.reducer.targets import COUNTDOWN_SCALES, countdown_target, pointer_target, span_target


@dataclass
class LossConfig(LossSection):
    """The run config's `loss:` section (`pipeline.config.LossSection`: one source of the
    defaults), checked on construction."""

    def __post_init__(self):
        if self.countdown_scale not in COUNTDOWN_SCALES:
            raise UserError(f"loss.countdown_scale must be one of {list(COUNTDOWN_SCALES)}, "
                            f"got {self.countdown_scale!r}")
        for name in ("span_pos_weight", "pointer_delta", "countdown_delta"):
            if not getattr(self, name) > 0:
                raise UserError(f"loss.{name} must be > 0, got {getattr(self, name)}")


def element_losses(outputs: dict, batch: dict, cfg: LossConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per task: (per-element loss values, mask of the elements that count)."""
    label = batch["label"].long()
    start, end = batch["expansion_start"].long(), batch["expansion_end"].long()
    labeled = label >= 0
    has_span = labeled & (start >= 0)
    out = {}
    if "type_logits" in outputs:
        # clamp: an unlabeled row (-1) needs some valid class index; the mask drops it.
        ce = F.cross_entropy(outputs["type_logits"], label.clamp(min=0), reduction="none")
        out["type"] = (ce, labeled)
    if "pointers" in outputs:
        target = pointer_target(start, end).to(outputs["pointers"].dtype)
        huber = F.huber_loss(outputs["pointers"], target, delta=cfg.pointer_delta, reduction="none")
        out["pointer"] = (huber, has_span.unsqueeze(1).expand_as(huber))
    bar_mask = None
    if "span_logits" in outputs or "countdown" in outputs:
        valid = batch.get("valid")
        bar_mask = has_span.unsqueeze(1)
        if valid is not None:
            bar_mask = bar_mask & valid.to(torch.bool)
    if "span_logits" in outputs:
        logits = outputs["span_logits"]
        # new_full, not torch.tensor(..., device=): no host-to-device copy inside a CUDA graph
        pos_weight = logits.new_full((), cfg.span_pos_weight)
        target = span_target(start, end).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                                 pos_weight=pos_weight)
        out["span"] = (bce, bar_mask.expand_as(bce))
    if "countdown" in outputs:
        pred = outputs["countdown"]
        target = countdown_target(start, cfg.countdown_scale).to(pred.dtype)
        huber = F.huber_loss(pred, target, delta=cfg.countdown_delta, reduction="none")
        out["countdown"] = (huber, bar_mask.expand_as(huber))
    return out


def task_losses(outputs: dict, batch: dict, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Per task: the mean over its valid elements of the global batch (`element_mean`)."""
    return {task: element_mean(values, mask)
            for task, (values, mask) in element_losses(outputs, batch, cfg).items()}


def reduced_losses(outputs: dict, batch: dict, cfg: LossConfig, tasks
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """`task_losses` with one all-reduce for all tasks' counts, and the statistics behind it:
    (losses, stats, present). `stats`: float64 [2, T] of this rank's element sums (detached) and
    counts per task in `tasks` order, which the loop adds up over an epoch for exact per-element
    epoch means; `present`: bool [T], the task has at least one element in the global batch."""
    elements = element_losses(outputs, batch, cfg)
    sums, counts = zip(*(masked_sum_count(*elements[t]) for t in tasks))
    counts = torch.stack(counts)
    total = global_counts(counts)
    losses = {t: rank_scaled_mean(sums[i], total[i]) for i, t in enumerate(tasks)}
    stats = torch.stack([torch.stack([s.detach().double() for s in sums]), counts])
    return losses, stats, total > 0


def element_counts(batch: dict, tasks, window: int = 105) -> dict[str, int]:
    """Local number of elements per task in `batch` (diagnostics and tests)."""
    labeled = batch["label"] >= 0
    has_span = labeled & (batch["expansion_start"] >= 0)
    valid = batch.get("valid")
    bars = (has_span.unsqueeze(1) & valid.bool()).sum() if valid is not None else has_span.sum() * window
    per_task = {"type": labeled.sum(), "pointer": 2 * has_span.sum(), "span": bars, "countdown": bars}
    return {t: int(per_task[t]) for t in tasks}
