"""The one interface every weighting strategy implements (LibMTL-style, one file per method).

A strategy is an nn.Module so that its learnable parameters (log-variances) and its state
(running means, as buffers) live inside MultiTaskModel, the module DDP wraps: DDP then
all-reduces their gradients, and checkpoints (state_dict) restore them.
"""

from __future__ import annotations

import torch
from torch import nn


class Weighting(nn.Module):
    name = "base"

    def __init__(self, tasks):
        super().__init__()
        self.tasks = tuple(tasks)

    def task_terms(self, losses: dict[str, torch.Tensor],
                   present: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each task's contribution to the total: its weighted loss plus any regulariser of
        its own weight parameter (which has no gradient w.r.t. the model). `present[task]`
        (a bool tensor; None: every task) says whether the task has any element in the global
        batch: a task without one must leave its weight alone (its loss is 0, so only a
        regulariser would move it). Pure: calling it again (the probe does) changes no state."""
        raise NotImplementedError

    def observe(self, losses: dict[str, torch.Tensor],
                present: dict[str, torch.Tensor] | None = None) -> None:
        """Update any state from this step's losses (called once per forward, before
        `task_terms`); a task not `present` has no loss to learn from. Stateless strategies
        do nothing."""

    def forward(self, losses: dict[str, torch.Tensor],
                present: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        self.observe(losses, present)
        return sum(self.task_terms(losses, present).values())

    @torch.no_grad()
    def project_(self) -> None:
        """Put learned parameters back into their allowed range after an optimiser step
        (projected gradient descent). Called by the training step; most strategies have none."""

    def weights(self) -> dict[str, float]:
        """The factor each task's loss is multiplied by in the gradient of the model."""
        raise NotImplementedError

    def effective_weights(self) -> dict[str, float]:
        """`weights()` normalised to sum to 1 (comparable across strategies)."""
        raw = self.weights()
        total = sum(raw.values())
        return {t: (w / total if total > 0 else 0.0) for t, w in raw.items()}

    def log_vars(self) -> dict[str, float] | None:
        """Learned log-variances s = log sigma^2 per task, for strategies that have them."""
        return None
