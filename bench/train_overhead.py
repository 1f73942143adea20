"""What Ray Train costs us: steady-state samples/s of `moola-pipeline train` with 1 Ray worker
against a plain PyTorch loop on the same model, data, batch size and CPU threads, in one run;
plus the time from command start to the first training step.

    .venv/bin/python bench/train_overhead.py [--train 2048] [--batch-size 32] [--epochs 3]
                                             [--threads 2] [--hidden 96]

The plain loop is the pipeline's own step without Ray: ShardLoader -> MultiTaskModel ->
backward -> AdamW, no DDP, no gradient probe (the pipeline runs with `train.probe: false`), no
eval, no checkpoints. The pipeline figure is
its metrics.jsonl `samples_per_s` (training phase of each epoch) over epochs 1.. (epoch 0 holds
warm-up), and, end to end, samples per second between the starts of consecutive epochs
(training + distributed eval + checkpoint + metrics record). The worker gets `--threads` CPUs
(Ray sets its OMP/torch threads to that), the plain loop the same torch thread count.
Goal (issue 4): pipeline >= 0.9 x plain. Figures depend on machine load: rerun on a quiet box.

    .venv/bin/python bench/train_overhead.py --run-end [--workers 0,1,2] [--end-epochs 2]

The end of a run instead: for each worker count, a small 2-epoch run's command wall time, and
how long after its last epoch's record (metrics.jsonl written) the report was written and the
command exited. Each run is made twice: as is, and with RAY_ADDRESS naming a dead address in the
command's environment, which is what Ray's placement-group cleaner sees when a stale cluster is
recorded (/tmp/ray/ray_current_cluster left by an earlier `ray start`, ray#65443 and related).
Run it from an old checkout (a git worktree) for the figures before a change.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_data(path: str, n_train: int, n_val: int) -> None:
    from pipeline.data.shards import random_chunks, write_shard_set
    names = [f"f{i}" for i in range(12)]
    write_shard_set(path, names, itertools.chain(random_chunks(n_train, split="train", seed=0),
                                                 random_chunks(n_val, split="val", seed=1)))


def plain_loop(data: str, batch_size: int, epochs: int, threads: int, hidden: int) -> list[float]:
    """samples/s of each epoch of a plain PyTorch loop over the same batches."""
    import torch

    from pipeline.data.loader import ShardLoader
    from pipeline.model import JadeCompact, JadeConfig
    from pipeline.reducer import LossConfig, MultiTaskModel, build_weighting

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_cfg = JadeConfig(hidden=hidden)
    loss_cfg = LossConfig()
    model = MultiTaskModel(JadeCompact(model_cfg),
                           build_weighting(loss_cfg.weighting, model_cfg.tasks), loss_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loader = ShardLoader(data, "train", batch_size=batch_size, seed=0, verify=False)
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        start, samples = time.perf_counter(), 0
        for batch in loader:
            total, _, _ = model(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            samples += batch["label"].shape[0]
        rates.append(samples / (time.perf_counter() - start))
    return rates


def pipeline_run(data: str, out: str, batch_size: int, epochs: int, threads: int,
                 hidden: int, workers: int = 1,
                 extra_env: dict | None = None) -> tuple[list[dict], float, float]:
    """(records, command start time, command wall seconds) of a local Ray run with `workers`
    workers (0: Ray Train local mode, the same loop in the command's own process)."""
    cfg = Path(out + ".yaml")
    # Gradient diagnostics off, as issue 3 asks for benchmarks (the plain loop has none).
    cfg.write_text(f"model:\n  hidden: {hidden}\ntrain:\n  probe: false\n"
                   f"cluster:\n  cpus_per_worker: {threads}\n")
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--data", data, "--out", out,
           "--config", str(cfg), "--workers", str(workers), "--epochs", str(epochs),
           "--batch-size", str(batch_size), "--seed", "0"]
    t0 = time.time()
    env = dict(os.environ)
    if workers == 0:  # in-process: give torch the same thread count the worker gets
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"pipeline run failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    return records, t0, wall


STALE = {"RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens there: a cluster that is gone


def run_end(workers_list: list[int], epochs: int) -> None:
    """Seconds from the last record to the report and to the command's exit, per worker count."""
    print(f"end of a run: {epochs} epochs of 48 windows, batch 8, hidden 16; seconds after the "
          "last epoch's record (metrics.jsonl written)")
    print(f"{'workers':>7} {'RAY_ADDRESS':>14} {'command':>8} {'start->1st':>10} "
          f"{'->report':>9} {'->exit':>7}")
    with tempfile.TemporaryDirectory(prefix="moola-bench-end-") as tmp:
        data = os.path.join(tmp, "shards")
        make_data(data, 48, 12)
        for workers in workers_list:
            for label, env in (("unset", None), ("stale", STALE)):
                out = os.path.join(tmp, f"run-w{workers}-{label}")
                records, t0, wall = pipeline_run(data, out, 8, epochs, 1, 16, workers, env)
                last = os.path.getmtime(os.path.join(out, "metrics.jsonl"))
                report = os.path.join(out, "report.html")
                to_report = os.path.getmtime(report) - last if os.path.exists(report) else None
                shown = "none" if to_report is None else f"{to_report:9.1f}"
                print(f"{workers:7d} {label:>14} {wall:8.1f} {records[0]['started_at'] - t0:10.1f} "
                      f"{shown:>9} {t0 + wall - last:7.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-end", action="store_true", help="measure the end of a run only")
    ap.add_argument("--workers", default="0,1,2", help="worker counts for --run-end")
    ap.add_argument("--end-epochs", type=int, default=2, help="epochs of each --run-end run")
    ap.add_argument("--train", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--hidden", type=int, default=96)
    args = ap.parse_args()
    if args.run_end:
        run_end([int(w) for w in args.workers.split(",")], args.end_epochs)
        return

    with tempfile.TemporaryDirectory(prefix="moola-bench-") as tmp:
        data = os.path.join(tmp, "shards")
        make_data(data, args.train, 64)
        plain = plain_loop(data, args.batch_size, args.epochs, args.threads, args.hidden)
        records, t0, wall = pipeline_run(data, os.path.join(tmp, "run"), args.batch_size,
                                         args.epochs, args.threads, args.hidden)
        local, _, _ = pipeline_run(data, os.path.join(tmp, "local"), args.batch_size,
                                   args.epochs, args.threads, args.hidden, workers=0)

    steady = lambda xs: sum(xs[1:]) / len(xs[1:]) if len(xs) > 1 else xs[0]  # noqa: E731
    plain_sps = steady(plain)
    pipe_sps = steady([r["samples_per_s"] for r in records])
    starts = [r["started_at"] for r in records]
    e2e = [args.train / (b - a) for a, b in zip(starts[1:], starts[2:])] or [float("nan")]
    e2e_sps = sum(e2e) / len(e2e)
    print(f"model hidden={args.hidden}, {args.train} train windows, global batch "
          f"{args.batch_size}, {args.threads} CPU thread(s), {args.epochs} epochs (epoch 0 = warm-up)")
    print(f"plain PyTorch loop        {plain_sps:10.1f} samples/s  (per epoch: "
          f"{', '.join(f'{x:.0f}' for x in plain)})")
    print(f"pipeline, 1 Ray worker    {pipe_sps:10.1f} samples/s  training phase  "
          f"ratio {pipe_sps / plain_sps:.2f}  (goal >= 0.9)")
    local_sps = steady([r["samples_per_s"] for r in local])
    print(f"pipeline, local mode      {local_sps:10.1f} samples/s  training phase, no Ray "
          f"processes  ratio {local_sps / plain_sps:.2f}")
    print(f"pipeline, end to end      {e2e_sps:10.1f} samples/s  train+eval+checkpoint+record  "
          f"ratio {e2e_sps / plain_sps:.2f}")
    print(f"command start -> first step {starts[0] - t0:6.1f} s   (whole command {wall:.1f} s)")


if __name__ == "__main__":
    main()
