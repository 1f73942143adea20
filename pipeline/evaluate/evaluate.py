"""`moola-pipeline evaluate RUN`: a checkpoint's metrics on a split, with bootstrap intervals,
beside naive baselines fitted on train, and the lift over the best of them.

Outline: the run (config, data) -> the checkpoint's model -> its predictions on val and on the
split -> the span threshold (chosen on val) -> per-window statistics of the model and of every
baseline -> a paired bootstrap over windows -> RUN/eval/<split>.json. Plain torch in this
process: a 97k-parameter model scores a few thousand windows in a second; no Ray.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline import storage
from pipeline.data.folds import fold_view
from pipeline.errors import UserError
from pipeline.evaluate.baselines import TASK_BASELINES, Baselines
from pipeline.evaluate.threshold import choose_threshold, read_threshold
from pipeline.evaluate.windows import metrics_of, window_rows
from pipeline.trained_run import build_model, read_checkpoint, run_files

EVAL_DIR = "eval"
# metric -> +1 when higher is better, -1 when lower is better (lift is "better by", either way)
METRICS = {
    "type.accuracy": 1, "type.balanced_accuracy": 1, "type.f1_macro": 1,
    "span.f1": 1, "span.window_f1": 1, "span.prob_separation": 1, "span.event_hit50": 1,
    "span.event_iou": 1,
    "pointer.hit3_both": 1, "pointer.center_mae_bars": -1, "pointer.length_mae_bars": -1,
    "countdown.mae_bars": -1,
}
SELECTION_NOTE = ("val is the selection split: the checkpoint and the span threshold were chosen "
                  "on it, so these figures are optimistic; report test")


def evaluate_run(run: str, split: str = "test", checkpoint: str = "best", bootstrap: int = 1000,
                 seed: int = 0, out: str | None = None) -> dict:
    cfg, manifest = run_files(run)
    # A run on a cross-validation fold: its train and val are the fold's (val: the test block)
    manifest = fold_view(manifest, cfg.fold, cfg.data)
    _check_split(cfg.data, manifest, split)
    ckpt_name, state = read_checkpoint(run, checkpoint)
    model, loss_cfg = build_model(state, cfg)
    tasks, classes, scale = model.tasks, model.model.cfg.num_classes, loss_cfg.countdown_scale
    val_out, val_batch = predict(model, cfg.data, "val", fold=cfg.fold)
    test_out, test_batch = ((val_out, val_batch) if split == "val"
                            else predict(model, cfg.data, split, fold=cfg.fold))
    threshold, threshold_source = _threshold(run, checkpoint, val_out, val_batch)

    rows = {"model": window_rows(test_out, test_batch, tasks, classes, scale, threshold)}
    thresholds = {"model": threshold}
    train = split_labels(cfg.data, "train", fold=cfg.fold)
    baselines = Baselines(train, classes, scale)
    n = len(test_batch["label"])
    for task in tasks:
        for name in TASK_BASELINES[task]:
            b_thr = 0.5
            if task == "span":  # its own threshold, chosen on val like the model's
                b_val = baselines.outputs(name, len(val_batch["label"]))
                b_thr = choose_threshold(_sigmoid(b_val["span_logits"]), val_batch)
            key = f"{task}:{name}"
            rows[key] = window_rows(baselines.outputs(name, n), test_batch, (task,), classes,
                                    scale, b_thr)
            thresholds[key] = b_thr

    result = {
        "run": run, "split": split, "fold": cfg.fold, "checkpoint": ckpt_name, "windows": n,
        "selection_split": split == "val", "note": SELECTION_NOTE if split == "val" else None,
        "span_threshold": threshold, "threshold_source": threshold_source,
        "bootstrap": bootstrap, "seed": seed, "baseline_fit": baselines.describe(),
        "metrics": _intervals(rows, thresholds, tasks, classes, scale, bootstrap, seed),
    }
    target = out or storage.join(run, EVAL_DIR, f"{split}.json")
    storage.write_text_atomic(target, json.dumps(result, indent=2) + "\n")
    result["written_to"] = target
    return result


# ------------------------------------------------------------------------------- steps

def _check_split(data: str, manifest: dict, split: str) -> None:
    if split not in ("test", "val"):
        raise UserError(f"--split {split!r}: use test or val")
    if not (manifest.get("splits") or {}).get(split):
        if split == "test":
            raise UserError(f"{data} has no test split: re-shard it with "
                            f"`moola-pipeline data shard ... --test-fraction 0.2` and train on "
                            f"that, or evaluate the selection split with --split val")
        raise UserError(f"{data} has no val split")


def predict(model, data: str, split: str, batch_size: int = 512,
            fold: int | None = None) -> tuple[dict, dict]:
    """(outputs, batch) of a whole split (of `fold`, when given) as numpy, in index order."""
    from pipeline.data.loader import ShardLoader
    loader = ShardLoader(data, split, batch_size=batch_size, seed=0, shuffle=False, verify=False,
                         fold=fold)
    outs, batches = [], []
    with torch.no_grad():
        for batch in loader:
            outputs = model.model(batch["features"])
            outs.append({k: v.numpy() for k, v in outputs.items()})
            batches.append({k: v.numpy() for k, v in batch.items() if k != "features"})
    return _cat(outs), _cat(batches)


def split_labels(data: str, split: str, fold: int | None = None) -> dict:
    """The labels and valid masks of a split (of `fold`, when given; no model)."""
    from pipeline.data.loader import ShardLoader
    loader = ShardLoader(data, split, batch_size=4096, seed=0, shuffle=False, verify=False,
                         fold=fold)
    return _cat([{k: v.numpy() for k, v in b.items() if k != "features"} for b in loader])


def _cat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def _threshold(run: str, checkpoint: str, val_out: dict, val_batch: dict) -> tuple[float, str]:
    stored = read_threshold(run)
    if stored is not None and checkpoint == "best":
        return float(stored["span_threshold"]), f"threshold.json ({stored.get('source')})"
    if "span_logits" not in val_out:
        return 0.5, "default (no span head)"
    return (choose_threshold(_sigmoid(val_out["span_logits"]), val_batch),
            f"chosen now on val for checkpoint {checkpoint}")


def _intervals(rows: dict[str, np.ndarray], thresholds: dict, tasks, classes: int, scale: str,
               bootstrap: int, seed: int) -> dict:
    """Point value, 95% percentile interval (windows resampled with replacement, the same
    resamples for the model and every baseline: paired), baselines and lift, per metric."""
    n = len(rows["model"])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap) if n else np.zeros((0, 0))

    def series(key: str) -> tuple[dict, list[dict]]:
        task_set = tasks if key == "model" else (key.split(":")[0],)
        point = metrics_of(rows[key].sum(0), task_set, classes, scale, thresholds[key])
        boots = [metrics_of(w @ rows[key], task_set, classes, scale, thresholds[key])
                 for w in weights]
        return point, boots

    model_point, model_boot = series("model")
    base = {key: series(key) for key in rows if key != "model"}
    out = {}
    for metric, sign in METRICS.items():
        task = metric.split(".")[0]
        if task not in tasks or model_point.get(metric) is None:
            continue
        entry = {"value": model_point[metric], **_ci([b.get(metric) for b in model_boot]),
                 "higher_is_better": sign > 0, "baselines": {}}
        for key, (point, boots) in base.items():
            if key.split(":")[0] == task and point.get(metric) is not None:
                entry["baselines"][key.split(":")[1]] = {
                    "value": point[metric], **_ci([b.get(metric) for b in boots])}
        if entry["baselines"]:
            best = max(entry["baselines"], key=lambda k: sign * entry["baselines"][k]["value"])
            key = f"{task}:{best}"
            lifts = [None if m.get(metric) is None or b.get(metric) is None
                     else sign * (m[metric] - b[metric])
                     for m, b in zip(model_boot, base[key][1])]
            entry["best_baseline"] = best
            entry["lift"] = {"value": sign * (model_point[metric] - base[key][0][metric]),
                             **_ci(lifts)}
        out[metric] = entry
    return out


def interval_text(entry: dict | None) -> str:
    """`0.712 [0.601, 0.815]`, `0.712` without an interval, `-` without a value."""
    if not entry or entry.get("value") is None:
        return "-"
    text = f"{entry['value']:.3f}"
    if entry.get("low") is not None:
        text += f" [{entry['low']:.3f}, {entry['high']:.3f}]"
    return text


def _ci(values: list) -> dict:
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return {"low": None, "high": None}
    low, high = np.percentile(vals, [2.5, 97.5])
    return {"low": float(low), "high": float(high)}
