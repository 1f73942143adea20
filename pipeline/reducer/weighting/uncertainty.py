"""Homoscedastic-uncertainty weighting with learned log-variances s = log sigma^2 per task.

`uncertainty` (Kendall, Gal & Cipolla 2018, in the s parametrisation):
    regression term      0.5 * exp(-s) * L + 0.5 * s
    classification term        exp(-s) * L + 0.5 * s
At its stationary point (L held fixed) s* = log L for regression and log 2L for
classification, i.e. the weight settles at 1/(2L): each task is divided by its own loss.
The total can be negative (s < 0): that is expected, monitor the unweighted task losses.
A task whose loss goes to 0 drives s -> -inf and its weight up without bound; the optional
`clamp` = (min, max) bounds the s used in the loss (outside the bounds s gets no gradient).

`uncertainty-positive` (Liebel & Koerner 2018): regulariser log(1 + sigma^2) instead of
log sigma, so the total stays positive and s cannot run away:
    every task           0.5 * exp(-s) * L + log(1 + exp(s))

Which tasks are classification: `type` (softmax CE) and `span` (per-bar Bernoulli, BCE); the
`classification` option overrides that. The old runs' init log sigma_ptr = -0.3 is
s_ptr = -0.6: pass init={"pointer": -0.6}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.reducer.weighting.base import Weighting

CLASSIFICATION_TASKS = ("type", "span")


class UncertaintyWeighting(Weighting):
    name = "uncertainty"

    def __init__(self, tasks, init: dict[str, float] | None = None,
                 clamp: tuple[float, float] | list | None = None,
                 classification: tuple[str, ...] | list | None = None):
        super().__init__(tasks)
        init = dict(init or {})
        unknown = [t for t in init if t not in self.tasks]
        if unknown:
            raise UserError(f"loss.weighting_options.init names unknown task(s) {unknown}; "
                            f"tasks are {list(self.tasks)}")
        # One parameter per task, `log_var_<task>` (a ParameterDict key "type" would clash
        # with nn.Module.type).
        for t in self.tasks:
            self.register_parameter(f"log_var_{t}", nn.Parameter(torch.tensor(float(init.get(t, 0.0)))))
        if clamp is not None:
            clamp = tuple(float(c) for c in clamp)
            if len(clamp) != 2 or clamp[0] >= clamp[1]:
                raise UserError(f"loss.weighting_options.clamp must be [min, max] with "
                                f"min < max, got {list(clamp)}")
        self.clamp = clamp
        self.classification = set(CLASSIFICATION_TASKS if classification is None else classification)

    def s(self, task: str) -> torch.Tensor:
        s = getattr(self, f"log_var_{task}")
        return s.clamp(*self.clamp) if self.clamp else s

    def factor(self, task: str) -> float:
        return 1.0 if task in self.classification else 0.5

    def task_terms(self, losses):
        return {t: self.factor(t) * torch.exp(-self.s(t)) * losses[t] + 0.5 * self.s(t)
                for t in self.tasks}

    def weights(self):
        return {t: self.factor(t) * float(torch.exp(-self.s(t).detach())) for t in self.tasks}

    def log_vars(self):
        return {t: float(self.s(t).detach()) for t in self.tasks}


class PositiveUncertaintyWeighting(UncertaintyWeighting):
    name = "uncertainty-positive"

    def factor(self, task: str) -> float:
        return 0.5

    def task_terms(self, losses):
        # softplus(s) = log(1 + exp(s)) = log(1 + sigma^2), computed stably.
        return {t: 0.5 * torch.exp(-self.s(t)) * losses[t] + F.softplus(self.s(t))
                for t in self.tasks}
