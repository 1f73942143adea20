"""`make demo` and the end of a run with Ray workers: our console lines only (Ray's output in
OUT/ray.log), no dead time in Ray's placement-group cleaner, and a report written before the run
is declared finished, so a job stopped right after its last epoch still has one. How long the
end takes is measured in bench/train_overhead.py --run-end, not here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.fixtures.cli import REPO
from tests.test_jobs import _cli, _job_id
from tests.test_train_local import SMALL_MODEL, make_shards

pytestmark = pytest.mark.ray

# What Ray 2.60's cleaner prints when its stop times out (ray#65443 and related).
CLEANER_TIMEOUT = ("Failed to stop PlacementGroupCleaner", "Monitor thread did not exit",
                   "GetTimeoutError")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("run-end")
    (base / "small.yaml").write_text(SMALL_MODEL)
    return make_shards(base / "shards"), str(base / "small.yaml")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`make demo` itself (infra/demo.sh: synth, shard, inspect, 2 workers on a local Ray), with
    RAY_ADDRESS naming a cluster that is gone in its environment: what the cleaner's state-API
    lookup finds when an earlier `ray start` left its address behind (the run itself starts its
    own local Ray)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", PYTHONUNBUFFERED="1",
               MOOLA_CLI=f"{sys.executable} -m pipeline.cli")
    proc = subprocess.run(["bash", "infra/demo.sh", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    return out / "run", proc


def test_make_demo_ends_without_the_cleaner_timeout_and_names_the_report(demo_run):
    out, proc = demo_run
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    for needle in CLEANER_TIMEOUT + ("Traceback",):
        assert needle not in text, text[-3000:]
    assert (out / "report.html").exists()
    assert f"report: {out / 'report.html'}" in proc.stdout


def test_make_demo_shows_our_lines_and_keeps_rays_output_in_the_run_dir(demo_run):
    out, proc = demo_run
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    for ray_internal in ("(RayTrainWorker", "(TrainController", "Reporting training result",
                         "core_worker.cc", "Traceback", "Token authentication", "pid="):
        assert ray_internal not in text, text[-3000:]
    for epoch in range(1, 6):
        assert re.search(rf"^epoch {epoch}/5 \| train ", proc.stdout, re.M), text[-3000:]
    assert f"Ray's own output: {out / 'ray.log'}" in proc.stdout
    ray_log = (out / "ray.log").read_text()
    assert "epoch 5/5 | train" in ray_log  # rank 0's own line, as its worker printed it


def test_a_job_stopped_right_after_its_last_epoch_has_its_report(ray_cluster, data, tmp_path):
    shards, config = data
    out = tmp_path / "job-run"
    # The job server sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by
    # default): the driver needs a few seconds to write the report.
    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url,
                "--env", "RAY_JOB_STOP_WAIT_TIME_S=60", "--", "--data", shards, "--out", str(out),
                "--config", config, "--workers", "1", "--epochs", "2", "--batch-size", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = _job_id(proc)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # every epoch done: stop it now, in Ray's teardown
        if metrics.exists() and len(metrics.read_text().splitlines()) == 2:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the job did not finish its 2 epochs")
    stopped = _cli(ray_cluster, "stop", job_id, "--address", ray_cluster.dashboard_url,
                   timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = _cli(ray_cluster, "status", job_id, "--address", ray_cluster.dashboard_url)
    assert re.search(rf"{job_id}: (STOPPED|SUCCEEDED)", status.stdout), status.stdout
    report = out / "report.html"
    assert report.exists(), os.listdir(out)
    assert report.stat().st_mtime >= metrics.stat().st_mtime  # it covers both epochs
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]

