"""model.json: what a program that loads the exported model needs to know to use it correctly.

The old inference scripts disagreed with training about features and thresholds because those
lived in people's heads. The card carries them with the model: the feature set and its order,
the input layout, what every output means and how to turn it into bars and probabilities, the
span threshold chosen on val, the hash of the training data's manifest (the one the checkpoint
recorded), the run and checkpoint, and the run's evaluate figures. Plain dicts; no torch here.
"""

from __future__ import annotations

import json
import os
import platform

from pipeline import __version__, storage
from pipeline.data.features import BOUNDS, WARMUP_BARS
from pipeline.data.schema import LABELS
from pipeline.model.jade import WINDOW
from pipeline.reducer.targets import COUNTDOWN_CLIP

CARD_VERSION = 1
CARD_FILE = "model.json"

# What each relativity channel is (pipeline/data/features.py has the formulas; rng = H - L).
FEATURE_MEANINGS = {
    "open_norm": "(open - low) / range of the bar",
    "close_norm": "(close - low) / range of the bar",
    "body_pct": "(close - open) / range of the bar",
    "upper_wick_pct": "(high - max(open, close)) / range of the bar",
    "lower_wick_pct": "(min(open, close) - low) / range of the bar",
    "range_z": "bar range / EMA(20) of the range",
    "dist_to_prev_SH": "(last confirmed swing high - close) / ATR(10); 0 before the first",
    "dist_to_prev_SL": "(close - last confirmed swing low) / ATR(10); 0 before the first",
    "bars_since_SH_norm": "bars since that swing high / 105",
    "bars_since_SL_norm": "bars since that swing low / 105",
    "expansion_proxy": "range_z * zigzag leg direction * body_pct",
    "consol_proxy": "(1 - range_z/3) * (1 - |body_pct|) * mean of the two bars_since",
    "position": "bar index within the window / 104",
}


def build_card(trained, formats: dict[str, dict], onnx_info: dict | None,
               parity: dict, versions: dict) -> dict:
    """The whole card; `formats` maps pt2/onnx to their file entries (name, bytes, sha256)."""
    net_cfg = trained.net.cfg
    outputs = output_specs(net_cfg, trained.loss.countdown_scale)
    threshold, source = trained.span_threshold()
    return {
        "card_version": CARD_VERSION,
        "run": run_section(trained),
        "data": data_section(trained),
        "input": input_section(trained.manifest, net_cfg.n_features),
        "outputs": outputs,
        "span_threshold": {"value": threshold, "source": source,
                           "applies_to": "sigmoid(span_logits) > value: bar is in the expansion"},
        "evaluation": evaluation_section(trained),
        "files": formats,
        "onnx": onnx_info,
        "parity": parity,
        "exported_with": {"moola_pipeline": __version__, "python": platform.python_version(),
                          **versions},
    }


def run_section(trained) -> dict:
    state = trained.state
    uri = trained.uri if storage.is_s3(trained.uri) else os.path.abspath(trained.uri)
    return {"uri": uri, "run_id": state.get("run_id") or trained.config.run_id,
            "checkpoint": trained.checkpoint, "is_best": trained.is_best(),
            "epoch": int(state["epoch"]), "step": int(state["step"]),
            "model_config": dict(state["model_config"]),
            "countdown_scale": trained.loss.countdown_scale}


def data_section(trained) -> dict:
    """The training data, by the manifest hash the training loop recorded in the checkpoint
    (sha256 of the manifest without its `created` time, 16 hex digits), so the card names the
    data the weights saw even if RUN's copy of the manifest is later edited."""
    manifest = trained.manifest
    return {"uri": trained.config.data, "manifest_hash": trained.state.get("manifest_hash"),
            "feature_set": manifest.get("feature_set"), "features": manifest.get("features"),
            "window": manifest.get("window", WINDOW),
            "schema_version": manifest.get("schema_version"),
            "splits": manifest.get("splits"), "source": manifest.get("source")}


def input_section(manifest: dict, n_features: int) -> dict:
    names = manifest.get("features") or [f"feature_{i}" for i in range(n_features)]
    bounds = [*map(tuple, BOUNDS.tolist()), (0.0, 1.0)]  # the base channels, then position
    return {
        "name": "features", "dtype": "float32", "shape": ["batch", WINDOW, n_features],
        "layout": f"[batch, bar, feature]: {WINDOW} consecutive bars, oldest first, features "
                  f"in the order below",
        "batch": "dynamic (>= 1); the bar and feature dimensions are fixed",
        "features": [{"index": i, "name": name, "meaning": FEATURE_MEANINGS.get(name),
                      "range": list(bounds[i]) if i < len(bounds) else None}
                     for i, name in enumerate(names)],
        "how_to_compute": "pipeline.data.features.bar_features over the continuous bar series "
                          "(not window by window), then 105-bar windows of it",
        "warmup_bars": WARMUP_BARS,
        "warmup": f"the first {WARMUP_BARS} bars of every continuous segment are warm-up (their "
                  f"features are not settled); training scored no per-bar output on them",
    }


def output_specs(cfg, countdown_scale: str) -> dict:
    """Per head: shape and meaning, read from JadeCompact and pipeline/reducer/targets.py."""
    specs = {
        "type": ("type_logits", ["batch", cfg.num_classes], {
            "meaning": "class logits of the window; softmax over the last axis gives "
                       "probabilities",
            "classes": [LABELS[i] if i < len(LABELS) else f"unused_{i} (no label has this code)"
                        for i in range(cfg.num_classes)]}),
        "pointer": ("pointers", ["batch", 2], {
            "meaning": "sigmoid already applied: [..., 0] = expansion center / 105, [..., 1] = "
                       "expansion length / 105 (targets: center (s+e)/2/105, length (e-s)/105)",
            "to_bars": "center_bar = p0 * 105, length_bars = p1 * 105, start = center - "
                       "length/2, end = center + length/2 (0-based, inclusive)"}),
        "span": ("span_logits", ["batch", WINDOW], {
            "meaning": "per bar, the logit that the bar lies inside the expansion; sigmoid gives "
                       "the probability",
            "decode": "bars with sigmoid > span_threshold.value; each contiguous run of them "
                      "(skipping warm-up bars) is one decoded expansion"}),
        "countdown": ("countdown", ["batch", WINDOW], _countdown_meaning(countdown_scale)),
    }
    return {name: {"shape": shape, "dtype": "float32", "task": task, **info}
            for task, (name, shape, info) in specs.items() if task in cfg.tasks}


def _countdown_meaning(scale: str) -> dict:
    clip = int(COUNTDOWN_CLIP)
    target = f"per bar t, bars until the expansion starts: c = clip(s - t, -{clip}, {clip})"
    if scale == "unit":
        return {"meaning": f"{target}, scaled to (c + {clip}) / {2 * clip}: 1 = {clip} or more "
                           f"bars before the start, 0.5 at it, 0 = {clip} or more after",
                "scale": "unit", "to_bars": f"c = value * {2 * clip} - {clip}"}
    return {"meaning": f"{target}, in bars", "scale": "raw", "to_bars": "c = value"}


def evaluation_section(trained) -> dict:
    """RUN/eval/<split>.json as the evaluate command wrote them, per metric its value, 95%
    interval, best baseline and lift; flagged when they scored another checkpoint."""
    from pipeline.evaluate import EVAL_DIR
    folder = storage.join(trained.uri, EVAL_DIR)
    out = {}
    for name in storage.listdir(folder):
        if not name.endswith(".json"):
            continue
        result = json.loads(storage.read_bytes(storage.join(folder, name)))
        out[name[:-len(".json")]] = {
            "file": f"{EVAL_DIR}/{name}", "checkpoint": result.get("checkpoint"),
            "same_checkpoint": result.get("checkpoint") == trained.checkpoint,
            "windows": result.get("windows"), "selection_split": result.get("selection_split"),
            "note": result.get("note"), "span_threshold": result.get("span_threshold"),
            "metrics": {metric: {"value": e.get("value"), "low": e.get("low"),
                                 "high": e.get("high"), "best_baseline": e.get("best_baseline"),
                                 "lift": (e.get("lift") or {}).get("value")}
                        for metric, e in (result.get("metrics") or {}).items()}}
    return out
