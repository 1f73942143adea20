"""`running-mean`: the old pipeline's LossNormalizer with fixed 70/10/10/10 weights.

Kept as a named baseline so users can reproduce and compare the old failure. Each task loss
is divided by a detached running mean of itself (a simple average over the first
`warmup_steps` steps, then an EMA with `momentum`), then weighted by fixed weights
(pointer 0.7, type / span / countdown 0.1 each). Because the mean is a constant per step, the
gradient of each task is its raw gradient times weight / running_mean: the normaliser only
rescales, it cannot tell a task that is stuck from one that is learning.

The running means are buffers (checkpointed). Under torch.distributed the detached losses are
averaged across ranks before the update, so every rank holds the same means (and, because
`element_mean` values average to the global mean, the means are those of the global batch).
They update only in training mode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.errors import UserError
from pipeline.reducer.element_mean import distributed_world
from pipeline.reducer.weighting.base import Weighting

OLD_WEIGHTS = {"pointer": 0.7, "type": 0.1, "span": 0.1, "countdown": 0.1}


class RunningMeanWeighting(Weighting):
    name = "running-mean"

    def __init__(self, tasks, weights: dict[str, float] | None = None, warmup_steps: int = 10,
                 momentum: float = 0.95):
        super().__init__(tasks)
        weights = dict(OLD_WEIGHTS if weights is None else weights)
        missing = [t for t in self.tasks if t not in weights]
        if missing:
            raise UserError(f"loss.weighting_options.weights has no weight for task(s) {missing}")
        if not 0.0 <= momentum < 1.0 or warmup_steps < 1:
            raise UserError(f"running-mean needs 0 <= momentum < 1 and warmup_steps >= 1, got "
                            f"momentum={momentum}, warmup_steps={warmup_steps}")
        self.fixed = {t: float(weights[t]) for t in self.tasks}
        self.warmup_steps, self.momentum = int(warmup_steps), float(momentum)
        self.register_buffer("running", torch.zeros(len(self.tasks), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def observe(self, losses: dict[str, torch.Tensor], present=None) -> None:
        if not self.training:
            return
        current = torch.stack([losses[t].detach().to(torch.float64) for t in self.tasks])
        world = distributed_world()
        if world > 1:
            current = current.to(self.running.device)
            dist.all_reduce(current, op=dist.ReduceOp.SUM)
            current /= world
        current = current.to(self.running.device)
        if present is not None:  # a task with no element has loss 0: keep its mean unchanged
            here = torch.stack([present[t] for t in self.tasks]).to(self.running.device)
            current = torch.where(here, current, self.running)
        self.steps += 1
        # torch.where, not `if int(self.steps)`: no host sync, so the step can be a CUDA graph.
        average = self.running + (current - self.running) / self.steps.to(torch.float64)
        ema = self.running * self.momentum + (1 - self.momentum) * current
        self.running.copy_(torch.where(self.steps <= self.warmup_steps, average, ema))

    def task_terms(self, losses, present=None):
        denom = torch.where(self.steps > 0, self.running.clamp(min=1e-12),
                            torch.ones_like(self.running))
        return {t: self.fixed[t] * losses[t] / denom[i].to(losses[t].dtype)
                for i, t in enumerate(self.tasks)}

    def weights(self):
        if int(self.steps) == 0:
            return dict(self.fixed)
        return {t: self.fixed[t] / max(float(self.running[i]), 1e-12)
                for i, t in enumerate(self.tasks)}

    def running_means(self) -> dict[str, float]:
        return {t: float(self.running[i]) for i, t in enumerate(self.tasks)}
