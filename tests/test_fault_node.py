"""Fault 2 (issue 7): a whole node lost during a 2-node run.

Two "machines" (network namespaces) form a Ray cluster with infra/bootstrap.sh; a 2-worker CPU
training run (one worker per node, max_failures 1, checkpoints in SeaweedFS S3) is submitted to
the head's job server. After the first checkpoint every process of the member node is SIGKILLed,
as when a pod vanishes. Ray Train V2 counts the dead worker group against max_failures and starts
a new group from the last checkpoint; with one 1-CPU node left the 2-worker group cannot be placed,
so it waits (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, then retries) until the node is replaced:
bootstrap.sh is run again in the same namespace, as RunPod restarts a pod. The run then finishes
on both nodes; the user sees in the job's output that a worker died and the run restarted from a
checkpoint, and metrics.jsonl holds each epoch exactly once. With max_failures 0 the same loss
ends the job with one line from the driver (which ranks, why, "run the same command with
--resume"); once the node is back, resubmitting with --resume finishes the run, each epoch once."""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.fixtures.cli import REPO
from tests.fixtures.netns import TcpForwarder, _ip, create_net, netns_available
from tests.test_two_node import BOOTSTRAP, VENV_BIN, node_env, wait_for_line

pytestmark = [pytest.mark.netns, pytest.mark.slow]

EPOCHS, BATCH, N_TRAIN, EVERY = 4, 8, 96, 4  # 12 steps per epoch, a checkpoint every 4
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of its checkpoints


def kill_node(net, node) -> int:
    """SIGKILL every process in the node's namespace (the whole machine is gone); how many."""
    pids = [int(p) for p in _ip("netns", "pids", node.ns, check=False).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _ip("netns", "pids", node.ns, check=False).stdout.split():
        time.sleep(0.2)
    return len(pids)


def registered_checkpoint(out: str, job: subprocess.Popen, timeout_s: float) -> str:
    """The newest checkpoint Ray Train's controller has registered (and so will restart from):
    it rewrites checkpoint_manager_snapshot.json in OUT each time it registers one. A checkpoint
    merely uploaded may not be registered yet when its node dies."""
    from pipeline import storage
    snapshot = storage.join(out, SNAPSHOT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = sorted(set(re.findall(r"checkpoint_e\d+_s\d+", storage.read_text(snapshot)))) \
            if storage.exists(snapshot) else []
        if names:
            return names[-1]
        assert job.poll() is None, f"the job ended before a checkpoint:\n{job.stdout.read()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint registered in {snapshot} after {timeout_s}s")


@pytest.fixture
def cluster(s3_server, tmp_path):
    """Like test_two_node's cluster, function-scoped because the test breaks it; torn down
    (namespaces, bridge, every Ray process in them, temp dirs) also when the test fails."""
    why = netns_available()
    if why:
        pytest.fail(f"network-namespace test {why}")
    net = create_net(2)
    token = secrets.token_hex(16)
    endpoint = urlparse(s3_server.endpoint)
    forward = TcpForwarder(net.bridge_addr, endpoint.hostname, endpoint.port)
    s3_env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://{forward.host}:{forward.port}",
              "AWS_ENDPOINT_URL_S3": f"http://{forward.host}:{forward.port}"}
    temp_dirs = [f"/tmp/{net.prefix}-0", f"/tmp/{net.prefix}-1", f"/tmp/{net.prefix}-1b"]
    try:
        yield net, token, s3_env
    finally:
        try:
            net.teardown()
        finally:
            forward.close()
            for d in temp_dirs:
                shutil.rmtree(d, ignore_errors=True)


def start_node(net, rank: int, token: str, s3_env: dict, log: Path, **extra) -> subprocess.Popen:
    node = net.nodes[rank]
    return net.popen(node, [BOOTSTRAP], node_env(net, node, rank, token, **s3_env, **extra), log)


def start_cluster(net, token, s3_env, tmp_path) -> None:
    h = start_node(net, 0, token, s3_env, tmp_path / "head.log")
    w = start_node(net, 1, token, s3_env, tmp_path / "member.log")
    wait_for_line(tmp_path / "head.log", "cluster ready: 2 node(s)", [h, w], 180)


def replace_member(net, token, s3_env, tmp_path) -> None:
    """What RunPod does with a lost pod: a new one, the same bootstrap, the same address."""
    w2 = start_node(net, 1, token, s3_env, tmp_path / "member2.log",
                    MOOLA_RAY_TEMP_DIR=f"/tmp/{net.prefix}-1b")
    wait_for_line(tmp_path / "member2.log", "joining the cluster", [w2], 60)


def make_run(s3_server, tmp_path, monkeypatch) -> tuple[str, str, Path]:
    """Shards in a fresh bucket, a small model config; (bucket, out, config)."""
    from pipeline.data.shards import random_chunks, write_shard_set
    bucket = f"t-{secrets.token_hex(6)}"
    s3_server.boto3_client().create_bucket(Bucket=bucket)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    write_shard_set(f"s3://{bucket}/shards", [f"f{i}" for i in range(12)], itertools.chain(
        random_chunks(N_TRAIN, split="train", seed=0), random_chunks(16, split="val", seed=1)))
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  hidden: 16\n  head_width: 16\ntrain:\n  keep_checkpoints: 50\n")
    return bucket, f"s3://{bucket}/runs/r1", config


def submit(net, token, s3_env, bucket, out, config, *extra) -> subprocess.Popen:
    """`moola-pipeline submit --follow` from the root namespace (the laptop), as in the README."""
    laptop = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    laptop.update({"RAY_AUTH_TOKEN": token, "AWS_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"],
                   "AWS_ENDPOINT_URL_S3": s3_env["AWS_ENDPOINT_URL"]})
    return subprocess.Popen(
        [str(Path(VENV_BIN) / "moola-pipeline"), "submit", "--address",
         f"http://{net.nodes[0].addr}:8265", "--no-working-dir", "--follow", "--",
         "--data", f"s3://{bucket}/shards", "--out", out, "--config", str(config),
         "--workers", "2", "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
         "--checkpoint-every", str(EVERY), "--seed", "3", *extra],
        env=laptop, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def finish(job: subprocess.Popen, timeout_s: float) -> str:
    try:
        output, _ = job.communicate(timeout=timeout_s)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return output


def failure_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "moola: training worker rank(s)" in line]


def assert_complete_run(out: str) -> None:
    """Every epoch recorded exactly once, in order, all by the full 2-worker group, and the
    final checkpoint whole."""
    from pipeline import storage
    from pipeline.train.rundir import checkpoint_dirs, read_metrics
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == list(range(EPOCHS)), records
    assert [r["step"] for r in records] == [(e + 1) * N_TRAIN // BATCH for e in range(EPOCHS)]
    assert all(r["world_size"] == 2 for r in records)
    final = f"checkpoint_e{EPOCHS:04d}_s{EPOCHS * N_TRAIN // BATCH:08d}"
    assert final in checkpoint_dirs(out)
    assert storage.exists(storage.join(out, final, "meta.json"))


def test_lost_node_is_replaced_and_the_run_finishes_from_its_checkpoint(cluster, s3_server,
                                                                        tmp_path, monkeypatch):
    net, token, s3_env = cluster
    member = net.nodes[1]
    start_cluster(net, token, s3_env, tmp_path)
    bucket, out, config = make_run(s3_server, tmp_path, monkeypatch)
    job = submit(net, token, s3_env, bucket, out, config, "--max-failures", "1")
    try:
        ckpt = registered_checkpoint(out, job, 150)
        assert kill_node(net, member) > 0
        time.sleep(5)  # the pod is gone for a while, then replaced
        replace_member(net, token, s3_env, tmp_path)
    finally:
        output = finish(job, 240)
    (tmp_path / "job.out").write_text(output)
    assert job.returncode == 0, output[-3000:]
    assert "SUCCEEDED" in output

    # What the user sees: one line naming the failed ranks, the budget used and the way on.
    said = failure_lines(output)
    assert len(said) == 1, output[-6000:]
    restart = re.search(r"failure 1 of max_failures=1: restarting the workers from "
                        r"(checkpoint_e\d+_s\d+)", said[0])
    assert restart and restart[1] >= ckpt, said[0]  # at least the one registered before the kill
    assert "waits until the cluster has room" in said[0]
    # The lost machine is named: by the failure line (the unreachable worker's address) or by
    # Ray's "node ... address: A ... has been marked dead", whichever comes first.
    assert member.addr in said[0] or f"address: {member.addr}" in output, output[-6000:]
    assert_complete_run(out)
    assert token not in output and s3_server.secret_key not in output


def test_lost_node_beyond_max_failures_fails_clearly_and_resume_finishes(cluster, s3_server,
                                                                         tmp_path, monkeypatch):
    net, token, s3_env = cluster
    start_cluster(net, token, s3_env, tmp_path)
    bucket, out, config = make_run(s3_server, tmp_path, monkeypatch)
    job = submit(net, token, s3_env, bucket, out, config, "--max-failures", "0")
    try:
        ckpt = registered_checkpoint(out, job, 150)
        assert kill_node(net, net.nodes[1]) > 0
    finally:
        output = finish(job, 180)
    (tmp_path / "job.out").write_text(output)
    assert job.returncode != 0, output[-3000:]
    assert re.search(r"job \S+ failed: ", output), output[-3000:]  # the job's status, as a UserError
    said = failure_lines(output)
    assert len(said) == 1, output[-6000:]
    stop = re.search(r"failure 1 of max_failures=0: that exceeds --max-failures, so the run "
                     r"stops; resubmit with --resume to continue from (checkpoint_e\d+_s\d+)", said[0])
    assert stop and stop[1] >= ckpt, said[0]
    # The driver ends with one line (the workers' tracebacks are Ray's, above it), not its own.
    assert "error: training stopped: worker rank(s) " in output, output[-3000:]
    assert f"--max-failures 0 allows no more restarts. The checkpoints in {out} are kept: run " \
        "the same command with --resume" in output
    assert "pipeline/cli.py" not in output  # no traceback through our own code

    # The node comes back; the same command with --resume finishes the run where it stopped.
    replace_member(net, token, s3_env, tmp_path)
    again = submit(net, token, s3_env, bucket, out, config, "--max-failures", "0", "--resume")
    output2 = finish(again, 240)
    (tmp_path / "resume.out").write_text(output2)
    assert again.returncode == 0, output2[-3000:]
    assert "SUCCEEDED" in output2 and not failure_lines(output2)
    assert_complete_run(out)
