"""The loop's runtime under Ray Train (`pipeline.train.runtime.Runtime`).

The same class serves W worker actors with DDP and local mode (`--workers 0`: the loop runs in
the driver process, no process group). Ray hands back the latest reported checkpoint after a
failure or for a run restarted by name; local mode gets it from the driver (`resume_from`),
because Ray keeps local-mode checkpoints in memory only, and so `report` also copies each one
into OUT there.
"""

from __future__ import annotations

import contextlib
import os

import ray.train
import ray.train.torch
import torch

from pipeline import storage
from pipeline.train.checkpoint import META_FILE
from pipeline.train.rundir import checkpoint_dirs


class RayTrainRuntime:
    def __init__(self, out: str, keep_checkpoints: int, local_mode: bool,
                 resume_from: str | None = None):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()
        self.out, self.keep_checkpoints = out, keep_checkpoints
        self.local_mode, self.resume_from = local_mode, resume_from

    @classmethod
    def from_loop_config(cls, loop_config: dict, out: str, keep_checkpoints: int):
        return cls(out, keep_checkpoints, loop_config["local_mode"], loop_config.get("resume_from"))

    def restore_dir(self):
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return checkpoint.as_directory()
        return contextlib.nullcontext(self.resume_from)

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module)

    def report(self, metrics: dict, directory: str, name: str, keep: set[str]) -> None:
        if self.local_mode:
            persist_local(self.out, directory, name, self.keep_checkpoints, keep)
        # SYNC upload: the files are in storage when report returns, so `directory` can go.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name)


def persist_local(out: str, directory: str, name: str, keep: int, protected: set[str]) -> None:
    """Local mode: copy the checkpoint into OUT and prune old ones (the newest `keep`, this
    one and the `protected` ones stay)."""
    dest = storage.join(out, name)
    storage.makedirs(dest)
    # meta.json goes last: a copy cut short (disk full, S3 down) has no meta.json, and resume
    # takes only checkpoints that have one (trainer.latest_local_checkpoint).
    for file in sorted(os.listdir(directory), key=lambda f: f == META_FILE):
        storage.upload_file(os.path.join(directory, file), storage.join(dest, file))
    names = checkpoint_dirs(out)
    keep_names = set(names[-keep:]) | {name} | set(protected)
    for old in names:
        if old not in keep_names:
            storage.remove_tree(storage.join(out, old))
