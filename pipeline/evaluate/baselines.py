"""Naive predictors fitted on the train split: what a model must beat to have learned anything.

Each baseline returns model-shaped outputs (logits, pointers, countdown) for the evaluated
windows, so it is scored by exactly the same code as the model:

- type: `majority` (always the most frequent train class) and `prior` (a class drawn at random
  from the train class frequencies, scored by its expected confusion matrix: each window adds
  p_j to (true class, j), so the figure is the draw's expectation, not one lucky draw);
- span: `base_rate` (every bar at the train in-span fraction) and `positional` (each bar position
  at its train in-span frequency: expansions cluster at some positions);
- pointer: `train_mean` (the train-mean center and length for every window);
- countdown: `position_mean` (the train-mean target at each bar position).
The span baselines get their own threshold chosen on val, like the model.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.reducer.targets import countdown_target, pointer_target, span_target

TASK_BASELINES = {"type": ("majority", "prior"), "span": ("base_rate", "positional"),
                  "pointer": ("train_mean",), "countdown": ("position_mean",)}
EPS = 1e-6
PRIOR_KEY = "type_prior"  # outputs key of class probabilities scored by expected confusion


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


class Baselines:
    """Statistics of the train split; `outputs(name, n)` gives a baseline's predictions."""

    def __init__(self, train: dict[str, np.ndarray], num_classes: int, countdown_scale: str):
        label = np.asarray(train["label"])
        start = torch.as_tensor(np.asarray(train["expansion_start"]))
        end = torch.as_tensor(np.asarray(train["expansion_end"]))
        labeled = label >= 0
        self.windows = len(label)
        window = labeled & (start.numpy() >= 0)
        bars = window[:, None] & np.asarray(train["valid"]).astype(bool)
        in_span = span_target(start, end).numpy() > 0.5
        counts = np.bincount(label[labeled], minlength=num_classes).astype(float)
        self.prior = counts / max(counts.sum(), 1)
        self.num_classes = num_classes
        self.base_rate = float((in_span & bars).sum() / max(bars.sum(), 1))
        per_bar = bars.sum(0)
        self.positional = np.where(per_bar > 0, (in_span & bars).sum(0) / np.maximum(per_bar, 1),
                                   self.base_rate)
        target = pointer_target(start, end).numpy()
        self.pointer = target[window].mean(0) if window.any() else np.array([0.5, 0.1])
        cd = countdown_target(start, countdown_scale).numpy()
        self.countdown = np.where(per_bar > 0, (cd * bars).sum(0) / np.maximum(per_bar, 1), 0.0)

    def outputs(self, name: str, n: int) -> dict[str, np.ndarray]:
        if name == "majority":
            return {"type_logits": np.tile(np.eye(self.num_classes)[int(np.argmax(self.prior))],
                                           (n, 1))}
        if name == "prior":  # not logits: `windows.window_rows` scores it in expectation
            return {PRIOR_KEY: np.tile(self.prior, (n, 1))}
        if name == "base_rate":
            return {"span_logits": np.full((n, len(self.positional)), _logit(np.array(self.base_rate)))}
        if name == "positional":
            return {"span_logits": np.tile(_logit(self.positional), (n, 1))}
        if name == "train_mean":
            return {"pointers": np.tile(self.pointer, (n, 1))}
        if name == "position_mean":
            return {"countdown": np.tile(self.countdown, (n, 1))}
        raise KeyError(name)

    def describe(self) -> dict:
        """What each baseline predicts, for the JSON (small numbers only)."""
        return {"windows": self.windows, "type_prior": self.prior.round(4).tolist(), "span_base_rate": round(self.base_rate, 4),
                "pointer_mean": self.pointer.round(4).tolist()}
