"""The run's stateful parts, and how they go into a checkpoint and come back out.

Each part owns its own state (`state_dict` / `load_state_dict`): the objective (model, weighting,
probe), the optimiser and schedule, the loader position, the progress (epochs, steps, best,
patience). `RunState` only composes them, as torchtitan's checkpointer composes its `states`, so
a new piece of state is one line in its own part. A checkpoint directory (pipeline.train.checkpoint)
holds rank 0's state.pt and meta.json and every rank's RNG; the runtime carries it to storage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile

import torch

from pipeline.config import TrainConfig, config_hash
from pipeline.errors import UserError
from pipeline.train import checkpoint as ckpt
from pipeline.train.objective import Objective
from pipeline.train.optimization import Optimization
from pipeline.train.progress import (WORST, LoaderPosition, TrainProgress, continue_rng,
                                     dropout_seed)
from pipeline.train.runtime import Runtime
from pipeline.train.trainer import SCORE_ATTR

# meta.json: the small, human-readable part of a checkpoint (the driver's --resume reads it)
META_KEYS = ("epoch", "step", "world_size", "config_hash", "manifest_hash", "run_id", "best")


class RunState:
    def __init__(self, cfg: TrainConfig, manifest_hash: str, runtime: Runtime,
                 objective: Objective, optim: Optimization, position: LoaderPosition,
                 progress: TrainProgress):
        self.cfg, self.manifest_hash, self.runtime = cfg, manifest_hash, runtime
        self.objective, self.optim = objective, optim
        self.position, self.progress = position, progress

    # ---- restore

    def restore(self) -> None:
        """Continue from the runtime's checkpoint, or start fresh (epoch 0, per-rank dropout)."""
        rank, world, seed = self.runtime.rank, self.runtime.world, self.cfg.train.seed
        with self.runtime.restore_dir() as directory:
            if not directory:
                self.position.start()
                torch.manual_seed(dropout_seed(seed, rank))
                return
            state = ckpt.read_state(directory)
            check_resumable(state, config_hash(self.cfg), self.manifest_hash, directory)
            self.load_state_dict(state)
            continue_rng(ckpt.read_rng(directory, rank), state["world_size"], world, seed, rank,
                         self.progress.step)

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)
        self.optim.load_state_dict(state)
        self.position.load_state_dict(state["loader"])
        self.progress.load_state_dict(state)  # the half-done epoch's sums too ("partial")

    # ---- save

    def state_dict(self, partial: torch.Tensor | None = None) -> dict:
        """state.pt. `partial`: the all-reduced sums of the epoch so far (mid-epoch only)."""
        return {**self.objective.state_dict(), **self.optim.state_dict(),
                "loader": self.position.state_dict(), **self.progress.state_dict(),
                "partial": partial, "world_size": self.runtime.world,
                "config_hash": config_hash(self.cfg), "manifest_hash": self.manifest_hash,
                "run_id": self.cfg.run_id}

    def save(self, record: dict | None = None, score: float | None = None,
             partial: torch.Tensor | None = None) -> None:
        """Checkpoint now and report it: at an epoch's end with its `record` and `score`, or in
        the middle of one (`partial`). Every rank writes its part, then reports (a barrier);
        the runtime merges the parts into one directory."""
        rank, progress = self.runtime.rank, self.progress
        state = meta = None
        if rank == 0:
            state = self.state_dict(partial)
            meta = checkpoint_meta(state, record)
        metrics = {"epoch": record["epoch"] if record is not None else progress.epoch,
                   "step": progress.step,
                   SCORE_ATTR: WORST[self.cfg.train.best_mode] if score is None else score}
        name = ckpt.checkpoint_name(progress.epoch, progress.step)
        tmp = tempfile.mkdtemp(prefix="moola-ckpt-")
        try:
            ckpt.write_checkpoint(tmp, rank, state, meta)
            self.runtime.report(metrics, tmp, name, keep=progress.best_checkpoint)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_meta(state: dict, record: dict | None) -> dict:
    meta = {k: state[k] for k in META_KEYS}
    meta["loader"] = state["loader"]
    meta["record"] = record
    return meta


def manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "created"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(state: dict, run_config_hash: str, run_manifest_hash: str, where: str) -> None:
    if state["manifest_hash"] != run_manifest_hash:
        raise UserError(f"checkpoint {where} was trained on other data (manifest hash "
                        f"{state['manifest_hash']} != {run_manifest_hash}): resume with the same "
                        f"--data")
    if state["config_hash"] != run_config_hash:
        raise UserError(f"checkpoint {where} was written with another model/loss/optimiser "
                        f"config: resume with the run's own config.yaml")
