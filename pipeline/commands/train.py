"""`moola-pipeline train`: one training run, locally or on a Ray cluster.

Thin: flags -> `pipeline.config` -> `pipeline.train.trainer.run_training` -> the final lines.
torch and Ray are imported inside the command so `--help` stays fast.
"""

from __future__ import annotations

import sys

import click

from pipeline.errors import UserError

# CLI flag -> dotted config key. A flag left out keeps the config file's value (or the default).
FLAG_KEYS = {
    "data": "data", "out": "out", "workers": "cluster.workers",
    "gpus_per_worker": "cluster.gpus_per_worker", "address": "cluster.address",
    "max_failures": "cluster.max_failures", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "lr": "train.lr", "balance": "loss.weighting",
    "seed": "train.seed", "checkpoint_every": "train.checkpoint_every_steps",
    "best_metric": "train.best_metric", "patience": "train.early_stop_patience",
    "fold": "fold",
}


@click.command()
@click.option("--data", metavar="URI", help="Shard directory (local path or s3://) with manifest.json.")
@click.option("--out", metavar="URI", required=True, help="Run directory (local path or s3://).")
@click.option("--config", "config_path", metavar="YAML", help="Run config file; flags override it.")
@click.option("--workers", type=int, help="Ray Train workers; 0 = local mode in this process. [2]")
@click.option("--gpus-per-worker", type=float, help="GPUs per worker (NCCL when > 0). [0]")
@click.option("--epochs", type=int, help="Epochs. [20]")
@click.option("--batch-size", type=int, help="Global batch; each worker takes B/W. [32]")
@click.option("--lr", type=float, help="Learning rate (AdamW). [1e-3]")
@click.option("--balance", metavar="STRATEGY", help="Task weighting (loss.weighting). [uncertainty]")
@click.option("--seed", type=int, help="Seed for data order, initialisation and dropout. [0]")
@click.option("--address", metavar="auto|HOST:PORT",
              help="Join this Ray cluster (token from RAY_AUTH_TOKEN); default: start a local "
                   "Ray sized to this machine. 'local' means the same as leaving it out.")
@click.option("--max-failures", type=int, help="Worker failures to recover from. [0]")
@click.option("--checkpoint-every", type=int, metavar="STEPS",
              help="Also checkpoint every STEPS steps within an epoch. [0: epoch ends only]")
@click.option("--best-metric", metavar="KEY",
              help="Metrics-record key that picks the best checkpoint. [val_loss]")
@click.option("--patience", type=int, help="Early stopping: epochs without improvement. [0: off]")
@click.option("--fold", type=int, metavar="I",
              help="Train on cross-validation fold I of --data (from `data shard --folds K`); "
                   "its val is the fold's test block.")
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
# Console only, not a run setting: kept out of the command's params (ctx.meta instead), which
# `submit` maps onto config keys.
@click.option("--verbose", is_flag=True, expose_value=False,
              callback=lambda ctx, _param, value: ctx.meta.__setitem__("verbose", value),
              help="Show Ray's own output (worker prefixes, Ray's logging) on the console "
                   "instead of keeping it in OUT/ray.log (a local run).")
def train(config_path, resume, **flags):
    """Train JadeCompact on sharded data with Ray Train (DDP)."""
    from pipeline.config import load_config

    if flags.get("address") == "local":
        flags["address"] = None
    overrides = {FLAG_KEYS[k]: v for k, v in flags.items() if v is not None}
    if resume:
        cfg = load_config(config_path, overrides)  # checked against the saved run below
        file_overrides = _file_keys(config_path)
        file_overrides.update(overrides)
        overrides = file_overrides
    else:
        if not flags.get("data"):
            raise UserError("missing --data URI (a shard directory with manifest.json)")
        cfg = load_config(config_path, overrides).validate()

    from pipeline.train.trainer import RunInterrupted

    verbose = click.get_current_context().meta.get("verbose", False)
    say = lambda line: click.echo(line, err=True)  # noqa: E731  (stdout: the final lines)
    try:
        summary = _run(cfg, resume, overrides, say, verbose)
    except KeyboardInterrupt:  # before training started (inside it, run_training says more)
        raise UserError(f"interrupted before training started; {_again(cfg.out)}") from None
    except RunInterrupted as exc:
        _exit_now(exc)
    _print_summary(summary)


def _exit_now(exc) -> None:
    """Training threads may still run (local mode's torch, Ray's fit thread; Ray itself is
    already stopped): a normal interpreter exit would abort in their C++ code (SIGABRT,
    "terminate called without an active exception") instead of exiting with the signal's code."""
    import os

    click.echo(f"error: {exc.format_message()}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exc.exit_code)


def _again(out: str) -> str:
    from pipeline import storage
    from pipeline.train import rundir
    if out and storage.exists(storage.join(out, rundir.CONFIG)):
        return f"continue with `moola-pipeline train --out {out} --resume`"
    return "nothing was written: run the same command again"


def _run(cfg, resume: bool, overrides: dict, say, verbose: bool):
    from pipeline.train.trainer import PlainProgress, RichProgress, run_training

    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("epochs"), TimeElapsedColumn(), transient=False) as bar:
            summary = run_training(cfg, resume, overrides, progress=RichProgress(cfg, bar),
                                   say=lambda line: bar.console.print(line, markup=False),
                                   verbose=verbose)
    else:
        summary = run_training(cfg, resume, overrides, progress=PlainProgress(cfg), say=say,
                               verbose=verbose)
    return summary


def _print_summary(summary) -> None:
    from pipeline.report.run import epochs_text
    last = summary.last_record or {}
    if summary.finished_before:
        click.echo(f"--resume: the run in {summary.out} is already finished "
                   f"({epochs_text(summary.epochs_done)}, step {last.get('step')}); nothing to train. "
                   "Pass a larger --epochs to train it further")
    click.echo(f"run {summary.run_id}: {epochs_text(summary.epochs_done)}, step {last.get('step')}, "
               f"output in {summary.out}")
    best = "none" if summary.best_epoch is None else f"epoch {summary.best_epoch + 1}"
    if summary.ray_log:
        click.echo(f"Ray's own output: {summary.ray_log} (--verbose shows it on the console instead)")
    click.echo(f"best checkpoint ({best}): {summary.best_checkpoint}; "
               f"report: {summary.report or 'not written (report module missing)'}")


def _file_keys(config_path: str | None) -> dict:
    """A --config given with --resume: its keys, dotted, as overrides of the saved config."""
    if not config_path:
        return {}
    from pipeline.config import read_yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "weighting_options":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return flat(read_yaml(config_path))
