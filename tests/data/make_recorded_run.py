"""Run directories for the report, alarm and TensorBoard tests.

    python tests/data/make_recorded_run.py --real [OUT]   # a real run: synth -> shard -> train
    python tests/data/make_recorded_run.py [OUT]          # a constructed run (no training)

OUT defaults to tests/data/recorded_run. The committed recorded_run is a *real* one: 50 synthetic
windows, `train --workers 0`, 8 epochs, a small model; its files (metrics.jsonl, config.yaml,
manifest.json, best_val_predictions.npz, alarms.jsonl) are exactly what the trainer wrote.

`make_run(out)` constructs a run in the same layout (issue 4's record keys) with known
behaviour: healthy (every task improves, balanced gradient shares, no alarm), or with
`starving=True` the failure the old pipeline lived with: countdown's gradient share collapses to
~1% and its val loss stalls while the other tasks keep improving.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import yaml

TASKS = ("type", "pointer", "span", "countdown")
WINDOW = 105


def _record(epoch: int, rng: np.random.Generator, starving: bool, step_per_epoch: int) -> dict:
    decay = np.exp(-epoch / 6.0)
    # per-element losses at the scales the old runs saw: type ~1, pointer ~0.02, span ~0.3
    base = {"type": 1.1, "pointer": 0.03, "span": 0.45, "countdown": 0.09}
    floor = {"type": 0.55, "pointer": 0.008, "span": 0.2, "countdown": 0.03}
    train, val = {}, {}
    for t in TASKS:
        d = 1.0 if (starving and t == "countdown") else decay
        train[t] = floor[t] + (base[t] - floor[t]) * d * (1 + 0.01 * rng.standard_normal())
        val[t] = 1.08 * (floor[t] + (base[t] - floor[t]) * (0.1 + 0.9 * d)) \
            * (1 + 0.002 * rng.standard_normal())
    log_vars = {t: float(np.log(2 * train[t] if t in ("type", "span") else train[t]) * (1 - decay))
                for t in TASKS}
    weights = {t: (1.0 if t in ("type", "span") else 0.5) * float(np.exp(-log_vars[t]))
               for t in TASKS}
    norms = {"type": 0.8, "pointer": 0.6, "span": 0.9, "countdown": 0.7}
    if starving:
        norms["countdown"] = 0.03
    norms = {t: v * (1 + 0.05 * rng.standard_normal()) * (0.5 + 0.5 * decay) for t, v in norms.items()}
    total = sum(norms.values())
    progress = 1 - decay
    f1 = 0.05 + 0.2 * progress
    return {
        "epoch": epoch, "step": (epoch + 1) * step_per_epoch, "world_size": 2, "run_id": "recorded-0001",
        "train": train, "val": val, "val_loss": sum(val.values()),
        "weights": weights, "log_vars": log_vars,
        "grad_norm": norms, "grad_share": {t: v / total for t, v in norms.items()},
        "grad_ratio_countdown_pointer": norms["countdown"] / norms["pointer"],
        "starving": ["countdown"] if starving and epoch >= 2 else [],
        "span": {"precision": f1 * 0.9, "recall": f1 * 1.2, "f1": f1, "window_precision": f1 * 0.8,
                 "window_recall": f1 * 1.1, "window_f1": f1 * 0.9,
                 "prob_separation": 0.01 + 0.12 * progress, "bars": 1180, "windows": 12},
        "pointer": {"hit3_start": 0.1 + 0.4 * progress, "hit3_end": 0.08 + 0.35 * progress,
                    "hit3_both": 0.02 + 0.2 * progress, "center_mae_bars": 12 - 8 * progress,
                    "length_mae_bars": 15 - 7 * progress, "windows": 12},
        "countdown": {"mae_bars": 9.0 if starving else 9.0 - 5 * progress, "bars": 1180},
        "type": {"accuracy": 0.45 + 0.2 * progress, "f1_macro": 0.35 + 0.2 * progress,
                 "recall": [0.5 + 0.1 * progress, 0.4 + 0.2 * progress, None], "samples": 12},
        "samples_per_s": float(410 + 20 * rng.standard_normal()),
        "epoch_time_s": float(0.12 + 0.01 * rng.standard_normal()),
        "lr": 1e-3,
    }


def _predictions(rng: np.random.Generator, n: int, epoch: int) -> dict:
    start = rng.integers(20, 80, n)
    end = np.minimum(start + rng.integers(5, 20, n), WINDOW - 1)
    label = rng.integers(0, 2, n).astype(np.int64)
    bar = np.arange(WINDOW)[None, :]
    in_span = (bar >= start[:, None]) & (bar <= end[:, None])
    span_prob = np.clip(0.15 + 0.45 * in_span + 0.12 * rng.standard_normal((n, WINDOW)), 0, 1)
    close = 100 + np.cumsum(rng.standard_normal((n, WINDOW)) * 0.3
                            + 0.4 * in_span * np.sign(rng.standard_normal((n, 1))), axis=1)
    open_ = np.concatenate([close[:, :1], close[:, :-1]], axis=1)
    high = np.maximum(open_, close) + rng.random((n, WINDOW)) * 0.3
    low = np.minimum(open_, close) - rng.random((n, WINDOW)) * 0.3
    center = (start + end) / 2 / WINDOW + 0.03 * rng.standard_normal(n)
    length = (end - start) / WINDOW + 0.02 * rng.standard_normal(n)
    valid = np.ones((n, WINDOW), bool)
    valid[:, :3] = False  # warm-up bars
    type_prob = rng.dirichlet(np.ones(3), n).astype(np.float32)
    return {
        "index": np.arange(n, dtype=np.int64), "span_prob": span_prob.astype(np.float32),
        "valid": valid, "expansion_start": start.astype(np.int64), "expansion_end": end.astype(np.int64),
        "label": label, "type_prob": type_prob,
        "pointers": np.stack([center, length], 1).astype(np.float32),
        "countdown": rng.random((n, WINDOW)).astype(np.float32),
        "ohlc": np.stack([open_, high, low, close], -1).astype(np.float32),
        "epoch": np.array(epoch),
    }


CONFIG = {
    "data": "demo/shards", "out": "tests/data/recorded_run", "run_id": "recorded-0001",
    "model": {"hidden": 96, "num_layers": 1, "input_dropout": 0.3, "recurrent_dropout": 0.7,
              "dense_dropout": 0.6, "num_classes": 3, "head_width": 64, "tasks": list(TASKS)},
    "loss": {"countdown_scale": "unit", "span_pos_weight": 1.0, "pointer_delta": 0.08,
             "countdown_delta": 1.0, "weighting": "uncertainty", "weighting_options": {}},
    "train": {"epochs": 12, "batch_size": 8, "lr": 0.001, "weight_decay": 0.0, "grad_clip": 1.0,
              "scheduler": "constant", "seed": 0, "checkpoint_every_steps": 0,
              "keep_checkpoints": 3, "best_metric": "val_loss", "best_mode": "min",
              "early_stop_patience": 0, "probe_every": 2},
    "cluster": {"address": None, "workers": 2, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0,
                "max_failures": 0, "shared_fs": False},
}

MANIFEST = {
    "schema_version": 1, "feature_set": "relativity12",
    "features": [f"f{i}" for i in range(12)], "window": WINDOW,
    "shards": [{"path": "train-00000.parquet", "split": "train", "rows": 38, "bytes": 210000,
                "sha256": "0" * 64, "row_groups": 1},
               {"path": "val-00000.parquet", "split": "val", "rows": 12, "bytes": 68000,
                "sha256": "1" * 64, "row_groups": 1}],
    "splits": {"train": 38, "val": 12},
    "split_policy": {"policy": "time", "val_fraction": 0.2, "embargo_bars": 105, "embargoed": 0},
    "source": {"kind": "synth", "windows": 50}, "seed": 0, "created": "2026-11-25T21:00:00+00:00",
}


def make_run(out: str, epochs: int = 12, starving: bool = False, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    records = [_record(e, rng, starving, step_per_epoch=5) for e in range(epochs)]
    best = min(range(epochs), key=lambda e: records[e]["val_loss"])
    for e, r in enumerate(records):
        r["best_epoch"] = min(range(e + 1), key=lambda i: records[i]["val_loss"])
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    config = dict(CONFIG, out=out, train=dict(CONFIG["train"], epochs=epochs))
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(MANIFEST, f, indent=2)
    np.savez_compressed(os.path.join(out, "best_val_predictions.npz"), **_predictions(rng, 12, best))
    return out


RECORDED_FILES = ("metrics.jsonl", "config.yaml", "manifest.json", "best_val_predictions.npz",
                  "alarms.jsonl")
SMALL_RUN_YAML = "model:\n  hidden: 32\n  head_width: 32\ntrain:\n  probe_every: 2\n"


def record_real_run(out: str, epochs: int = 8) -> str:
    """Train for real through the CLI and keep the run's files (no checkpoints, no tb)."""
    import shutil
    import subprocess
    import tempfile

    cli = [sys.executable, "-m", "pipeline.cli"]
    with tempfile.TemporaryDirectory(prefix="moola-recorded-") as tmp:
        steps = [["data", "synth", "--out", f"{tmp}/windows", "--windows", "50", "--seed", "0"],
                 ["data", "shard", "--in", f"{tmp}/windows", "--out", f"{tmp}/shards"]]
        with open(f"{tmp}/run.yaml", "w") as f:
            f.write(SMALL_RUN_YAML)
        steps.append(["train", "--workers", "0", "--data", f"{tmp}/shards", "--out", f"{tmp}/run",
                      "--config", f"{tmp}/run.yaml", "--epochs", str(epochs), "--batch-size", "8"])
        for args in steps:
            subprocess.run(cli + args, check=True)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for name in RECORDED_FILES:
            if os.path.exists(f"{tmp}/run/{name}"):
                shutil.copy(f"{tmp}/run/{name}", os.path.join(out, name))
    return out


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    args = [a for a in sys.argv[1:] if a != "--real"]
    target = args[0] if args else os.path.join(here, "recorded_run")
    print(record_real_run(target) if "--real" in sys.argv else make_run(target))
