"""Task metrics as sufficient statistics: sums and counts on the device, one flat tensor.

`update()` only adds to a float64 tensor on the model's device (no `.item()`, no boolean
indexing, so nothing waits for the host per step); `state()` is that tensor; states add, so the
trainer all-reduces it once per epoch and `compute()` turns the sum into the numbers. Metrics
over a split computed this way are exact whatever the number of workers (a mean of per-rank
means would not be).

What is scored (conventions from `pipeline.reducer.targets`):
- a *window* is a labeled row (label >= 0) with an expansion (start >= 0); a *bar* is a valid
  bar of such a window (`valid` False: warm-up or missing data, not scored);
- span: p = sigmoid(span_logits), predicted in-span where p > 0.5. Precision/recall/F1 pooled
  over all bars, and the same three computed per window and averaged over windows (a window with
  no predicted or no true positive scores 0 there, as in the old training scripts). A window
  whose expansion lies wholly in bars that are not scored (the warm-up bars of window-only data)
  has no target to find: it is left out of the per-window figures, whatever the model predicts,
  and counted in `windows_unscored`; probability separation = mean p over in-span bars - mean p
  over out-of-span bars;
- pointer: (center, length) -> predicted start/end bars `round(c*105 -/+ l*105/2)` (round half
  to even); Hit@±3 for start, end and both; center and length MAE in bars (x 105); the standard
  deviation of the predicted center and length across windows (bars: a collapsed pointer ~0);
- countdown: MAE in bars against the clipped bars-to-start target, the prediction converted back
  from the unit scale (x 40 - 20) when the loss used it;
- type: a confusion matrix over labeled rows -> accuracy, macro F1 (averaged over the classes
  that occur in the targets: a prediction of a class that is never a target counts against the
  true class's recall, not as a class of its own), per-class recall, balanced accuracy (mean
  recall over the target classes), `top_class_share` (share of windows given the most predicted
  class).

`compute()` returns nested dicts, merged into each metrics.jsonl record at the top level:
  {"span": {"precision", "recall", "f1", "window_precision", "window_recall", "window_f1",
            "prob_separation", "bars", "windows", "windows_unscored"},
   "pointer": {"hit3_start", "hit3_end", "hit3_both", "center_mae_bars", "length_mae_bars",
               "center_std_bars", "length_std_bars", "windows"},
   "countdown": {"mae_bars", "bars"},
   "type": {"accuracy", "balanced_accuracy", "f1_macro", "recall": [per class],
            "top_class_share", "samples"}}
only for the tasks given; a value with nothing to score is None (JSON null), never NaN.
"""

from __future__ import annotations

import torch

from pipeline.reducer.targets import COUNTDOWN_CLIP, WINDOW, countdown_target, span_target

TASKS = ("type", "pointer", "span", "countdown")
HIT_TOLERANCE_BARS = 3
SPAN_THRESHOLD = 0.5

# Layout of the flat state: name -> slot. The type confusion matrix follows, C x C.
_SLOTS = [
    "span_tp", "span_fp", "span_fn", "span_p_in", "span_n_in", "span_p_out", "span_n_out",
    "win_precision", "win_recall", "win_f1", "win_n", "win_unscored",
    "hit_start", "hit_end", "hit_both", "center_abs", "length_abs", "ptr_n",
    "center_sum", "center_sq", "length_sum", "length_sq",
    "cd_abs", "cd_n",
]
_S = {name: i for i, name in enumerate(_SLOTS)}
CONFUSION_OFFSET = len(_SLOTS)  # where the C x C type confusion matrix starts in the state


def _ratio(num: float, den: float) -> float:
    """num/den, 0 when den is 0 (the zero-division convention of the old span metrics)."""
    return float(num / den) if den > 0 else 0.0


def _mean(total: float, count: float) -> float | None:
    return float(total / count) if count > 0 else None


class TaskMetrics:
    def __init__(self, tasks=TASKS, num_classes: int = 3, countdown_scale: str = "unit",
                 device: torch.device | str | None = None, span_threshold: float = SPAN_THRESHOLD):
        if countdown_scale not in ("unit", "raw"):
            raise ValueError(f"countdown_scale must be 'unit' or 'raw', got {countdown_scale!r}")
        self.tasks = tuple(tasks)
        self.num_classes = num_classes
        self.countdown_scale = countdown_scale
        self.span_threshold = float(span_threshold)  # a bar is predicted in-span above it
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._state = torch.zeros(len(_SLOTS) + num_classes * num_classes, dtype=torch.float64,
                                  device=self.device)

    def reset(self) -> None:
        self._state.zero_()

    def state(self) -> torch.Tensor:
        """The flat sufficient statistics (float64, on the device). States of disjoint
        batches add: all-reduce (SUM) them to get the statistics of the union."""
        return self._state

    # --- accumulate ------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, outputs: dict, batch: dict) -> None:
        label = batch["label"].to(self.device).long()
        start = batch["expansion_start"].to(self.device).long()
        end = batch["expansion_end"].to(self.device).long()
        window = (label >= 0) & (start >= 0)  # [B]
        outputs = {k: v.to(self.device) if torch.is_tensor(v) else v  # no-op when already there
                   for k, v in outputs.items()}
        if "type" in self.tasks and "type_logits" in outputs:
            self._update_type(outputs["type_logits"], label)
        if "pointer" in self.tasks and "pointers" in outputs:
            self._update_pointer(outputs["pointers"], start, end, window)
        if ("span" in self.tasks and "span_logits" in outputs) or \
                ("countdown" in self.tasks and "countdown" in outputs):
            valid = batch.get("valid")
            bars = window.unsqueeze(1).expand(-1, WINDOW)
            if valid is not None:
                bars = bars & valid.to(self.device).bool()
            bars = bars.double()  # [B,105] 1 where a bar is scored
            if "span" in self.tasks and "span_logits" in outputs:
                self._update_span(outputs["span_logits"], start, end, bars, window)
            if "countdown" in self.tasks and "countdown" in outputs:
                pred = outputs["countdown"].double()
                if self.countdown_scale == "unit":
                    pred = pred * (2 * COUNTDOWN_CLIP) - COUNTDOWN_CLIP
                target = countdown_target(start, "raw").double()
                self._add("cd_abs", ((pred - target).abs() * bars).sum())
                self._add("cd_n", bars.sum())

    def _add(self, slot: str, value: torch.Tensor) -> None:
        self._state[_S[slot]] += value

    def _update_type(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        c = self.num_classes
        pred = logits.argmax(dim=1)
        labeled = (label >= 0).double()
        cell = label.clamp(min=0) * c + pred  # row = true class, column = predicted
        confusion = self._state[len(_SLOTS):]
        confusion.index_add_(0, cell, labeled)

    def _update_pointer(self, pointers, start, end, window) -> None:
        w = window.double()
        p = pointers.double()
        center, length = p[:, 0] * WINDOW, p[:, 1] * WINDOW
        pred_start = torch.round(center - length / 2)
        pred_end = torch.round(center + length / 2)
        s, e = start.double(), end.double()
        hit_s = ((pred_start - s).abs() <= HIT_TOLERANCE_BARS).double()
        hit_e = ((pred_end - e).abs() <= HIT_TOLERANCE_BARS).double()
        self._add("hit_start", (hit_s * w).sum())
        self._add("hit_end", (hit_e * w).sum())
        self._add("hit_both", (hit_s * hit_e * w).sum())
        self._add("center_abs", ((center - (s + e) / 2).abs() * w).sum())
        self._add("length_abs", ((length - (e - s)).abs() * w).sum())
        self._add("ptr_n", w.sum())
        # spread of the predictions across windows (a pointer collapsed to one value: std ~ 0)
        self._add("center_sum", (center * w).sum())
        self._add("center_sq", (center * center * w).sum())
        self._add("length_sum", (length * w).sum())
        self._add("length_sq", (length * length * w).sum())

    def _update_span(self, logits, start, end, bars, window) -> None:
        prob = torch.sigmoid(logits.double())
        pred = (prob > self.span_threshold).double()
        true = span_target(start, end).double()
        tp = pred * true * bars
        fp = pred * (1 - true) * bars
        fn = (1 - pred) * true * bars
        self._add("span_tp", tp.sum())
        self._add("span_fp", fp.sum())
        self._add("span_fn", fn.sum())
        self._add("span_p_in", (prob * true * bars).sum())
        self._add("span_n_in", (true * bars).sum())
        self._add("span_p_out", (prob * (1 - true) * bars).sum())
        self._add("span_n_out", ((1 - true) * bars).sum())
        # per window: only windows with a scored in-span bar (else F1 is 0 for any prediction)
        wtp, wfp, wfn = tp.sum(1), fp.sum(1), fn.sum(1)
        has_target = ((true * bars).sum(1) > 0).double()
        scored = window.double() * has_target
        self._add("win_unscored", (window.double() * (1 - has_target)).sum())
        safe = lambda num, den: torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))  # noqa: E731
        self._add("win_precision", (safe(wtp, wtp + wfp) * scored).sum())
        self._add("win_recall", (safe(wtp, wtp + wfn) * scored).sum())
        self._add("win_f1", (safe(2 * wtp, 2 * wtp + wfp + wfn) * scored).sum())
        self._add("win_n", scored.sum())

    # --- results ---------------------------------------------------------------------------

    def compute(self, state: torch.Tensor | None = None) -> dict:
        """The metrics from `state` (already summed over ranks). Without a state: this object's
        own, all-reduced over the process group when one is running (one collective)."""
        if state is None:
            state = self._state.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(state)
        v = state.detach().double().cpu()  # the one host sync
        s = {name: float(v[i]) for name, i in _S.items()}
        out = {}
        if "span" in self.tasks:
            tp, fp, fn = s["span_tp"], s["span_fp"], s["span_fn"]
            bars = s["span_n_in"] + s["span_n_out"]
            p_in, p_out = _mean(s["span_p_in"], s["span_n_in"]), _mean(s["span_p_out"], s["span_n_out"])
            out["span"] = {
                "precision": _ratio(tp, tp + fp) if bars else None,
                "recall": _ratio(tp, tp + fn) if bars else None,
                "f1": _ratio(2 * tp, 2 * tp + fp + fn) if bars else None,
                "window_precision": _mean(s["win_precision"], s["win_n"]),
                "window_recall": _mean(s["win_recall"], s["win_n"]),
                "window_f1": _mean(s["win_f1"], s["win_n"]),
                "prob_separation": p_in - p_out if p_in is not None and p_out is not None else None,
                "bars": int(bars), "windows": int(s["win_n"]),
                "windows_unscored": int(s["win_unscored"]),
            }
        if "pointer" in self.tasks:
            n = s["ptr_n"]
            out["pointer"] = {
                "hit3_start": _mean(s["hit_start"], n), "hit3_end": _mean(s["hit_end"], n),
                "hit3_both": _mean(s["hit_both"], n),
                "center_mae_bars": _mean(s["center_abs"], n),
                "length_mae_bars": _mean(s["length_abs"], n), "windows": int(n),
                "center_std_bars": _std(s["center_sum"], s["center_sq"], n),
                "length_std_bars": _std(s["length_sum"], s["length_sq"], n),
            }
        if "countdown" in self.tasks:
            out["countdown"] = {"mae_bars": _mean(s["cd_abs"], s["cd_n"]), "bars": int(s["cd_n"])}
        if "type" in self.tasks:
            out["type"] = _type_metrics(v[len(_SLOTS):].view(self.num_classes, self.num_classes))
        return out


def _std(total: float, squares: float, count: float) -> float | None:
    if count <= 0:
        return None
    mean = total / count
    return float(max(squares / count - mean * mean, 0.0) ** 0.5)


def _type_metrics(confusion: torch.Tensor) -> dict:
    total = float(confusion.sum())
    if total == 0:
        return {"accuracy": None, "balanced_accuracy": None, "f1_macro": None,
                "recall": [None] * confusion.shape[0], "top_class_share": None, "samples": 0}
    diag = confusion.diagonal()
    true_counts, pred_counts = confusion.sum(1), confusion.sum(0)
    f1s = [_ratio(2 * float(diag[k]), float(true_counts[k] + pred_counts[k]))
           for k in range(confusion.shape[0]) if true_counts[k] > 0]
    recall = [_mean(float(diag[k]), float(true_counts[k])) for k in range(confusion.shape[0])]
    present = [r for r in recall if r is not None]
    return {
        "accuracy": float(diag.sum()) / total,
        # mean recall over the target classes: 0.5 for a one-class predictor on two classes
        "balanced_accuracy": sum(present) / len(present),
        "f1_macro": sum(f1s) / len(f1s),
        "recall": recall,
        # the share of windows given the most predicted class (1.0: one class for everything)
        "top_class_share": float(pred_counts.max()) / total,
        "samples": int(total),
    }
