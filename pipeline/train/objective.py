"""What `train` optimises and scores: the part of the worker loop that `pretrain` swaps.

An objective owns the module the step trains (`module`: `forward(batch) -> (total, losses,
outputs)` with the per-task element-loss sums and counts under `outputs[LOSS_STATS]`, so the
loop's epoch losses are exact per-element means), the names of its loss terms (`tasks`), its
optimiser groups, the gradient probe, a val accumulator (`validation()`), the objective's own
figures in each epoch's record, what it keeps of the best epoch, and its checkpoint state. The
rest of the loop (optimiser, loader position, best/patience, records, checkpoints, runtime)
does not know which objective it runs.

`MultiTaskObjective`: JadeCompact + the four task losses and their weighting (`MultiTaskModel`,
the one module DDP wraps, so the log-variances are all-reduced with the model), `TaskMetrics`
on the val split, and the best epoch's val predictions (best_val_predictions.npz, the span
threshold chosen on them).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.evaluate.threshold import threshold_from_predictions
from pipeline.model import JadeConfig
from pipeline.reducer import LOSS_STATS, GradientProbe, LossConfig, MultiTaskModel
from pipeline.train.device_feed import autocast_model
from pipeline.train.metrics import TaskMetrics
from pipeline.train.rundir import write_predictions
from pipeline.train.runtime import all_reduce_sum, gather_objects


class Objective(Protocol):
    """What the loop asks of an objective (`MultiTaskObjective` below; `pretrain`'s next)."""
    module: torch.nn.Module   # forward(batch) -> (total, losses, outputs[LOSS_STATS])
    tasks: tuple[str, ...]    # its loss terms, in the order of the [2, T] loss sums

    @classmethod
    def build(cls, cfg: TrainConfig, manifest: dict, device) -> "Objective": ...

    def param_groups(self, train) -> list[dict]: ...

    def probe_hook(self, model: torch.nn.Module) -> Callable[[dict], object] | None: ...

    def validation(self, device) -> "Validation": ...

    def figures(self, task_metrics: dict) -> dict: ...

    def save_best(self, out: str, validation: "Validation", epoch: int, rank: int,
                  world: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MultiTaskObjective:
    def __init__(self, multitask: MultiTaskModel, model_cfg: JadeConfig, probe: GradientProbe):
        self.module, self.model_cfg, self.probe = multitask, model_cfg, probe

    @classmethod
    def build(cls, cfg: TrainConfig, manifest: dict, device) -> "MultiTaskObjective":
        """The objective of `cfg` on `device`. Call under the run's seed: the same seed on every
        rank gives the same initial weights (DDP also broadcasts rank 0's)."""
        model_cfg = JadeConfig(n_features=len(manifest["features"]), **vars(cfg.model))
        multitask = MultiTaskModel.build(model_cfg, LossConfig(**vars(cfg.loss))).to(device)
        if cfg.train.precision == "bf16":  # the LSTM and heads only: losses stay fp32
            autocast_model(multitask.model, device)
        # The run's thresholds: the alarm and the record's `starving` use the same ones.
        probe = GradientProbe(starve_share=cfg.alarms.starve_share,
                              starve_checks=cfg.alarms.starve_checks)
        return cls(multitask, model_cfg, probe)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model_cfg.tasks

    def param_groups(self, train) -> list[dict]:
        return self.module.param_groups(train.lr, train.weight_decay, train.weighting_lr)

    def probe_hook(self, model: torch.nn.Module):
        """The step's `before_backward`: measure the probe on this step's losses."""
        return lambda losses: self.probe.measure(model, losses)

    def validation(self, device) -> "Validation":
        loss_cfg = self.module.loss_cfg
        metrics = TaskMetrics(self.tasks, num_classes=self.model_cfg.num_classes,
                              countdown_scale=loss_cfg.countdown_scale, device=device)
        return Validation(metrics, len(self.tasks), device)

    def figures(self, task_metrics: dict) -> dict:
        """The objective's part of an epoch's record: the loss weights, the probe's latest
        check and the val task metrics (at the record's top level)."""
        weighting, grads = self.module.weighting, self.probe.last or {}
        return {"weights": weighting.effective_weights(), "log_vars": weighting.log_vars(),
                "grad_norm": grads.get("grad_norm"), "grad_share": grads.get("grad_share"),
                "grad_ratio_countdown_pointer": grads.get("grad_ratio_countdown_pointer"),
                "starving": self.probe.starving(), **task_metrics}

    def save_best(self, out: str, validation: "Validation", epoch: int, rank: int,
                  world: int) -> None:
        """Rank 0 keeps the whole val split's predictions of the best epoch, and the span
        threshold of the best checkpoint chosen on them (a collective: every rank calls it)."""
        gathered = gather_objects(validation.predictions, world)
        if rank == 0:
            write_predictions(out, merge_predictions(gathered, epoch))
            threshold_from_predictions(out)

    def state_dict(self) -> dict:
        return {"multitask": self.module.state_dict(), "model": self.module.model.state_dict(),
                "probe": self.probe.state_dict(), "model_config": vars(self.model_cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["multitask"])
        self.probe.load_state_dict(state["probe"])


class Validation:
    """One val pass on this rank: the task metrics' sufficient statistics, the element-loss sums
    and counts ([2, T] float64 on the device), and the predictions (numpy, for the best epoch)."""

    def __init__(self, metrics: TaskMetrics, n_tasks: int, device):
        self.metrics = metrics
        self.loss_sums = torch.zeros(2, n_tasks, dtype=torch.float64, device=device)
        self.predictions: list[dict] = []

    def update(self, batch: dict, outputs: dict) -> None:
        self.metrics.update(outputs, batch)
        self.loss_sums += outputs[LOSS_STATS]
        self.predictions.append(batch_predictions(outputs, batch))

    def figures(self) -> dict:
        """The task metrics over the whole split (one all-reduce of sums and counts: exact)."""
        stats = all_reduce_sum(self.metrics.state())
        return self.metrics.compute(stats)


def batch_predictions(outputs: dict, batch: dict) -> dict:
    """This batch's val predictions as numpy (for best_val_predictions.npz)."""
    out = {"index": batch["index"], "valid": batch["valid"], "label": batch["label"],
           "expansion_start": batch["expansion_start"], "expansion_end": batch["expansion_end"]}
    if "span_logits" in outputs:
        out["span_prob"] = torch.sigmoid(outputs["span_logits"])
    if "type_logits" in outputs:
        out["type_prob"] = torch.softmax(outputs["type_logits"], dim=-1)
    if "pointers" in outputs:
        out["pointers"] = outputs["pointers"]
    if "countdown" in outputs:
        out["countdown"] = outputs["countdown"]
    if "ohlc" in batch:
        out["ohlc"] = batch["ohlc"]
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def merge_predictions(per_rank: list[list[dict]], epoch: int) -> dict:
    """All ranks' val predictions as one set of arrays in window-index order."""
    batches = [b for rank_batches in per_rank for b in rank_batches]
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    # Each val window is on exactly one rank; put them in index order (a padding row, index
    # -1, is no window).
    real = arrays["index"] >= 0
    arrays = {k: v[real] for k, v in arrays.items()}
    _, first = np.unique(arrays["index"], return_index=True)
    arrays = {k: v[first] for k, v in arrays.items()}
    arrays["span_prob"] = arrays.get("span_prob", np.zeros(0, np.float32)).astype(np.float32)
    arrays["epoch"] = np.array(epoch)
    return arrays
