"""The local engine: the worker in this process, plain torch, no Ray.

Chunks (or shard batches) go through one `Worker` in order; each window table is written to the
staging prefix as it comes and folded into the per-bar combiner, so memory holds the per-bar
features of the input plus one chunk's outputs, whatever the length of the input.
"""

from __future__ import annotations

from pipeline.predict.inputs import ShardInput
from pipeline.predict.job import Plan, Worker, shard_batches
from pipeline.predict.output import Staging


def run_local(plan: Plan, staging: Staging, progress) -> dict:
    """Predict every window of the plan into `staging`; returns engine facts for the manifest."""
    worker = Worker(**plan.worker_args())
    combiner = plan.combiner()
    done = 0
    progress("windows", 0, plan.windows)
    with staging.writer("windows", plan.schema()) as writer:
        for table in _tables(plan, worker):
            writer.write(table)
            if combiner is not None:
                combiner.add(table)
            done += table.num_rows
            progress("windows", done, plan.windows)
    if combiner is not None:
        bars = combiner.table()
        with staging.writer("bars", bars.schema) as writer:
            writer.write(bars)
    return {"engine": "local", "device": str(worker.predictor.device)}


def _tables(plan: Plan, worker: Worker):
    if isinstance(plan.source, ShardInput):
        for batch in shard_batches(plan.source.files, plan.options.batch_size):
            yield worker.shard_rows(batch)
    else:
        for chunk in plan.chunks():
            yield worker.chunk(chunk)
