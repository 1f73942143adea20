"""Where a run is: epochs and steps done, the best epoch and the patience left, the loader's
position, and the rules that decide when to checkpoint, probe, stop, and how to continue.

All of it is plain Python (torch only for the RNG and the half-epoch sums), so every rule here
is unit-tested in milliseconds (tests/test_loop_parts.py); the worker loop only calls it.
"""

from __future__ import annotations

import torch

from pipeline.report.run import epochs_text
from pipeline.train import checkpoint as ckpt
from pipeline.train.runtime import all_reduce_sum

# Stand-in score for checkpoints with no val metric yet (mid-epoch) or none this epoch:
# ranked below every scored epoch end by Ray's checkpoint_score_order.
WORST = {"min": 1e30, "max": -1e30}


class TrainProgress:
    """Epochs completed, optimiser steps taken, the best epoch so far and the epochs since.

    `epoch` counts *completed* epochs (so it is also the index of the epoch being trained).
    `partial`: the all-reduced [loss sums..., counts..., samples] of a half-done epoch read from
    a mid-epoch checkpoint, consumed once by the epoch that resumes it (`take_partial`)."""

    def __init__(self):
        self.epoch, self.step = 0, 0
        self.best: dict | None = None   # {"score", "epoch", "checkpoint"}
        self.bad_epochs = 0
        self.partial: torch.Tensor | None = None

    # ---- the best epoch and early stopping (every rank decides the same from the same
    # all-reduced record, so no broadcast is needed)

    def end_epoch(self) -> None:
        self.epoch += 1

    def observe(self, score: float | None, mode: str) -> bool:
        """Score the epoch just ended (call after `end_epoch`); True when it is the new best.
        A None score (nothing to score this epoch) is never an improvement."""
        improved = score is not None and (self.best is None or (
            score < self.best["score"] if mode == "min" else score > self.best["score"]))
        if improved:
            self.best = {"score": score, "epoch": self.epoch - 1,
                         "checkpoint": ckpt.checkpoint_name(self.epoch, self.step)}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def best_epoch(self) -> int | None:
        return self.best["epoch"] if self.best else None

    @property
    def best_checkpoint(self) -> set[str]:
        """The best checkpoint's name as a set (empty before the first scored epoch)."""
        return {self.best["checkpoint"]} if self.best else set()

    def should_stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs without a new best (0: never)."""
        return bool(patience) and self.bad_epochs >= patience

    def early_stop_text(self, total_epochs: int, metric: str) -> str:
        best = (f"best {self.best['score']:.4g} at epoch {self.best['epoch'] + 1}" if self.best
                else "never scored")
        return (f"early stopping after epoch {self.epoch}/{total_epochs}: {metric} has not "
                f"improved for {epochs_text(self.bad_epochs)} ({best})")

    # ---- checkpoint state

    def take_partial(self) -> torch.Tensor | None:
        partial, self.partial = self.partial, None
        return partial

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "best": self.best,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.partial = state.get("partial")


class LoaderPosition:
    """The train loader and the position a checkpoint must record for it.

    On CUDA the device feed copies the next batch while a step runs, so the loader itself is one
    batch ahead of training: inside an epoch the position is the loader state right after the
    last *trained* batch (`trained`, set by the loop from `feed.loader_state`); between epochs it
    is the loader's own state (the next epoch, no batch consumed)."""

    def __init__(self, loader):
        self.loader = loader
        self.trained: dict | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def start(self) -> None:
        self.loader.set_epoch(0)

    def ends_epoch(self, loader_state: dict) -> bool:
        """Whether the batch the loader was at `loader_state` after is the epoch's last."""
        return loader_state["batches_consumed"] == len(self.loader)

    def trained_through(self, loader_state: dict) -> None:
        """Record the position after a trained batch."""
        self.trained = loader_state

    def next_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        self.trained = None

    def state_dict(self) -> dict:
        return self.trained if self.trained is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.trained = None


# ---- schedules inside an epoch

def probe_due(enabled: bool, every: int, step: int, last_batch: bool) -> bool:
    """Measure the gradient probe on this step (`step`: steps done before it): at each epoch's
    last batch, and every `every` steps when `every` > 0."""
    return bool(enabled) and (last_batch or bool(every and (step + 1) % every == 0))


def mid_epoch_checkpoint_due(step: int, every: int, last_batch: bool) -> bool:
    """A checkpoint after `step` steps (`train.checkpoint_every_steps`), except after an epoch's
    last batch, where the epoch-end checkpoint (with the epoch's record) follows anyway."""
    return bool(every) and step % every == 0 and not last_batch


# ---- how a worker continues

def dropout_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of a rank that has no RNG state to restore: dropout differs per rank and
    is fixed by the run's seed; after a resume the step is added, so no mask repeats."""
    return seed * 1000 + rank + 1 + step


def continue_rng(rng: dict | None, saved_world: int, world: int, seed: int, rank: int,
                 step: int) -> bool:
    """After a restore: continue this rank's RNG exactly where the checkpoint has it (same
    world size and this rank's file present; True), or reseed (False): a different world size
    cannot replay the same dropout."""
    if rng is not None and saved_world == world:
        ckpt.restore_rng(rng)
        return True
    torch.manual_seed(dropout_seed(seed, rank, step))
    return False


def seed_partial(loss_sums: torch.Tensor, partial) -> int:
    """Seed an epoch resumed mid-way with the checkpoint's global [sums, counts, samples];
    returns the samples already trained. A checkpoint of the older layout (per-batch means,
    not element sums) cannot be made exact: the epoch's record then covers the steps after it."""
    partial = torch.as_tensor(partial, dtype=torch.float64)
    if partial.numel() != loss_sums.numel() + 1:
        print("warning: the checkpoint's half-done epoch was saved by an older version; this "
              "epoch's train loss covers only the steps after the resume", flush=True)
        return 0
    loss_sums.copy_(partial[:-1].view_as(loss_sums))
    return int(partial[-1])


def epoch_so_far(loss_sums: torch.Tensor, samples: int) -> torch.Tensor:
    """The `partial` of a mid-epoch checkpoint: this epoch's [sums, counts, samples] over all
    ranks (a collective), so the resumed epoch's record is exact on any worker count."""
    sums = torch.cat([loss_sums.flatten(),
                      torch.tensor([samples], dtype=torch.float64, device=loss_sums.device)])
    return all_reduce_sum(sums).cpu()
