"""The seam between the worker loop and what runs it: rank, device, checkpoint in and out.

The loop (`pipeline.train.loop.run_worker`) asks its runtime five things and nothing else:

  rank, world     this process's place among the processes of one training run
  device          where its model and batches live
  restore_dir()   `with runtime.restore_dir() as path:` the checkpoint to continue from (a local
                  directory), or None for a fresh start
  prepare_model(module)   the module the step trains (DDP-wrapped where world > 1)
  report(metrics, directory, name, keep)   hand over one epoch's (or step's) metrics and the
                  checkpoint files every rank wrote into `directory`; a barrier: every rank
                  calls it the same number of times. `keep`: checkpoint names that must survive
                  pruning (the best one).

`pipeline.train.ray_runtime.RayTrainRuntime` is the Ray Train implementation (a worker actor,
or local mode in the driver process). A Ray Tune function trial would implement the same five
with `ray.tune.get_checkpoint` / `ray.tune.report` (inside a Tune function `ray.train.report`
and `ray.train.get_context` raise), world 1 and `prepare_model` the identity.

The collectives below are plain torch.distributed: without a process group (local mode, a
Tune trial, the unit tests) they are the identity, so the same code runs on one process.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.distributed as dist


class Runtime(Protocol):
    rank: int
    world: int
    device: torch.device

    def restore_dir(self) -> AbstractContextManager[str | None]: ...

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module: ...

    def report(self, metrics: dict, directory: str, name: str, keep: set[str]) -> None: ...


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (returned for chaining)."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj, world: int) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world > 1 and distributed():
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    return [obj]
