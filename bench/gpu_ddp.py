"""Multi-GPU DDP with and without CUDA graphs (issue 8): the same run three ways, same data.

    .venv/bin/python bench/gpu_ddp.py [--gpus 2] [--epochs 4] [--batch 64]

(1) 1 GPU, eager; (2) N GPUs, DDP, cuda_graphs off; (3) N GPUs, DDP, cuda_graphs on (warm-up 11
steps, then every full batch replayed from a graph that holds DDP's NCCL all-reduces). Dropout
off and the probe off, so all three take the same optimisation steps; prints per epoch the
largest relative difference of the train and val losses against (1), the graphed steps, the
largest parameter difference of the last checkpoints, and samples/s. Needs N >= 2 CUDA GPUs on one
machine (local Ray starts one worker per GPU); elsewhere it says so and exits 2. The CPU suite
checks the same three-way equality with the graphed schedule replayed eagerly
(tests/test_train_ray.py); only this script captures real NCCL collectives.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = ("model:\n  input_dropout: 0.0\n  dense_dropout: 0.0\n  recurrent_dropout: 0.0\n"
          "train:\n  probe: false\n  cuda_graphs: {graphs}\n"
          "cluster:\n  gpus_per_worker: 1\n  cpus_per_worker: 2\n")


def run(data: str, out: str, workers: int, graphs: str, epochs: int, batch: int) -> list[dict]:
    from pipeline.train.rundir import read_metrics
    cfg = Path(out + ".yaml")
    cfg.write_text(CONFIG.format(graphs=graphs))
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--data", data, "--out", out,
           "--config", str(cfg), "--workers", str(workers), "--epochs", str(epochs),
           "--batch-size", str(batch), "--seed", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run {out} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return read_metrics(out)


def last_params(out: str) -> dict:
    from pipeline.train.checkpoint import read_state
    from pipeline.train.rundir import checkpoint_dirs
    return read_state(f"{out}/{checkpoint_dirs(out)[-1]}")["model"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="global batch (divisible by --gpus)")
    ap.add_argument("--steps", type=int, default=10, help="full batches per epoch")
    args = ap.parse_args()
    have = torch.cuda.device_count()
    if have < max(args.gpus, 2):
        print(f"error: needs {max(args.gpus, 2)} CUDA GPUs on this machine, found {have}",
              file=sys.stderr)
        sys.exit(2)

    from pipeline.data.shards import random_chunks, write_shard_set
    with tempfile.TemporaryDirectory(prefix="moola-gpu-ddp-") as tmp:
        data = os.path.join(tmp, "shards")
        # a smaller last batch each epoch: the eager fallback runs under DDP too
        write_shard_set(data, [f"f{i}" for i in range(12)], itertools.chain(
            random_chunks(args.steps * args.batch + args.batch // 2, split="train", seed=0),
            random_chunks(args.batch, split="val", seed=1)))
        runs = {
            "1 GPU eager": run(data, f"{tmp}/one", 1, "off", args.epochs, args.batch),
            f"{args.gpus} GPU DDP eager": run(data, f"{tmp}/ddp", args.gpus, "off", args.epochs, args.batch),
            f"{args.gpus} GPU DDP graphed": run(data, f"{tmp}/graph", args.gpus, "on", args.epochs, args.batch),
        }
        outs = dict(zip(runs, (f"{tmp}/one", f"{tmp}/ddp", f"{tmp}/graph")))
        base_name = next(iter(runs))
        base_params = last_params(outs[base_name])
        print(f"device: {torch.cuda.get_device_name(0)} x {have}; torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
        print(f"{'run':<22} {'epoch':>5} {'graphed':>8} {'max rel train':>14} "
              f"{'max rel val':>12} {'samples/s':>10}")
        for name, records in runs.items():
            for r, b in zip(records, runs[base_name]):
                dt = max(rel(r["train"][k], b["train"][k]) for k in b["train"])
                dv = max(rel(r["val"][k], b["val"][k]) for k in b["val"])
                print(f"{name:<22} {r['epoch']:>5} {r['graphed_steps']:>8} {dt:>14.2e} "
                      f"{dv:>12.2e} {r['samples_per_s']:>10.0f}")
            params = last_params(outs[name])
            worst = max(float((params[k] - base_params[k]).abs().max()) for k in base_params)
            print(f"{name:<22} last checkpoint: max |param - 1 GPU| = {worst:.2e}")


if __name__ == "__main__":
    main()
