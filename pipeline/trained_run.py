"""A trained run, opened for use: its config, data manifest, one checkpoint and the model in it.

One home for "read a run directory back" so `evaluate`, `predict` and `export` agree on which
checkpoint `best` means, how the model is rebuilt and which span threshold applies. Plain torch
and storage; no Ray.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import torch

from pipeline import storage
from pipeline.errors import UserError


@dataclass
class TrainedRun:
    uri: str
    config: object          # pipeline.config.RunConfig, resolved as the run wrote it
    manifest: dict          # the training data's manifest as copied into the run ({} if none)
    checkpoint: str         # checkpoint directory name
    state: dict             # the checkpoint's state dict (model_config, multitask, ...)
    model: object           # pipeline.reducer.MultiTaskModel, eval mode, on CPU
    loss: object            # pipeline.reducer.LossConfig

    @property
    def net(self) -> torch.nn.Module:
        """The bare JadeCompact network (features [B, 105, F] -> dict of head outputs)."""
        return self.model.model

    def span_threshold(self) -> tuple[float, str]:
        """The stored val-chosen threshold for the best checkpoint, else 0.5 (and why)."""
        from pipeline.evaluate.threshold import read_threshold
        stored = read_threshold(self.uri)
        if stored is not None and self.is_best():
            return float(stored["span_threshold"]), f"threshold.json ({stored.get('source')})"
        return 0.5, "default 0.5 (no threshold stored for this checkpoint)"

    def is_best(self) -> bool:
        try:
            return best_checkpoint_name(self.uri) == self.checkpoint
        except UserError:
            return False


def open_run(run: str, checkpoint: str = "best") -> TrainedRun:
    cfg, manifest = run_files(run)
    name, state = read_checkpoint(run, checkpoint)
    model, loss_cfg = build_model(state, cfg)
    return TrainedRun(run, cfg, manifest, name, state, model, loss_cfg)


def run_files(run: str):
    from pipeline.config import load_config
    from pipeline.train import rundir
    config_uri = storage.join(run, rundir.CONFIG)
    if not storage.exists(config_uri):
        raise UserError(f"{run}: not a run directory ({rundir.CONFIG} missing)")
    cfg = load_config(config_uri)
    manifest_uri = storage.join(run, rundir.MANIFEST)
    manifest = json.loads(storage.read_bytes(manifest_uri)) if storage.exists(manifest_uri) else {}
    return cfg, manifest


def best_checkpoint_name(run: str) -> str:
    from pipeline.train.checkpoint import checkpoint_name
    from pipeline.train.rundir import read_metrics
    records = read_metrics(run)
    best = records[-1].get("best_epoch") if records else None
    if best is None:
        raise UserError(f"{run}: no best checkpoint (no epoch was scored); use "
                        f"--checkpoint latest")
    record = next(r for r in records if r["epoch"] == best)
    return checkpoint_name(best + 1, record["step"])


def read_checkpoint(run: str, which: str) -> tuple[str, dict]:
    """(name, state) of `best`, `latest` or a named whole checkpoint of RUN."""
    from pipeline.train.checkpoint import META_FILE, STATE_FILE
    from pipeline.train.rundir import checkpoint_dirs
    whole = [n for n in checkpoint_dirs(run) if storage.exists(storage.join(run, n, META_FILE))]
    if which == "best":
        name = best_checkpoint_name(run)
    elif which == "latest":
        if not whole:
            raise UserError(f"{run}: no whole checkpoint (train it first, or resume it)")
        name = whole[-1]
    else:
        name = which
    if name not in whole:
        raise UserError(f"--checkpoint {which}: {run} has no whole checkpoint {name} "
                        f"(it has: {', '.join(whole) or 'none'})")
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(run, name, STATE_FILE))),
                       map_location="cpu", weights_only=False)
    return name, state


def build_model(state: dict, cfg):
    from pipeline.model import JadeConfig
    from pipeline.reducer import LossConfig, MultiTaskModel
    loss_cfg = LossConfig(**asdict(cfg.loss))
    model = MultiTaskModel.build(JadeConfig(**state["model_config"]), loss_cfg)
    model.load_state_dict(state["multitask"])
    return model.eval(), loss_cfg
