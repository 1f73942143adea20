"""What runs inside Ray Train's controller: an account of dying workers, and a quick end of a run.

FailureReporter: say what happened when training workers die (a process killed, a whole node
lost). Ray Train's own account of a worker-group failure (`[FailurePolicy] RETRY ...`) is logged at INFO,
below the WARNING level a cluster run uses, so without this the job's output shows only stack
traces. This callback runs inside Ray Train's controller (on the driver's node, so it outlives
any lost worker node) and prints one line per failure: which ranks, why, how many of
--max-failures are used, and what comes next.

QuickStopCleaner / PipelineTrainer: Ray 2.60 starts a detached PlacementGroupCleaner per run that
asks the state API, every second, whether the controller is alive, and at the run's end waits up
to 12 s for that thread to notice a stop. The state API lookup (address None) resolves the
cluster from RAY_ADDRESS or /tmp/ray/ray_current_cluster, which can name a stale cluster; then
each lookup hangs for its 10 s timeout, the stop times out with a GetTimeoutError traceback and
`Monitor thread did not exit within 12.00 seconds`, and every run ends with 12-21 s of dead time
(ray#65443 and related). We stop the cleaner with ray.kill instead (its stop never removes the
placement group: the controller does that itself), and a local Ray, which has no dashboard and
so no state API, gets no cleaner at all: there it could never answer, and the placement group
dies with the local cluster.
"""

from __future__ import annotations

import ray
from ray.train import UserCallback
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import \
    PlacementGroupCleanerCallback


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(worker_exceptions: dict) -> str:
    """The dead worker's error first: when one rank dies the others fail with collateral errors
    (gloo "connection closed by peer"), which say less about what happened."""
    errors = list(worker_exceptions.values())
    lost = [e for e in errors if type(e).__name__ in LOST_WORKER_ERRORS]
    first = (lost or errors)[0]
    why = _first_line(first)
    cause = getattr(first, "health_check_failure", None)  # names the unreachable node's address
    return f"{why} {_first_line(cause)}" if cause is not None else why


# Ray's errors for a worker process or node that is gone (by name: their modules move between
# Ray releases).
LOST_WORKER_ERRORS = {"WorkerHealthCheckFailedError", "ActorDiedError", "ActorUnavailableError",
                      "RayActorError", "NodeDiedError"}


class FailureReporter(UserCallback):
    def __init__(self, max_failures: int):
        self.max_failures = max_failures  # -1: unlimited, as in ray.train.FailureConfig
        self.failures = 0
        self.last_checkpoint: str | None = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None:
            self.last_checkpoint = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.failures += 1
        ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
        why = _describe(worker_exceptions)
        allowed = "unlimited" if self.max_failures < 0 else str(self.max_failures)
        where = self.last_checkpoint or "the start (no checkpoint yet)"
        if self.max_failures < 0 or self.failures <= self.max_failures:
            nxt = (f"restarting the workers from {where}; if a node was lost, the run waits "
                   "until the cluster has room for all workers again")
        else:
            nxt = (f"that exceeds --max-failures, so the run stops; resubmit with --resume to "
                   f"continue from {where}")
        print(f"moola: training worker rank(s) {ranks} failed ({why}); failure {self.failures} "
              f"of max_failures={allowed}: {nxt}", flush=True)


def stopped_run_message(exc: BaseException, cfg) -> str | None:
    """The driver's one-line account of a run Ray Train gave up on after worker failures (the
    workers' tracebacks are already in the output above it); None for any other error."""
    from ray.train import TrainingFailedError
    if not isinstance(exc, TrainingFailedError):
        return None
    failures = getattr(exc, "worker_failures", None) or {}
    what = (f"worker rank(s) {', '.join(str(r) for r in sorted(failures))} failed "
            f"({_describe(failures)})") if failures else _first_line(exc)
    return (f"training stopped: {what}, and --max-failures {cfg.cluster.max_failures} allows no "
            f"more restarts. The checkpoints in {cfg.out} are kept: run the same command with "
            "--resume to continue from the last one")


class QuickStopCleaner(PlacementGroupCleanerCallback):
    """Ray's placement-group cleaner, stopped at once at the end of a run (see the module doc)."""

    def _stop_cleaner(self):
        if self._cleaner is None:
            return
        try:
            ray.kill(self._cleaner, no_restart=True)  # returns at once; the actor just exits
        except Exception:  # already gone: nothing to stop
            pass
        finally:
            self._cleaner = None


class PipelineTrainer(TorchTrainer):
    """TorchTrainer with the cleaner swapped (a private hook of Ray 2.60, which pyproject pins):
    QuickStopCleaner on a cluster, none on a local Ray (no state API there)."""

    def __init__(self, *args, cleaner: bool = True, **kwargs):
        self._with_cleaner = cleaner
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        callbacks = []
        for cb in super()._create_default_callbacks():
            if type(cb) is PlacementGroupCleanerCallback:
                if not self._with_cleaner:
                    continue
                cb = QuickStopCleaner()
            callbacks.append(cb)
        return callbacks
