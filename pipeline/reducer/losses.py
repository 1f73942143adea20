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


AUTO = "auto"


@dataclass
class LossConfig(LossSection):
    """The run config's `loss:` section (`pipeline.config.LossSection`: one source of the
    defaults), checked on construction. `span_pos_weight` and `type_class_weight` may still be
    "auto" here; `resolve_auto_weights` turns them into numbers from the train split's counts
    before a run starts (and the numbers are what config.yaml records)."""

    def __post_init__(self):
        if self.countdown_scale not in COUNTDOWN_SCALES:
            raise UserError(f"loss.countdown_scale must be one of {list(COUNTDOWN_SCALES)}, "
                            f"got {self.countdown_scale!r}")
        names = ["pointer_delta", "countdown_delta"]
        if self.span_pos_weight != AUTO:
            names.append("span_pos_weight")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"loss.{name} must be > 0{' or auto' if name == 'span_pos_weight' else ''}, "
                                f"got {value!r}")
        w = self.type_class_weight
        if w not in (None, AUTO) and (not isinstance(w, (list, tuple)) or not w or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in w)):
            raise UserError(f"loss.type_class_weight must be auto, null or a list of weights "
                            f">= 0 (one per class), got {w!r}")


def resolve_auto_weights(loss: LossSection, train_counts: dict, num_classes: int) -> dict:
    """The numbers "auto" stands for, from the train split's label counts (manifest
    `label_counts.train`): span_pos_weight = span negatives / positives (valid bars of labeled
    windows outside / inside their expansion), type_class_weight = inverse class frequency
    normalised so the labeled windows' mean weight is 1 (n / (K n_k) over the K classes that
    occur; 1.0 for a class that never does: it is never a target). Only "auto" fields change."""
    out = {}
    if loss.span_pos_weight == AUTO:
        pos, neg = train_counts.get("in_span_bars", 0), train_counts.get("out_span_bars", 0)
        out["span_pos_weight"] = round(neg / pos, 4) if pos > 0 and neg > 0 else 1.0
    if loss.type_class_weight == AUTO:
        counts = list(train_counts.get("classes", []))[:num_classes]
        counts += [0] * (num_classes - len(counts))
        present = [c for c in counts if c > 0]
        n = sum(present)
        out["type_class_weight"] = [round(n / (len(present) * c), 4) if c > 0 else 1.0
                                    for c in counts] if present else None
    return out


def element_losses(outputs: dict, batch: dict, cfg: LossConfig,
                   class_weight: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per task: (per-element loss values, mask of the elements that count). `class_weight`:
    the type loss's per-class weights as a device tensor made once (MultiTaskModel keeps it),
    so no tensor is built from Python values inside a captured step; None: from `cfg`."""
    # "auto" is resolved from the data before a run starts (trainer); a LossConfig used outside
    # a run (tests, benches) without resolving it counts as unweighted
    pos_weight_value = 1.0 if cfg.span_pos_weight == AUTO else cfg.span_pos_weight
    class_weights = None if cfg.type_class_weight == AUTO else cfg.type_class_weight
    label = batch["label"].long()
    start, end = batch["expansion_start"].long(), batch["expansion_end"].long()
    labeled = label >= 0
    has_span = labeled & (start >= 0)
    out = {}
    if "type_logits" in outputs:
        # clamp: an unlabeled row (-1) needs some valid class index; the mask drops it.
        if class_weight is None and class_weights is not None:
            class_weight = outputs["type_logits"].new_tensor(class_weights)
        # weighted per element: w[y] * CE; with mean weight 1 over train it stays a mean
        ce = F.cross_entropy(outputs["type_logits"], label.clamp(min=0), weight=class_weight,
                             reduction="none")
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
        pos_weight = logits.new_full((), pos_weight_value)
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


def reduced_losses(outputs: dict, batch: dict, cfg: LossConfig, tasks, class_weight=None
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """`task_losses` with one all-reduce for all tasks' counts, and the statistics behind it:
    (losses, stats, present). `stats`: float64 [2, T] of this rank's element sums (detached) and
    counts per task in `tasks` order, which the loop adds up over an epoch for exact per-element
    epoch means; `present`: bool [T], the task has at least one element in the global batch."""
    elements = element_losses(outputs, batch, cfg, class_weight)
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
