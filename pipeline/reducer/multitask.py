"""MultiTaskModel: JadeCompact + task losses + weighting, as the one module DDP wraps.

The weighting's log-variances are parameters of this module, so DDP all-reduces their
gradients with the model's and every rank keeps identical values; its state (running means)
is in this module's state_dict, so checkpoints restore it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.jade import JadeCompact, JadeConfig
from pipeline.reducer.losses import LossConfig, reduced_losses
from pipeline.reducer.weighting import Weighting, build_weighting


LOSS_STATS = "loss_stats"  # the outputs key of the per-task element sums and counts


class MultiTaskModel(nn.Module):
    def __init__(self, model: JadeCompact, weighting: Weighting, loss_cfg: LossConfig | None = None):
        super().__init__()
        if set(weighting.tasks) != set(model.tasks):
            raise ValueError(f"weighting tasks {weighting.tasks} != model tasks {model.tasks}")
        self.model = model
        self.weighting = weighting
        self.loss_cfg = loss_cfg or LossConfig()
        # the type loss's class weights as a buffer: on the module's device, made once (a
        # captured step must not build tensors from Python values); not in the state_dict
        weight = self.loss_cfg.type_class_weight
        self.register_buffer("type_class_weight", None if weight in (None, "auto")
                             else torch.tensor(weight, dtype=torch.float32), persistent=False)

    @classmethod
    def build(cls, model_cfg: JadeConfig | None = None, loss_cfg: LossConfig | None = None) -> "MultiTaskModel":
        model_cfg, loss_cfg = model_cfg or JadeConfig(), loss_cfg or LossConfig()
        weighting = build_weighting(loss_cfg.weighting, model_cfg.tasks, loss_cfg.weighting_options)
        return cls(JadeCompact(model_cfg), weighting, loss_cfg)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.tasks

    def param_groups(self, lr: float, weight_decay: float = 0.01,
                     weighting_lr: float | None = None) -> list[dict]:
        """Optimizer groups: the model, and the weighting's log-variances with no weight
        decay (decay would pull s toward 0, i.e. toward weight 1/2) and optionally their own
        learning rate. Adam moves each s by about lr per step, so at lr 1e-3 the log-variances
        barely leave their init in a short run (bench/balance.py: 5 epochs of 5 steps move s
        by 0.025, while a rate of 0.05 lets it approach its equilibrium log L)."""
        weighting = [p for p in self.weighting.parameters() if p.requires_grad]
        ids = {id(p) for p in weighting}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids],
                   "lr": lr, "weight_decay": weight_decay}]
        if weighting:
            groups.append({"params": weighting, "lr": weighting_lr or lr, "weight_decay": 0.0})
        return groups

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(total, per-task losses, outputs). `outputs[LOSS_STATS]`: this rank's element sums
        and counts per task (float64 [2, T], `self.tasks` order), for exact epoch means."""
        outputs = self.model(batch["features"])
        losses, stats, present = reduced_losses(outputs, batch, self.loss_cfg, self.tasks,
                                                self.type_class_weight)
        total = self.weighting(losses, dict(zip(self.tasks, present)))
        outputs[LOSS_STATS] = stats
        return total, losses, outputs
