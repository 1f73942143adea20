"""Honest evaluation: a checkpoint on a held-out split, with intervals, beside naive baselines.

`evaluate_run` (the `evaluate` command), `choose_threshold` / `threshold_from_predictions` (the
span threshold chosen on val at the end of training). No Ray: tested without a cluster.
"""

from pipeline.evaluate.evaluate import EVAL_DIR, METRICS, evaluate_run
from pipeline.evaluate.threshold import THRESHOLD_FILE, choose_threshold, threshold_from_predictions

__all__ = ["EVAL_DIR", "METRICS", "THRESHOLD_FILE", "evaluate_run", "choose_threshold",
           "threshold_from_predictions"]
