"""GPU step throughput (issue 8): the pipeline's worker loop against a plain loop, same run.

    .venv/bin/python bench/gpu_step.py [--batches 32,256,2048,8192] [--steps N] [--epochs 3]
                                       [--workers 1] [--graphs auto|off] [--quick]

(a) plain: MultiTaskModel (JadeCompact, all four heads) + AdamW (fused on CUDA), one batch
    already on the device, the same step repeated: forward, backward, clip, step. No loader.
(g) graphed plain (CUDA only): the same step captured as one CUDA graph by the textbook recipe
    (static batch, 3 warm-up steps on a side stream, capturable fused AdamW with a tensor lr),
    replayed. It does not use the pipeline's code: it is the ceiling issue 8 measures against.
(b) pipeline: `moola-pipeline train` on shards of `--steps` batches (on CUDA by default
    max(30, 32768 / batch): an epoch of a few hundred ms, so per-epoch costs such as opening
    the shards do not pass for step time at batch 32), its metrics.jsonl
    `samples_per_s` (training phase) over epochs 1.. (epoch 0 is warm-up). `--workers 1` is one
    Ray Train worker (1 GPU on CUDA); `--workers 0` is Ray Train local mode (the same loop in
    the command's own process, where its GPU memory can be read).
(loader) the ShardLoader alone over the same shards: it must outrun (g), or it is the bottleneck.

On CUDA: batches 32..8192, fp32 and bf16. On CPU: the same comparison at small sizes (`--quick`:
batch 32 and 256, few steps, local mode) so it stays tested; bf16 and (g) are CUDA only. Prints
one line per (batch, precision): samples/s of a, g and b, b/g (the issue's ratio: >= 0.7 at
batch 32 and 256, >= 0.85 from 2,048), b/a, loader samples/s, peak GPU memory. `--graphs off`
runs (b) with train.cuda_graphs off (the eager worker loop) for comparison.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN = 96  # JadeCompact defaults: F=12, all heads


def make_data(path: str, n_train: int, n_val: int) -> None:
    from pipeline.data.shards import random_chunks, write_shard_set
    names = [f"f{i}" for i in range(12)]
    write_shard_set(path, names, itertools.chain(random_chunks(n_train, split="train", seed=0),
                                                 random_chunks(n_val, split="val", seed=1)))


def plain_step_rate(data: str, batch_size: int, steps: int, precision: str, device,
                    graphed: bool = False) -> tuple[float, int]:
    """(samples/s, peak bytes) of the plain loop with one batch resident on the device;
    `graphed`: the step captured as one CUDA graph and replayed."""
    from pipeline.data.loader import ShardLoader
    from pipeline.model import JadeCompact, JadeConfig
    from pipeline.reducer import LossConfig, MultiTaskModel, build_weighting
    from pipeline.train.device_feed import autocast_model

    torch.manual_seed(0)
    model_cfg, loss_cfg = JadeConfig(hidden=HIDDEN), LossConfig()
    model = MultiTaskModel(JadeCompact(model_cfg),
                           build_weighting(loss_cfg.weighting, model_cfg.tasks), loss_cfg).to(device)
    if precision == "bf16":
        autocast_model(model.model, device)
    cuda = device.type == "cuda"
    if graphed:  # a tensor lr and capturable: the optimiser step can live in the graph
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=device),
                                      fused=True, capturable=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True if cuda else None)
    loader = ShardLoader(data, "train", batch_size=batch_size, seed=0, verify=False)
    loader.set_epoch(0)
    batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
    model.train()

    def step():
        total, _, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    run = step
    if graphed:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, stream=side):
            total, _, _ = model(batch)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        run = graph.replay
    for _ in range(max(3, steps // 5)):  # warm-up: cuDNN autotuning, allocator, lazy init
        run()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    if cuda:
        torch.cuda.synchronize(device)
    rate = steps * batch_size / (time.perf_counter() - start)
    return rate, torch.cuda.max_memory_allocated(device) if cuda else 0


def loader_rate(data: str, batch_size: int) -> float:
    """samples/s of the ShardLoader alone (decode + batch), one epoch."""
    from pipeline.data.loader import ShardLoader
    loader = ShardLoader(data, "train", batch_size=batch_size, seed=0, verify=False)
    loader.set_epoch(0)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["label"].shape[0]
    return samples / (time.perf_counter() - start)


# Runs the CLI in a child process and prints its peak GPU memory (local mode: same process).
CHILD = """
import sys, torch
from pipeline.cli import main
main(sys.argv[1:])
if torch.cuda.is_available():
    print("PEAK_GPU_BYTES", torch.cuda.max_memory_allocated())
"""


def pipeline_rate(data: str, out: str, batch_size: int, epochs: int, precision: str,
                  workers: int, threads: int, cuda: bool,
                  graphs: str = "auto") -> tuple[float, int | None, int]:
    """(steady samples/s of the training phase, peak GPU bytes or None, graphed steps of the
    last epoch) of one train run. Diagnostics off (train.probe), as issue 3 asks of benches."""
    cfg = Path(out + ".yaml")
    gpus = 1 if cuda else 0
    cfg.write_text(f"model:\n  hidden: {HIDDEN}\ntrain:\n  precision: {precision}\n"
                   f"  probe: false\n  cuda_graphs: {graphs}\n"
                   f"cluster:\n  cpus_per_worker: {threads}\n  gpus_per_worker: {gpus}\n")
    cmd = [sys.executable, "-c", CHILD, "train", "--data", data, "--out", out,
           "--config", str(cfg), "--workers", str(workers), "--epochs", str(epochs),
           "--batch-size", str(batch_size), "--seed", "0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"pipeline run failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records]
    steady = rates[1:] or rates
    peak = None
    if workers == 0:
        peak = next((int(line.split()[1]) for line in proc.stdout.splitlines()
                     if line.startswith("PEAK_GPU_BYTES")), None)
    return sum(steady) / len(steady), peak, records[-1].get("graphed_steps", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=None, help="comma-separated global batch sizes")
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch and plain steps")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None,
                    help="1: one Ray worker; 0: Ray Train local mode [1 on CUDA, 0 on CPU]")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--graphs", choices=["auto", "off"], default="auto",
                    help="train.cuda_graphs of the pipeline run (b)")
    ap.add_argument("--quick", action="store_true", help="CPU test size: batch 32,256, 2 epochs")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    default_batches = "32,256,2048,8192" if cuda and not args.quick else "32,256"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    def steps_for(batch_size: int) -> int:
        if args.steps:
            return args.steps
        if args.quick:
            return 4
        return max(30, 32768 // batch_size) if cuda else 10
    epochs = 2 if args.quick else args.epochs
    workers = args.workers if args.workers is not None else (1 if cuda else 0)
    precisions = ["fp32", "bf16"] if cuda else ["fp32"]
    torch.set_num_threads(args.threads)

    where = (torch.cuda.get_device_name(0) if cuda else f"CPU, {args.threads} thread(s)")
    mode = "1 Ray worker" if workers == 1 else f"{workers} Ray workers" if workers else "local mode"
    versions = f"torch {torch.__version__}"
    if cuda:
        versions += (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                     f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    print(f"device: {where}; {versions}; pipeline: {mode}, cuda_graphs {args.graphs}; "
          f"{args.steps or 'max(30, 32768/batch)' if cuda else steps_for(32)} steps per epoch, "
          f"{epochs} epochs (epoch 0 = warm-up)")
    print(f"{'batch':>6} {'prec':>5} {'plain a/s':>11} {'graphed g/s':>12} {'pipeline b/s':>13} "
          f"{'b/g':>6} {'b/a':>6} {'graphed':>8} {'loader/s':>11} {'GPU MiB a':>10} {'GPU MiB b':>10}")
    with tempfile.TemporaryDirectory(prefix="moola-gpu-step-") as tmp:
        for batch_size in batches:
            steps = steps_for(batch_size)
            data = os.path.join(tmp, f"shards-{batch_size}")
            make_data(data, steps * batch_size, batch_size)
            load = loader_rate(data, batch_size)
            for precision in precisions:
                a, mem_a = plain_step_rate(data, batch_size, steps, precision, device)
                g = (plain_step_rate(data, batch_size, steps, precision, device, graphed=True)[0]
                     if cuda else None)
                b, mem_b, graphed = pipeline_rate(
                    data, os.path.join(tmp, f"run-{batch_size}-{precision}"), batch_size, epochs,
                    precision, workers, args.threads, cuda, args.graphs)
                mib = lambda x: "n/a" if not cuda or x is None else f"{x / 2**20:.0f}"  # noqa: E731
                g_text, bg = ("n/a", "n/a") if g is None else (f"{g:.1f}", f"{b / g:.2f}")
                print(f"{batch_size:>6} {precision:>5} {a:>11.1f} {g_text:>12} {b:>13.1f} "
                      f"{bg:>6} {b / a:>6.2f} {f'{graphed}/{steps}':>8} {load:>11.1f} "
                      f"{mib(mem_a):>10} {mib(mem_b):>10}", flush=True)


if __name__ == "__main__":
    main()
