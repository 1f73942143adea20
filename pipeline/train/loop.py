"""The worker loop: what every Ray Train worker runs, top to bottom.

Plain PyTorch; Ray appears only at the edges (get_context, prepare_model, get_checkpoint,
report). The same function runs in Ray Train local mode (`--workers 0`, in the driver process,
no process group) and as W worker actors with DDP.

Order of one epoch: train on this rank's slice of each global batch (the reducer makes the
per-element mean exact over ranks), evaluate the val split on all ranks, all-reduce the
metrics, rank 0 appends one record to metrics.jsonl, then every rank reports its part of the
checkpoint (ray.train.report is a barrier: every rank calls it the same number of times).

The epoch's train and val losses are per-element means over the whole epoch: each step adds its
element-loss sums and element counts per task, and the epoch divides the all-reduced sum by the
all-reduced count once (`pooled_losses`). So the figure is that of one pooled batch over the
split, whatever the batch size, the number of workers, a half-full last batch, batches with only
unlabeled rows, or a resume on another worker count in the middle of the epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

import ray.train
import ray.train.torch

from pipeline import storage
from pipeline.config import TrainConfig, config_hash
from pipeline.data.loader import ShardLoader
from pipeline.data.manifest import load_manifest
from pipeline.evaluate.threshold import threshold_from_predictions
from pipeline.model import JadeCompact, JadeConfig
from pipeline.reducer import (LOSS_STATS, GradientProbe, LossConfig, MultiTaskModel,
                              build_weighting)
from pipeline.train import checkpoint as ckpt
from pipeline.train.device_feed import DeviceFeed, autocast_model
from pipeline.report.run import epochs_text
from pipeline.train.metrics import TaskMetrics
from pipeline.train.rundir import MetricsLog, write_predictions, write_worker_marker
from pipeline.train.step import (WARMUP_DDP, WARMUP_SINGLE, TrainStep, graph_plan,
                                 load_optimizer_state, make_optimizer, make_scheduler,
                                 portable_state)

# Stand-in score for mid-epoch checkpoints (no val metric yet): ranked below every epoch end.
WORST = {"min": 1e30, "max": -1e30}


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = _config(loop_config)
    local_mode = loop_config["local_mode"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":  # fixed batch shapes: let cuDNN pick its fastest LSTM kernels
        torch.backends.cudnn.benchmark = True
    t, seed = cfg.train, cfg.train.seed
    write_worker_marker(cfg.out, rank, world)

    # Data: every rank walks the same sequence of *global* batches and keeps its slice of each,
    # so a global batch holds the same samples whatever the world size: 1 and W workers take
    # the same optimisation steps (the reducer makes the per-element mean exact), the loader
    # state does not depend on W, and no sample is padded in. The price is that each rank
    # decodes every batch (cheap next to the LSTM; revisit for very large, I/O-bound data).
    manifest = load_manifest(cfg.data, verify=True)  # every shard's sha256, once per worker
    manifest_hash = _manifest_hash(manifest)
    train_loader = ShardLoader(cfg.data, "train", batch_size=t.batch_size, seed=seed,
                               fold=cfg.fold, verify=False)
    val_loader = ShardLoader(cfg.data, "val", batch_size=t.batch_size, seed=seed,
                             shuffle=False, with_ohlc=True, fold=cfg.fold, verify=False)
    steps_per_epoch = len(train_loader)

    # Model: the same seed on every rank gives the same initial weights (DDP also broadcasts
    # rank 0's); the weighting's log-variances live inside the module DDP wraps.
    torch.manual_seed(seed)
    model_cfg = JadeConfig(n_features=len(manifest["features"]), **_section(cfg.model))
    loss_cfg = LossConfig(**_section(cfg.loss))
    weighting = build_weighting(loss_cfg.weighting, model_cfg.tasks, loss_cfg.weighting_options)
    multitask = MultiTaskModel(JadeCompact(model_cfg), weighting, loss_cfg).to(device)
    if t.precision == "bf16":  # the LSTM and heads only: losses stay fp32
        autocast_model(multitask.model, device)
    graphs, replay = graph_plan(t.cuda_graphs, device, world, where="this worker")
    # Fused AdamW on CUDA (one kernel for all parameters); capturable when graphed.
    optimizer = make_optimizer(multitask.param_groups(t.lr, t.weight_decay, t.weighting_lr),
                               device, graphs)
    scheduler = make_scheduler(optimizer, t.scheduler, t.epochs * steps_per_epoch)
    probe = GradientProbe()  # measured by hand below: at each epoch's last batch (+ every N)

    # Resume: Ray hands back the latest reported checkpoint after a failure or for a run
    # restarted by name; local mode gets it from the driver (Ray keeps none on disk there).
    epoch, step, best, bad_epochs, partial = 0, 0, None, 0, None
    checkpoint = ray.train.get_checkpoint()
    resume_dir = loop_config.get("resume_from")
    with (checkpoint.as_directory() if checkpoint else _nullpath(resume_dir)) as cdir:
        if cdir:
            state = ckpt.read_state(cdir)
            _check_resumable(state, cfg, manifest_hash, cdir)
            multitask.load_state_dict(state["multitask"])
            load_optimizer_state(optimizer, state["optimizer"], device, graphs)
            scheduler.load_state_dict(state["scheduler"])
            train_loader.load_state_dict(state["loader"])
            vars(probe).update(state["probe"])
            epoch, step = state["epoch"], state["step"]
            best, bad_epochs = state["best"], state["bad_epochs"]
            partial = state["partial"]  # sums of a half-done epoch, so its record is exact
            rng = ckpt.read_rng(cdir, rank)
            if rng is not None and state["world_size"] == world:
                ckpt.restore_rng(rng)
            else:  # a different world size cannot replay the same dropout: reseed per rank
                torch.manual_seed(seed * 1000 + rank + 1 + step)
        else:
            train_loader.set_epoch(0)
            torch.manual_seed(seed * 1000 + rank + 1)  # dropout differs per rank, fixed by seed

    # Graphed DDP: DDP is built on the side stream the step warms up and captures on
    # (PyTorch's CUDA-graph notes); eager runs build it as usual.
    stream = torch.cuda.Stream(device) if graphs and device.type == "cuda" else None
    with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
        model = ray.train.torch.prepare_model(multitask)
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)  # DDP's broadcast ran there
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # DDP records and waits on CUDA events in the forward of iterations <= 10 and every
            # 100th (runtime logging): never inside a captured forward.
            model._set_ddp_runtime_logging_sample_rate(2**31 - 1)
    train_step = TrainStep(model, optimizer, model_cfg.tasks, t.grad_clip, device, graphs=graphs,
                           warmup=WARMUP_DDP if world > 1 else WARMUP_SINGLE, replay=replay,
                           stream=stream, fallback=t.cuda_graphs == "auto" and world == 1)
    log = MetricsLog(cfg.out, keep_before_epoch=epoch) if rank == 0 else None
    sink = _epoch_sink(cfg) if rank == 0 else None
    score_attr = "best_score"

    def save_and_report(metrics: dict, record: dict | None, partial=None,
                        loader_state: dict | None = None) -> None:
        """Every rank writes its part, then reports; Ray merges the parts into one directory.
        loader_state: the state after the last trained batch (the feed may be one ahead)."""
        state = meta = None
        if rank == 0:
            state = {"multitask": multitask.state_dict(), "model": multitask.model.state_dict(),
                     # tensor learning rates (graphed runs) as floats: loadable anywhere
                     "optimizer": portable_state(optimizer.state_dict()),
                     "scheduler": portable_state(scheduler.state_dict()),
                     "loader": loader_state or train_loader.state_dict(),
                     "probe": dict(vars(probe)),
                     "epoch": epoch, "step": step, "best": best, "bad_epochs": bad_epochs,
                     "partial": partial, "world_size": world, "config_hash": config_hash(cfg),
                     "manifest_hash": manifest_hash, "model_config": vars(model_cfg),
                     "run_id": cfg.run_id}
            meta = {k: state[k] for k in ("epoch", "step", "world_size", "config_hash",
                                          "manifest_hash", "run_id", "best")}
            meta["loader"] = state["loader"]
            meta["record"] = record
        name = ckpt.checkpoint_name(epoch, step)
        tmp = tempfile.mkdtemp(prefix="moola-ckpt-")
        try:
            ckpt.write_checkpoint(tmp, rank, state, meta)
            if local_mode:  # Ray keeps local-mode checkpoints in memory only: persist to OUT
                _persist_local(cfg.out, tmp, name, t.keep_checkpoints, best)
            # SYNC upload: the files are in storage when report returns, so tmp can go.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    while epoch < t.epochs:
        # ---- train ----------------------------------------------------------------------
        model.train()
        started, started_at = time.perf_counter(), time.time()
        # Sums stay on the device (no host sync per step) until the epoch's one all-reduce; the
        # step adds to them in place (a captured step holds this very tensor).
        loss_sums = train_step.loss_sums  # [2, T]: element-loss sums and counts
        loss_sums.zero_()
        samples, resumed_samples = 0, 0
        replayed_before = train_step.counts["replayed"]
        if partial is not None and rank == 0:  # resumed mid-epoch: the steps before the
            # checkpoint, as global sums and counts (held by rank 0, whatever the world size then)
            samples = resumed_samples = _seed_partial(loss_sums, partial)
        partial = None
        # Resumes mid-epoch: the loader skips consumed batches. On CUDA the feed copies the
        # next batch while this step runs, so the loader is one batch ahead of feed.loader_state.
        feed = DeviceFeed(train_loader, rank, world, device)
        for batch in feed:
            last_batch = feed.loader_state["batches_consumed"] == steps_per_epoch
            probe_now = t.probe and (last_batch or (t.probe_every and (step + 1) % t.probe_every == 0))
            # forward, (probe), backward, clip, optimizer step, loss sums: eager or one graph
            train_step(batch, feed.global_size, t.batch_size,
                       (lambda losses: probe.measure(model, losses)) if probe_now else None)
            if scheduler.needs_step:  # a constant rate costs no launch per step
                scheduler.step()
            step += 1
            samples += feed.rows
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 \
                    and feed.loader_state["batches_consumed"] < steps_per_epoch:
                sums = torch.cat([loss_sums.flatten(), _f64([samples], device)])
                _all_reduce(sums)  # the epoch so far over all ranks, for an exact record later
                save_and_report({"epoch": epoch, "step": step, score_attr: WORST[t.best_mode]},
                                None, sums.cpu(), feed.loader_state)
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels are queued; time what ran
        train_time = time.perf_counter() - started

        # ---- evaluate the val split on every rank -------------------------------------
        model.eval()
        metrics = TaskMetrics(model_cfg.tasks, num_classes=model_cfg.num_classes,
                              countdown_scale=loss_cfg.countdown_scale, device=device)
        val_sums = torch.zeros_like(loss_sums)
        preds: list[dict] = []
        with torch.no_grad():
            for batch in DeviceFeed(val_loader, rank, world, device):
                _, losses, outputs = model(batch)
                metrics.update(outputs, batch)
                val_sums += outputs[LOSS_STATS]
                preds.append(_predictions(outputs, batch))

        # One collective for the element sums and counts of train and val and the sample counts.
        n_stats = loss_sums.numel()
        sums = torch.cat([loss_sums.flatten(), val_sums.flatten(),
                          _f64([samples, resumed_samples], device)])
        _all_reduce(sums)
        sums = sums.cpu()
        train_loss, train_elements = pooled_losses(sums[:n_stats], model_cfg.tasks)
        val_loss, val_elements = pooled_losses(sums[n_stats:2 * n_stats], model_cfg.tasks)
        g_samples, g_resumed = sums[2 * n_stats:].tolist()
        stats = metrics.state()  # sums and counts: their all-reduce is exact over ranks
        _all_reduce(stats)
        task_metrics = metrics.compute(stats)
        epoch += 1
        train_loader.set_epoch(epoch)

        grads = probe.last or {}
        base_weighting = multitask.weighting
        record = {
            "epoch": epoch - 1, "step": step, "world_size": world, "run_id": cfg.run_id,
            "train": train_loss, "val": val_loss,
            "val_loss": sum(v for v in val_loss.values() if v is not None),
            "elements": {"train": train_elements, "val": val_elements},
            "weights": base_weighting.effective_weights(), "log_vars": base_weighting.log_vars(),
            "grad_norm": grads.get("grad_norm"), "grad_share": grads.get("grad_share"),
            "grad_ratio_countdown_pointer": grads.get("grad_ratio_countdown_pointer"),
            "starving": probe.starving(),
            **task_metrics,
            # the samples this process trained (a resumed epoch's earlier part ran before)
            "samples_per_s": (g_samples - g_resumed) / train_time if train_time > 0 else None,
            "epoch_time_s": train_time, "started_at": started_at,
            "lr": float(optimizer.param_groups[0]["lr"]),
            # steps replayed from the CUDA graph (this rank; 0 when eager)
            "graphed_steps": train_step.counts["replayed"] - replayed_before,
        }

        # Best checkpoint and early stopping: every rank decides the same from the same
        # all-reduced record, so no broadcast is needed.
        score = _lookup(record, t.best_metric)  # None: nothing to score this epoch
        improved = score is not None and (best is None or (
            score < best["score"] if t.best_mode == "min" else score > best["score"]))
        if improved:
            best, bad_epochs = {"score": score, "epoch": epoch - 1,
                                "checkpoint": ckpt.checkpoint_name(epoch, step)}, 0
        else:
            bad_epochs += 1
        record["best_epoch"] = best["epoch"] if best else None
        if improved:  # rank 0 keeps the whole val split's predictions of the best epoch
            gathered = _gather(preds, world)
            if rank == 0:
                write_predictions(cfg.out, _merge_predictions(gathered, epoch - 1))
                # the span threshold of the best checkpoint, chosen on these val predictions
                threshold_from_predictions(cfg.out)
        if rank == 0:
            _warn_empty_tasks(record)
            log.append(record)
            if sink is not None:
                sink.on_epoch(record)
        stop = t.early_stop_patience and bad_epochs >= t.early_stop_patience
        save_and_report({"epoch": epoch - 1, "step": step,
                         score_attr: WORST[t.best_mode] if score is None else score}, record)
        if stop:
            if rank == 0:
                best_text = (f"best {best['score']:.4g} at epoch {best['epoch'] + 1}" if best
                             else "never scored")
                print(f"early stopping after epoch {epoch}/{t.epochs}: {t.best_metric} has not "
                      f"improved for {epochs_text(bad_epochs)} ({best_text})", flush=True)
            break


# ------------------------------------------------------------------------------- helpers

def _config(loop_config: dict) -> TrainConfig:
    from pipeline.config import load_config
    return load_config(None, None, base=loop_config["config"])


def _section(section) -> dict:
    return dict(vars(section))


def _manifest_hash(manifest: dict) -> str:
    import hashlib
    import json
    body = {k: v for k, v in manifest.items() if k != "created"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_resumable(state: dict, cfg: TrainConfig, manifest_hash: str, where: str) -> None:
    from pipeline.errors import UserError
    if state["manifest_hash"] != manifest_hash:
        raise UserError(f"checkpoint {where} was trained on other data (manifest hash "
                        f"{state['manifest_hash']} != {manifest_hash}): resume with the same --data")
    if state["config_hash"] != config_hash(cfg):
        raise UserError(f"checkpoint {where} was written with another model/loss/optimiser "
                        f"config: resume with the run's own config.yaml")


class _nullpath:
    """`with` over an optional local directory, shaped like Checkpoint.as_directory()."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        return False


def pooled_losses(stats: torch.Tensor, tasks) -> tuple[dict, dict]:
    """(per-task mean loss, per-task element count) from all-reduced [2, T] sums and counts
    (flattened or not). A task without an element has no mean: None (JSON null), not 0."""
    sums, counts = stats.reshape(2, -1).double()
    means = {t: (float(sums[i] / counts[i]) if counts[i] > 0 else None) for i, t in enumerate(tasks)}
    return means, {t: int(counts[i]) for i, t in enumerate(tasks)}


def _seed_partial(loss_sums: torch.Tensor, partial: torch.Tensor) -> int:
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


def _warn_empty_tasks(record: dict) -> None:
    """A task with no element in a split this epoch trained or scored on nothing: say so."""
    for split, counts in record["elements"].items():
        empty = sorted(t for t, n in counts.items() if n == 0)
        if empty:
            print(f"warning: epoch {record['epoch'] + 1}: no {split} element for "
                  f"{', '.join(empty)} (no labeled window with a target): "
                  f"{'its loss is' if len(empty) == 1 else 'their losses are'} not defined",
                  flush=True)


def _f64(values, device=None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def _all_reduce(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _gather(obj, world: int) -> list:
    if world > 1 and dist.is_available() and dist.is_initialized():
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _lookup(record: dict, key: str) -> float | None:
    """The record's value at a dotted key (checked against the record's keys before training);
    None when there was nothing to score (e.g. span F1 with no labeled val window)."""
    value = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None or isinstance(value, bool) or math.isnan(float(value)):
        return None
    return float(value)


def _predictions(outputs: dict, batch: dict) -> dict:
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


def _merge_predictions(per_rank: list[list[dict]], epoch: int) -> dict:
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


def _persist_local(out: str, tmp: str, name: str, keep: int, best: dict | None) -> None:
    """Local mode: copy the checkpoint into OUT and prune old ones (newest and best stay)."""
    from pipeline.train.rundir import checkpoint_dirs
    dest = storage.join(out, name)
    storage.makedirs(dest)
    # meta.json goes last: a copy cut short (disk full, S3 down) has no meta.json, and resume
    # takes only checkpoints that have one (trainer.latest_local_checkpoint).
    for file in sorted(os.listdir(tmp), key=lambda f: f == ckpt.META_FILE):
        storage.upload_file(os.path.join(tmp, file), storage.join(dest, file))
    names = checkpoint_dirs(out)
    keep_names = set(names[-keep:]) | {name} | ({best["checkpoint"]} if best else set())
    for old in names:
        if old not in keep_names:
            storage.remove_tree(storage.join(out, old))


def _epoch_sink(cfg: TrainConfig):
    """The report engineer's per-epoch hook (console line, TensorBoard, MLflow, alarms)."""
    try:
        from pipeline.report.live import EpochSink
    except ImportError:
        return None
    return EpochSink(cfg.out, cfg.to_dict())
