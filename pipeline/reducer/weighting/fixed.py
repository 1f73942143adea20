"""`equal` (plain sum of the per-element means) and `fixed` (user weights per task)."""

from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.reducer.weighting.base import Weighting


class EqualWeighting(Weighting):
    name = "equal"

    def task_terms(self, losses, present=None):
        return {t: losses[t] for t in self.tasks}

    def weights(self):
        return {t: 1.0 for t in self.tasks}


class FixedWeighting(Weighting):
    name = "fixed"

    def __init__(self, tasks, weights: dict[str, float] | None = None):
        super().__init__(tasks)
        weights = dict(weights or {})
        missing = [t for t in self.tasks if t not in weights]
        extra = [t for t in weights if t not in self.tasks]
        if missing or extra:
            raise UserError(f"loss.weighting_options.weights must give one weight per task "
                            f"{list(self.tasks)}; missing {missing}, unknown {extra}")
        if any(float(w) < 0 for w in weights.values()) or sum(map(float, weights.values())) <= 0:
            raise UserError(f"loss.weighting_options.weights must be >= 0 with a positive sum, "
                            f"got {weights}")
        self.fixed = {t: float(weights[t]) for t in self.tasks}

    def task_terms(self, losses, present=None):
        return {t: self.fixed[t] * losses[t] for t in self.tasks}

    def weights(self):
        return dict(self.fixed)
