"""The worker loop under Ray Train: `train_loop_per_worker`, what every Ray Train worker runs.

The loop itself is `pipeline.train.worker.run_worker` (an outline over parts that own their
state; read it first). This module is where it meets Ray Train: the run's config, rebuilt from
the driver's dict, and a `RayTrainRuntime` (rank and world from `ray.train.get_context`, the
checkpoint from `ray.train.get_checkpoint` or, in local mode, from the driver, `prepare_model`,
`ray.train.report`). The same function runs in Ray Train local mode (`--workers 0`, in the
driver process, no process group) and as W worker actors with DDP.
"""

from __future__ import annotations

from pipeline.config import load_config
# the format of best_val_predictions.npz and the pooled epoch loss, under the names other parts
# and tests have imported from here
from pipeline.train.objective import batch_predictions as _predictions  # noqa: F401
from pipeline.train.objective import merge_predictions as _merge_predictions  # noqa: F401
from pipeline.train.ray_runtime import RayTrainRuntime
from pipeline.train.records import pooled_losses  # noqa: F401
from pipeline.train.worker import run_worker


def train_loop_per_worker(loop_config: dict) -> None:
    """`loop_config`: {"config": the run's TrainConfig as a dict, "local_mode": workers == 0,
    "resume_from": the checkpoint directory local mode continues from, or None}."""
    cfg = load_config(None, None, base=loop_config["config"])
    runtime = RayTrainRuntime.from_loop_config(loop_config, cfg.out, cfg.train.keep_checkpoints)
    run_worker(cfg, runtime)
