"""The GPU path of the worker loop: batches onto the device one step ahead, and bf16 autocast.

`DeviceFeed` turns the ShardLoader's global batches into this rank's slice on the device. On CUDA
it pins each slice, copies it with non_blocking on a side stream and stages the next batch before
the current step runs, so the copy and the host-side decoding overlap the step's kernels (a pinned
copy moves ~50 GB/s: it costs nothing next to the step). On CPU it is a plain slice, no prefetch,
unless asked (the tests exercise the one-ahead logic on CPU that way).

Prefetching moves the loader one batch ahead of the step, so the loader state a checkpoint must
save is the one right after the batch being trained on: `feed.loader_state`, not
`loader.state_dict()`.

`autocast_model` runs a module's forward under bf16 autocast and hands back fp32 outputs, so the
losses and the reducer (the weighting, the loss sums) stay in fp32 and the state_dict keys are
unchanged (no wrapper module).
"""

from __future__ import annotations

import torch


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    """This rank's contiguous part of a global batch (sizes differ by at most one).

    A last batch smaller than W leaves some rank no row; that rank still takes part in every
    collective, so it runs the step on one *padding row* instead of an empty batch (cuDNN's LSTM
    is not known to accept batch 0): a copy of row 0 with label -1, no expansion, no valid bar
    and index -1. It has no element in any task (the losses and metrics are unchanged) and the
    loop counts no sample for it (`DeviceFeed.rows`)."""
    n = batch["label"].shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    if hi > lo:
        return {k: v[lo:hi] for k, v in batch.items()}
    pad = {k: v[:1].clone() for k, v in batch.items()}
    for key in ("label", "expansion_start", "expansion_end", "index"):
        pad[key].fill_(-1)
    pad["valid"].zero_()
    return pad


def slice_rows(n: int, rank: int, world: int) -> int:
    """How many of a global batch's n rows are this rank's (0: it trains on a padding row)."""
    return n * (rank + 1) // world - n * rank // world


class DeviceFeed:
    """Iterate a ShardLoader as this rank's device-resident slices; one step ahead on CUDA."""

    def __init__(self, loader, rank: int, world: int, device, prefetch: bool | None = None):
        self.loader, self.rank, self.world = loader, rank, world
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = self.cuda if prefetch is None else prefetch
        self.loader_state = loader.state_dict()  # the state right after the yielded batch
        self.global_size = 0  # rows of the global batch the yielded slice was cut from
        self.rows = 0         # rows of it that are this rank's samples (0: a padding row)

    def __iter__(self):
        batches = iter(self.loader)
        if not self.prefetch:
            for batch in batches:
                self.loader_state = self.loader.state_dict()
                self.global_size = batch["label"].shape[0]
                self.rows = slice_rows(self.global_size, self.rank, self.world)
                yield self._to_device(rank_slice(batch, self.rank, self.world))
            return
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        staged = self._stage(batches, stream)
        while staged is not None:
            batch, state, size = staged
            if stream is not None:  # the step's stream waits for the copy, and owns its memory
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                for v in batch.values():
                    v.record_stream(current)
            staged = self._stage(batches, stream)  # next batch's copy overlaps this step
            self.loader_state, self.global_size = state, size
            self.rows = slice_rows(size, self.rank, self.world)
            yield batch

    def _stage(self, batches, stream):
        batch = next(batches, None)
        if batch is None:
            return None
        state, size = self.loader.state_dict(), batch["label"].shape[0]
        part = rank_slice(batch, self.rank, self.world)
        if stream is None:
            return self._to_device(part), state, size
        with torch.cuda.stream(stream):
            return {k: v.pin_memory().to(self.device, non_blocking=True)
                    for k, v in part.items()}, state, size

    def _to_device(self, part: dict) -> dict:
        if self.device.type == "cpu":
            return part
        return {k: v.to(self.device, non_blocking=True) for k, v in part.items()}


def autocast_model(module: torch.nn.Module, device, dtype=torch.bfloat16) -> torch.nn.Module:
    """Run `module`'s forward under autocast and return fp32 outputs (losses stay fp32).

    Patches the instance's forward (not a wrapper module), so checkpoints and DDP see the same
    parameters and keys with or without it."""
    device_type = torch.device(device).type
    inner = module.forward

    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = inner(*args, **kwargs)
        return _to_float(out)

    module.forward = forward
    return module


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(v) for v in out)
    return out
