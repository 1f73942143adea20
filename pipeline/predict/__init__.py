"""`moola-pipeline predict`: a trained run's model on new bars or a shard set, written as Parquet.

Outline: check everything (`job.prepare`: run, checkpoint, features from the run's manifest,
input, frequency, OUT) -> predict into a staging prefix (the local engine here, or the Ray Data
engine in `ray_engine`, the only module that imports Ray) -> the per-bar table -> publish with
manifest.json last (`output.Staging.publish`). Any failure after the checks removes the staging
prefix and publishes nothing.
"""

from __future__ import annotations

import datetime
from typing import Callable

from pipeline.predict.job import Options, Plan, prepare
from pipeline.predict.output import Staging, read_predictions

Progress = Callable[[str, int, int], None]

__all__ = ["Options", "Plan", "predict", "prepare", "read_predictions"]


def predict(run: str, in_uri: str, out: str, *, checkpoint: str = "best",
            options: Options | None = None, engine: str = "local", ray_options: dict | None = None,
            progress: Progress | None = None) -> dict:
    """Predict and publish; returns the published manifest."""
    progress = progress or (lambda step, done, total: None)
    plan = prepare(run, checkpoint, in_uri, out, options or Options())
    staging = Staging(out)
    try:
        if engine == "ray":
            from pipeline.predict.ray_engine import run_ray
            facts = run_ray(plan, staging, progress, **(ray_options or {}))
        else:
            from pipeline.predict.local import run_local
            facts = run_local(plan, staging, progress)
        return staging.publish(describe(plan, facts))
    except BaseException:
        staging.abort()
        raise


def describe(plan: Plan, facts: dict) -> dict:
    """The manifest's content (publish adds kind, id, files and row counts)."""
    run, source, opts = plan.run, plan.source, plan.options
    if source.kind == "bars":
        instruments = {s.instrument: len(s.timestamps) for s in source.series}
    else:
        instruments = {source.instrument: None}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run": run.uri, "run_id": getattr(run.config, "run_id", None),
        "checkpoint": run.checkpoint,
        "input": {"uri": source.uri, "kind": source.kind, "instruments": instruments},
        "windows": plan.windows, "stride": plan.stride, "window": 105,
        "tasks": list(run.net.cfg.tasks), "num_classes": run.net.cfg.num_classes,
        "span_threshold": plan.threshold, "threshold_source": plan.threshold_source,
        "countdown": "bars until the expansion starts (positive before it, 0 at its first "
                     f"bar), clipped to +-20; trained at scale {run.loss.countdown_scale!r}",
        "mc_dropout": {"samples": opts.mc_samples, "seed": opts.seed,
                       "std": "population std over the samples"} if opts.mc_samples else None,
        "batch_size": opts.batch_size, "features": plan.spec.describe(),
        "training_data": {"created": run.manifest.get("created"),
                          "source": run.manifest.get("source")},
        "per_bar_table": plan.bar_lengths is not None,
        "notes": plan.notes, **facts,
    }
