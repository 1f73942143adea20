"""What a training process runs, whatever runs it: `run_worker`, an outline over parts that own
their state.

`run_worker` reads top to bottom: build, restore, then for each epoch train it, evaluate the val
split, record, save. The parts:

  objective      model + losses + metrics + what the best epoch keeps (objective.py:
                 `MultiTaskObjective`; `pretrain` swaps this part only)
  optimization   the optimiser and its learning-rate schedule (optimization.py)
  position       the train loader and the position a checkpoint records (progress.py)
  progress       epochs, steps, best epoch, patience, and the rules for stopping, probing,
                 mid-epoch checkpoints and continuing (progress.py)
  RunState       composes the parts' states into a checkpoint and back (run_state.py)
  RecordSink     rank 0's metrics.jsonl and epoch hook (records.py)
  runtime        rank, world, device, the checkpoint to restore, report (runtime.py)

Nothing here imports Ray: under Ray Train, `pipeline.train.loop.train_loop_per_worker` passes a
`RayTrainRuntime`; a Ray Tune trial or a test passes its own runtime. The same code runs in Ray
Train local mode (`--workers 0`, in the driver process, no process group) and as W worker actors
with DDP. Order of one epoch: train on this rank's slice of each global batch (the reducer makes
the per-element mean exact over ranks), evaluate the val split on all ranks, all-reduce the sums
once (`records.reduce_epoch`), rank 0 appends one record to metrics.jsonl, then every rank
reports its part of the checkpoint (the report is a barrier: every rank calls it the same number
of times).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch

from pipeline.config import TrainConfig, TrainSection
from pipeline.data.loader import ShardLoader
from pipeline.data.manifest import load_manifest
from pipeline.train.device_feed import DeviceFeed
from pipeline.train.objective import MultiTaskObjective, Objective, Validation
from pipeline.train.optimization import Optimization
from pipeline.train.progress import (LoaderPosition, TrainProgress, epoch_so_far,
                                     mid_epoch_checkpoint_due, probe_due, seed_partial)
from pipeline.train.records import RecordSink, TrainedEpoch, epoch_record, lookup, reduce_epoch
from pipeline.train.rundir import write_worker_marker
from pipeline.train.run_state import RunState, manifest_hash
from pipeline.train.runtime import Runtime
from pipeline.train.step import WARMUP_DDP, WARMUP_SINGLE, TrainStep, graph_plan


# Set by the driver on Ctrl-C/SIGTERM: local mode trains in a thread of the driver process, which
# would otherwise keep training (and hold the GIL) while the driver writes the report.
STOP = threading.Event()


class Stopped(Exception):
    """Training stopped at the driver's request (STOP), between two steps."""


def run_worker(cfg: TrainConfig, runtime: Runtime, objective_type=MultiTaskObjective) -> None:
    """Train the run `cfg` describes on this process (`runtime.rank` of `runtime.world`)."""
    t = cfg.train
    start_worker(cfg, runtime)
    data = open_data(cfg)                            # the verified manifest, train and val loaders
    torch.manual_seed(t.seed)                        # the same initial weights on every rank
    objective = objective_type.build(cfg, data.manifest, runtime.device)
    graphs, replay = graph_plan(t.cuda_graphs, runtime.device, runtime.world, where="this worker")
    optim = Optimization.build(objective.param_groups(t), t.scheduler,
                               t.epochs * len(data.train), runtime.device, graphs)
    run = RunState(cfg, data.manifest_hash, runtime, objective, optim,
                   LoaderPosition(data.train), TrainProgress())
    run.restore()                                    # the latest checkpoint, or a fresh start
    step = prepare_step(objective, optim, t, runtime, graphs, replay)   # DDP + TrainStep
    records = RecordSink(cfg, runtime.rank, keep_before_epoch=run.progress.epoch)
    progress = run.progress
    while progress.epoch < t.epochs:
        trained = train_epoch(run, step, t)
        val = evaluate(step.model, objective, data.val, runtime)
        totals = reduce_epoch(trained, val.loss_sums, objective.tasks)
        progress.end_epoch()
        run.position.next_epoch(progress.epoch)
        record = epoch_record(epoch=progress.epoch - 1, step=progress.step, world=runtime.world,
                              run_id=cfg.run_id, totals=totals, trained=trained,
                              figures=objective.figures(val.figures()), lr=optim.lr)
        score = lookup(record, t.best_metric)        # None: nothing to score this epoch
        if progress.observe(score, t.best_mode):
            objective.save_best(cfg.out, val, progress.epoch - 1, runtime.rank, runtime.world)
        record["best_epoch"] = progress.best_epoch
        records.publish(record)
        run.save(record, score)
        if progress.should_stop(t.early_stop_patience):
            records.say(progress.early_stop_text(t.epochs, t.best_metric))
            break


# ------------------------------------------------------------------------- the named steps

def start_worker(cfg: TrainConfig, runtime: Runtime) -> None:
    if runtime.device.type == "cuda":  # fixed batch shapes: let cuDNN pick its fastest LSTM kernels
        torch.backends.cudnn.benchmark = True
    write_worker_marker(cfg.out, runtime.rank, runtime.world)


@dataclass
class TrainData:
    manifest: dict
    manifest_hash: str
    train: ShardLoader
    val: ShardLoader


def open_data(cfg: TrainConfig) -> TrainData:
    """Every rank walks the same sequence of *global* batches and keeps its slice of each, so a
    global batch holds the same samples whatever the world size: 1 and W workers take the same
    optimisation steps (the reducer makes the per-element mean exact), the loader state does not
    depend on W, and no sample is padded in. The price is that each rank decodes every batch
    (cheap next to the LSTM; revisit for very large, I/O-bound data)."""
    t = cfg.train
    manifest = load_manifest(cfg.data, verify=True)  # every shard's sha256, once per worker
    train = ShardLoader(cfg.data, "train", batch_size=t.batch_size, seed=t.seed, fold=cfg.fold,
                        verify=False)
    val = ShardLoader(cfg.data, "val", batch_size=t.batch_size, seed=t.seed, shuffle=False,
                      with_ohlc=True, fold=cfg.fold, verify=False)
    return TrainData(manifest, manifest_hash(manifest), train, val)


def prepare_step(objective: Objective, optim: Optimization, t: TrainSection, runtime: Runtime,
                 graphs: bool, replay: str) -> TrainStep:
    """The module the runtime prepares (DDP under W workers), and the step that trains it.

    Graphed DDP: DDP is built on the side stream the step warms up and captures on (PyTorch's
    CUDA-graph notes); eager runs build it as usual. Call after the restore: DDP broadcasts
    rank 0's parameters when it is built."""
    device, world = runtime.device, runtime.world
    stream = torch.cuda.Stream(device) if graphs and device.type == "cuda" else None
    with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
        model = runtime.prepare_model(objective.module)
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)  # DDP's broadcast ran there
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # DDP records and waits on CUDA events in the forward of iterations <= 10 and every
            # 100th (runtime logging): never inside a captured forward.
            model._set_ddp_runtime_logging_sample_rate(2**31 - 1)
    return TrainStep(model, optim.optimizer, objective.tasks, t.grad_clip, device, graphs=graphs,
                     warmup=WARMUP_DDP if world > 1 else WARMUP_SINGLE, replay=replay,
                     stream=stream, fallback=t.cuda_graphs == "auto" and world == 1)


def train_epoch(run: RunState, step: TrainStep, t: TrainSection) -> TrainedEpoch:
    """This rank's slice of each global batch of the epoch, from where the loader stands (a
    mid-epoch resume skips the batches consumed), with the mid-epoch checkpoints."""
    runtime, progress, position = run.runtime, run.progress, run.position
    step.model.train()
    started, started_at = time.perf_counter(), time.time()
    # The sums stay on the device (no host sync per step) until the epoch's one all-reduce; the
    # step adds to them in place (a captured step holds this very tensor).
    sums = step.loss_sums  # [2, T]: element-loss sums and counts
    sums.zero_()
    # Resumed mid-epoch: the steps before the checkpoint, as global sums and counts (held by
    # rank 0, whatever the world size then).
    partial = progress.take_partial()
    samples = resumed = (seed_partial(sums, partial)
                         if partial is not None and runtime.rank == 0 else 0)
    replayed_before = step.counts["replayed"]
    # On CUDA the feed copies the next batch while this step runs, so the loader is one batch
    # ahead of feed.loader_state (the position a checkpoint records).
    feed = DeviceFeed(position.loader, runtime.rank, runtime.world, runtime.device)
    for batch in feed:
        if STOP.is_set():
            raise Stopped("stopped by the driver")
        last = position.ends_epoch(feed.loader_state)
        probe = (run.objective.probe_hook(step.model)
                 if probe_due(t.probe, t.probe_every, progress.step, last) else None)
        step(batch, feed.global_size, t.batch_size, probe)
        run.optim.after_step()
        progress.step += 1
        samples += feed.rows
        position.trained_through(feed.loader_state)
        if mid_epoch_checkpoint_due(progress.step, t.checkpoint_every_steps, last):
            run.save(partial=epoch_so_far(sums, samples))
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()  # kernels are queued; time what ran
    return TrainedEpoch(sums, samples, resumed, time.perf_counter() - started, started_at,
                        step.counts["replayed"] - replayed_before)


def evaluate(model: torch.nn.Module, objective: Objective, loader: ShardLoader,
             runtime: Runtime) -> Validation:
    """The val split on every rank, each its slice of each global batch."""
    model.eval()
    val = objective.validation(runtime.device)
    with torch.no_grad():
        for batch in DeviceFeed(loader, runtime.rank, runtime.world, runtime.device):
            _, _, outputs = model(batch)
            val.update(batch, outputs)
    return val
