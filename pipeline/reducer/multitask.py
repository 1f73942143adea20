"""MultiTaskModel: JadeCompact + task losses + weighting, as the one module DDP wraps.

The weighting's log-variances are parameters of this module, so DDP all-reduces their
gradients with the model's and every rank keeps identical values; its state (running means)
is in this module's state_dict, so checkpoints restore it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.jade import JadeCompact, JadeConfig
from pipeline.reducer.losses import LossConfig, task_losses
from pipeline.reducer.weighting import Weighting, build_weighting


class MultiTaskModel(nn.Module):
    def __init__(self, model: JadeCompact, weighting: Weighting, loss_cfg: LossConfig | None = None):
        super().__init__()
        if set(weighting.tasks) != set(model.tasks):
            raise ValueError(f"weighting tasks {weighting.tasks} != model tasks {model.tasks}")
        self.model = model
        self.weighting = weighting
        self.loss_cfg = loss_cfg or LossConfig()

    @classmethod
    def build(cls, model_cfg: JadeConfig | None = None, loss_cfg: LossConfig | None = None) -> "MultiTaskModel":
        model_cfg, loss_cfg = model_cfg or JadeConfig(), loss_cfg or LossConfig()
        weighting = build_weighting(loss_cfg.weighting, model_cfg.tasks, loss_cfg.weighting_options)
        return cls(JadeCompact(model_cfg), weighting, loss_cfg)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.tasks

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        outputs = self.model(batch["features"])
        losses = task_losses(outputs, batch, self.loss_cfg)
        total = self.weighting(losses)
        return total, losses, outputs
