"""Homoscedastic-uncertainty weighting with learned log-variances s = log sigma^2 per task.

`uncertainty` (Kendall, Gal & Cipolla 2018, in the s parametrisation):
    regression term      0.5 * exp(-s) * L + 0.5 * s
    classification term        exp(-s) * L + 0.5 * s
At its stationary point (L held fixed) s* = log L for regression and log 2L for
classification, i.e. the weight settles at 1/(2L): each task is divided by its own loss.
The total can be negative (s < 0): that is expected, monitor the unweighted task losses.
A task whose loss goes to 0 drives s -> -inf and its weight up without bound; the optional
`clamp` = (min, max) keeps s in [min, max] by projection: the training step puts s back into
the range after every optimiser step (`project_`), so s at a bound still has its gradient and
leaves the bound as soon as the loss asks for it (a clamp inside the loss would have frozen s
there: the gradient of a clamped value is 0 outside the range).

A task with no element in a global batch (a batch of unlabeled rows) has loss 0 there; its
regulariser 0.5 * s alone would push s down (gradient 1/2 per step), so where the task is not
`present` its term is 0 * s: s keeps its value and gets a zero gradient.

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
        if clamp is not None:
            clamp = tuple(float(c) for c in clamp)
            if len(clamp) != 2 or clamp[0] >= clamp[1]:
                raise UserError(f"loss.weighting_options.clamp must be [min, max] with "
                                f"min < max, got {list(clamp)}")
        self.clamp = clamp
        # One parameter per task, `log_var_<task>` (a ParameterDict key "type" would clash
        # with nn.Module.type).
        for t in self.tasks:
            self.register_parameter(f"log_var_{t}", nn.Parameter(torch.tensor(float(init.get(t, 0.0)))))
        self.project_()  # an init outside the range starts at its bound
        self.classification = set(CLASSIFICATION_TASKS if classification is None else classification)

    def s(self, task: str) -> torch.Tensor:
        return getattr(self, f"log_var_{task}")

    @torch.no_grad()
    def project_(self) -> None:
        if self.clamp:
            for t in self.tasks:
                self.s(t).clamp_(*self.clamp)  # in place: a captured step keeps the tensor

    def factor(self, task: str) -> float:
        return 1.0 if task in self.classification else 0.5

    def regulariser(self, task: str) -> torch.Tensor:
        return 0.5 * self.s(task)

    def task_terms(self, losses, present=None):
        return {t: self.factor(t) * torch.exp(-self.s(t)) * losses[t]
                + _only_if(present, t, self.regulariser(t)) for t in self.tasks}

    def weights(self):
        return {t: self.factor(t) * float(torch.exp(-self.s(t).detach())) for t in self.tasks}

    def log_vars(self):
        return {t: float(self.s(t).detach()) for t in self.tasks}


class PositiveUncertaintyWeighting(UncertaintyWeighting):
    name = "uncertainty-positive"

    def factor(self, task: str) -> float:
        return 0.5

    def regulariser(self, task: str) -> torch.Tensor:
        # softplus(s) = log(1 + exp(s)) = log(1 + sigma^2), computed stably.
        return F.softplus(self.s(task))


def _only_if(present, task: str, term: torch.Tensor) -> torch.Tensor:
    """`term` where the task has elements in the global batch, else 0 (still on the graph,
    so DDP sees every parameter take part). No host sync: safe inside a CUDA graph."""
    if present is None:
        return term
    return term * present[task].to(term.dtype)
