"""The optimiser and its learning-rate schedule as one checkpointable part of the worker loop.

Built by `step.make_optimizer` / `step.make_scheduler` (fused AdamW on CUDA, capturable with
tensor learning rates when the step is a CUDA graph); saved with `step.portable_state` (tensor
rates as floats) and loaded with `step.load_optimizer_state` (this run's own implementation
flags), so a checkpoint moves between graphed, eager, CPU and CUDA runs.
"""

from __future__ import annotations

import torch

from pipeline.train.step import (load_optimizer_state, make_optimizer, make_scheduler,
                                 portable_state)


class Optimization:
    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, device, graphs: bool):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.graphs = device, graphs

    @classmethod
    def build(cls, param_groups: list[dict], scheduler: str, total_steps: int, device,
              graphs: bool) -> "Optimization":
        optimizer = make_optimizer(param_groups, device, graphs)
        return cls(optimizer, make_scheduler(optimizer, scheduler, total_steps), device, graphs)

    def after_step(self) -> None:
        if self.scheduler.needs_step:  # a constant rate costs no launch per step
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"optimizer": portable_state(self.optimizer.state_dict()),
                "scheduler": portable_state(self.scheduler.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"], self.device, self.graphs)
        self.scheduler.load_state_dict(state["scheduler"])
