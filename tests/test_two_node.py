"""Two "machines" on one host: infra/bootstrap.sh run for real in two network namespaces, with the
variables a RunPod Instant Cluster sets, forms a 2-node Ray cluster with token auth; a member
whose head never appears fails within its bound; a 2-worker CPU training run spans both nodes
and checkpoints to a SeaweedFS S3 bucket."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.fixtures.cli import REPO

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
        "RAY_AUTH_TOKEN": token,
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


@pytest.fixture
def two_node_cluster(netns_nodes, tmp_path):
    """A 2-node Ray cluster from infra/bootstrap.sh: head serving in ns 0, a member in ns 1."""
    net = netns_nodes(2)
    head, worker = net.nodes
    token = secrets.token_hex(16)
    logs = {"head": tmp_path / "head.log", "worker": tmp_path / "worker.log"}
    try:
        # The member starts first and must wait for the head, as on a real cluster.
        w = net.popen(worker, [BOOTSTRAP], node_env(net, worker, 1, token), logs["worker"])
        time.sleep(2)
        h = net.popen(head, [BOOTSTRAP], node_env(net, head, 0, token), logs["head"])
        wait_for_line(logs["head"], "cluster ready: 2 node(s)", [h, w], 180)
        yield net, token, logs
    finally:
        net.stop_all()
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
    net, token, logs = two_node_cluster
    head, worker = net.nodes
    head_log = logs["head"].read_text()
    assert f"collectives on {head.iface}" in head_log

    # Every node is alive, on its own address, with gloo/NCCL bound to its own inter-node NIC.
    env = node_env(net, head, 0, token, RAY_AUTH_MODE="token", RAY_ADDRESS=f"{head.addr}:6379")
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
