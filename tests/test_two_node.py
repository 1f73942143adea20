"""Two "machines" on one host: infra/bootstrap.sh run for real in two network namespaces, with the
variables a RunPod Instant Cluster sets, forms a 2-node Ray cluster with token auth; a member
whose head never appears fails within its bound; a 2-worker CPU training run, submitted to the
cluster's job server from outside, spans both nodes and checkpoints to a SeaweedFS S3 bucket."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import requests

from tests.fixtures.cli import REPO
from tests.fixtures.netns import TcpForwarder, create_net, netns_available

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BOOTSTRAP = str(REPO / "infra" / "bootstrap.sh")
VENV_BIN = str(Path(sys.executable).parent)


def node_env(net, node, rank: int, token: str, **extra) -> dict:
    """The environment RunPod gives an Instant Cluster node, plus test-sized Ray settings."""
    head = net.nodes[0]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "NCCL_", "GLOO_", "MOOLA_"))}
    env.update({
        "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        "NODE_RANK": str(rank), "NUM_NODES": str(len(net.nodes)),
        "PRIMARY_ADDR": head.addr, "MASTER_ADDR": head.addr, "NODE_ADDR": node.addr,
        "MOOLA_NET_IFACE": node.iface,  # RunPod's ens1 is this veth here
        "RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token",  # as runpod/*.json set it
        "MOOLA_RAY_NUM_CPUS": "1",  # one CPU per node: two 1-CPU workers must use both nodes
        "MOOLA_RAY_TEMP_DIR": f"/tmp/{net.prefix}-{rank}",  # short: Ray's socket paths have a limit
        "MOOLA_RAY_START_ARGS": "--object-store-memory 100000000",
        "MOOLA_MIN_SHM_MB": "1",
        "MOOLA_HEAD_WAIT_S": "120", "MOOLA_NODES_WAIT_S": "150",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def wait_for_line(log: Path, needle: str, procs, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a bootstrap exited early ({p.returncode}):\n{text[-3000:]}")
        time.sleep(1)
    raise AssertionError(f"{needle!r} not in {log} after {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def two_node_cluster(s3_server, tmp_path_factory):
    """A 2-node Ray cluster from infra/bootstrap.sh (head serving in ns 0, a member in ns 1), with
    the session's SeaweedFS S3 reachable from both namespaces through the bridge."""
    why = netns_available()
    if why:
        pytest.fail(f"network-namespace test {why}")
    tmp = tmp_path_factory.mktemp("two_node")
    net = create_net(2)
    head, worker = net.nodes
    token = secrets.token_hex(16)
    endpoint = urlparse(s3_server.endpoint)
    forward = TcpForwarder(net.bridge_addr, endpoint.hostname, endpoint.port)
    s3_env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://{forward.host}:{forward.port}",
              "AWS_ENDPOINT_URL_S3": f"http://{forward.host}:{forward.port}"}
    logs = {"head": tmp / "head.log", "worker": tmp / "worker.log"}
    try:
        # The member starts first and must wait for the head, as on a real cluster.
        w = net.popen(worker, [BOOTSTRAP], node_env(net, worker, 1, token, **s3_env), logs["worker"])
        time.sleep(2)
        h = net.popen(head, [BOOTSTRAP], node_env(net, head, 0, token, **s3_env), logs["head"])
        wait_for_line(logs["head"], "cluster ready: 2 node(s)", [h, w], 180)
        yield SimpleNamespace(net=net, token=token, logs=logs, s3_env=s3_env, tmp=tmp)
    finally:
        try:
            net.teardown()
        finally:
            forward.close()
            for rank in (0, 1):
                shutil.rmtree(f"/tmp/{net.prefix}-{rank}", ignore_errors=True)


CHECK_NODES = r"""
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=os.environ["RAY_ADDRESS"])
nodes = [n for n in ray.nodes() if n["Alive"]]
@ray.remote(num_cpus=1)
def where():
    return [ray.util.get_node_ip_address(), os.environ.get("GLOO_SOCKET_IFNAME"),
            os.environ.get("NCCL_SOCKET_IFNAME")]
refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes]
print("NODES " + json.dumps(ray.get(refs)))
"""


def test_bootstrap_forms_two_node_cluster_with_token_auth(two_node_cluster):
    net, token, logs = two_node_cluster.net, two_node_cluster.token, two_node_cluster.logs
    head, worker = net.nodes
    head_log = logs["head"].read_text()
    assert f"collectives on {head.iface}" in head_log

    # Every node is alive, on its own address, with gloo/NCCL bound to its own inter-node NIC.
    env = node_env(net, head, 0, token, RAY_ADDRESS=f"{head.addr}:6379")
    proc = net.run(head, [sys.executable, "-c", CHECK_NODES], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("NODES "))
    seen = sorted(tuple(x) for x in json.loads(line[6:]))
    assert seen == sorted([(head.addr, head.iface, head.iface), (worker.addr, worker.iface, worker.iface)])

    # The job server on the head's cluster address answers the token and nothing else.
    jobs = f"http://{head.addr}:8265/api/jobs/"
    assert requests.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    assert requests.get(jobs, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code in (401, 403)
    assert requests.get(jobs, timeout=10).status_code in (401, 403)
    assert token not in head_log and token not in logs["worker"].read_text()


def test_member_without_head_fails_within_its_bound(netns_nodes, tmp_path):
    net = netns_nodes(2)
    worker = net.nodes[1]  # nobody starts a head on nodes[0]
    env = node_env(net, worker, 1, "t0ken", MOOLA_HEAD_WAIT_S="4")
    start = time.monotonic()
    proc = net.run(worker, [BOOTSTRAP], env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert f"the Ray head at {net.nodes[0].addr}:6379 did not answer within 4s" in proc.stderr
    assert "MOOLA_HEAD_WAIT_S" in proc.stderr
    assert elapsed < 4 + 15, elapsed  # the bound plus one probe and start-up, not Ray's own timeouts


def ray_actor_logs(log_root: str, actor: str) -> list[Path]:
    """Worker log files of one node whose process ran `actor` (Ray tags them `:actor_name:X`)."""
    logs = Path(log_root) / "session_latest" / "logs"
    return [p for p in logs.glob("worker-*.out") if f":actor_name:{actor}" in p.read_text(errors="replace")]


def test_two_worker_training_spans_both_nodes_and_checkpoints_to_s3(two_node_cluster, s3_server,
                                                                    monkeypatch):
    from pipeline.data.shards import random_chunks, write_shard_set
    from pipeline.train.rundir import read_metrics

    c = two_node_cluster
    head = c.net.nodes[0]
    bucket = f"t-{secrets.token_hex(6)}"
    s3_server.boto3_client().create_bucket(Bucket=bucket)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    write_shard_set(f"s3://{bucket}/shards", [f"f{i}" for i in range(12)], itertools.chain(
        random_chunks(32, split="train", seed=0), random_chunks(8, split="val", seed=1)))
    config = c.tmp / "run.yaml"
    config.write_text("model:\n  hidden: 16\n  head_width: 16\n")

    # Submitted from outside the cluster (the root namespace plays the laptop), as the README's
    # `runpod up` -> `submit` flow does: only the token and the S3 endpoint come from here; the
    # nodes read their S3 keys from the environment bootstrap gave them.
    laptop = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    laptop.update({"RAY_AUTH_TOKEN": c.token, "AWS_ENDPOINT_URL": c.s3_env["AWS_ENDPOINT_URL"],
                   "AWS_ENDPOINT_URL_S3": c.s3_env["AWS_ENDPOINT_URL"]})
    proc = subprocess.run(
        [str(Path(VENV_BIN) / "moola-pipeline"), "submit", "--address", f"http://{head.addr}:8265",
         "--no-working-dir", "--follow", "--",
         "--data", f"s3://{bucket}/shards", "--out", f"s3://{bucket}/runs/r1",
         "--config", str(config), "--workers", "2", "--epochs", "2", "--batch-size", "8"],
        env=laptop, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "SUCCEEDED" in proc.stdout + proc.stderr

    keys = [o["Key"] for o in s3_server.boto3_client().list_objects_v2(
        Bucket=bucket, Prefix="runs/r1/").get("Contents", [])]
    assert any("/checkpoint_" in k for k in keys), keys
    records = read_metrics(f"s3://{bucket}/runs/r1")
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)

    # One CPU per node and one CPU per worker: the two workers ran on different nodes.
    per_node = [ray_actor_logs(f"/tmp/{c.net.prefix}-{rank}", "RayTrainWorker") for rank in (0, 1)]
    assert all(per_node), per_node
    assert c.token not in proc.stdout + proc.stderr
    assert s3_server.secret_key not in proc.stdout + proc.stderr
