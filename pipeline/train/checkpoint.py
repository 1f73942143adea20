"""Full training state in a checkpoint directory, so a restart continues exactly.

A checkpoint directory holds:
  state.pt           rank 0: model (unwrapped), the multi-task wrapper with the weighting state,
                     optimizer, scheduler, loader state (epoch, batches consumed), counters, best
                     metric, early-stopping counter, config and manifest hashes
  rng-rank{R}.pt     every rank: its own python / numpy / torch RNG states (dropout differs per
                     rank, so one rank's state cannot stand in for another's)
  meta.json          rank 0: the small, human-readable part (epoch, step, hashes, metrics)

Ray Train merges the files that all ranks report into one directory, so each rank writes only
its own names. Nothing here knows about Ray.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: str, rank: int, state: dict | None, meta: dict | None) -> None:
    """Write this rank's part of a checkpoint (rank 0 passes `state` and `meta`)."""
    os.makedirs(directory, exist_ok=True)
    torch.save(capture_rng(), os.path.join(directory, rng_file(rank)))
    if state is not None:
        torch.save(state, os.path.join(directory, STATE_FILE))
    if meta is not None:
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)


def read_state(directory: str) -> dict:
    # weights_only=False: the file holds RNG tuples and loader dicts, and we wrote it ourselves.
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def read_rng(directory: str, rank: int) -> dict | None:
    """This rank's RNG state, or None when the checkpoint came from a smaller world."""
    path = os.path.join(directory, rng_file(rank))
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, META_FILE)) as f:
        return json.load(f)


def is_checkpoint_dir(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, STATE_FILE))


def checkpoint_name(epoch: int, step: int) -> str:
    """Sortable: newest is last. `epoch` counts completed epochs at the time of the checkpoint."""
    return f"checkpoint_e{epoch:04d}_s{step:08d}"
