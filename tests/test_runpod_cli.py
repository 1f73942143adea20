"""`moola-pipeline runpod up|status|down` against the loopback RunPod fake (tests/fake_runpod.py,
the only fake in the project), run as a user runs it. The Ray head `up` waits for is real:
infra/bootstrap.sh in a network namespace, as the pod's entrypoint would run it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.fake_runpod import FakeRunPod, parse_input
from tests.fixtures.cli import REPO, assert_user_error, run_cli

POD_TEMPLATE = json.loads((REPO / "runpod" / "pod.json").read_text())
CLUSTER_TEMPLATE = json.loads((REPO / "runpod" / "cluster.json").read_text())
GPU = "NVIDIA GeForce RTX 4090"


@pytest.fixture
def fake(tmp_path):
    server = FakeRunPod(polls_until_running=2).start()
    server.record = tmp_path / "runpod-record.json"
    server.env = {
        "RUNPOD_API_BASE_URL": server.url, "RUNPOD_API_KEY": server.api_key,
        "RAY_AUTH_TOKEN": "raytok-" + secrets.token_hex(8),
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(6).upper(),
        "AWS_SECRET_ACCESS_KEY": "sk-" + secrets.token_hex(12),
        "AWS_ENDPOINT_URL": "https://s3.example.invalid", "MOOLA_RUNPOD_RECORD": str(server.record),
        "HOME": str(tmp_path),  # the SDK's ~/.runpod config, if any, must not be used
    }
    yield server
    server.stop()


def rp(fake, *args, env=None, timeout=120):
    return run_cli("runpod", *args, env={**fake.env, **(env or {})}, timeout=timeout)


def secrets_of(fake) -> list[str]:
    return [fake.api_key, fake.env["RAY_AUTH_TOKEN"], fake.env["AWS_SECRET_ACCESS_KEY"],
            fake.env["AWS_ACCESS_KEY_ID"]]


def assert_no_secrets(fake, *texts: str) -> None:
    files = [fake.record.read_text()] if fake.record.exists() else []
    for text in [*texts, *files]:
        for secret in secrets_of(fake):
            assert secret not in text


def created_pod_input(fake) -> dict:
    [create] = [r for r in fake.requests if "podFindAndDeployOnDemand" in r.raw]
    return parse_input(create.body["query"])


def assert_matches_pod_template(fields: dict, our_env: dict, gpus: int) -> None:
    t = POD_TEMPLATE
    assert fields["imageName"] == t["image_name"]
    assert fields["cloudType"] == t["cloud_type"]
    assert fields["gpuTypeId"] == GPU and fields["gpuCount"] == gpus
    assert fields["containerDiskInGb"] == t["container_disk_in_gb"]
    assert fields["volumeInGb"] == t["volume_in_gb"]
    assert fields["volumeMountPath"] == t["volume_mount_path"]
    assert fields["ports"] == t["ports"]
    assert fields["minVcpuCount"] == t["min_vcpu_count"]
    assert fields["minMemoryInGb"] == t["min_memory_in_gb"]
    assert fields["name"].startswith(t["name_prefix"] + "-")
    env = fields["env"]
    for key, value in t["env"].items():
        assert env[key] == value
    # The secrets the cluster needs reach the pod's env (only there), from our environment.
    for key in ("RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert env[key] == our_env[key]


def test_dry_run_prints_the_exact_request_masked_and_sends_nothing(fake):
    proc = rp(fake, "up", "--gpus", "2", "--gpu-type", GPU, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert fake.requests == [] and not fake.record.exists()
    assert f"POST {fake.url}/graphql" in proc.stdout and "Bearer ****" in proc.stdout
    body = json.loads(proc.stdout.split("\n\n")[1])  # the JSON body the SDK would post
    fields = parse_input(body["query"])
    masked = {**fake.env, **{k: "****" for k in ("RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID",
                                                 "AWS_SECRET_ACCESS_KEY")}}
    assert_matches_pod_template(fields, masked, gpus=2)
    assert_no_secrets(fake, proc.stdout, proc.stderr)


def test_cluster_dry_run_is_the_rest_v2_body_from_the_template(fake):
    proc = rp(fake, "up", "--gpus", "8", "--nodes", "2", "--gpu-type", GPU, "--dry-run",
              "--image", "registry.example/moola:dev")
    assert proc.returncode == 0, proc.stderr
    assert f"POST {fake.url}/v2/clusters" in proc.stdout
    body = json.loads(proc.stdout.split("\n\n", 1)[1])
    assert body["compute"] == {"gpuTypeId": GPU, "podCount": 2, "gpuCountPerPod": 8}
    assert body["image"] == "registry.example/moola:dev"
    for key in ("type", "disk", "ports", "args"):
        assert body[key] == CLUSTER_TEMPLATE[key]
    assert body["env"]["RAY_AUTH_TOKEN"] == "****"
    assert fake.requests == []
    assert_no_secrets(fake, proc.stdout, proc.stderr)


def test_cluster_create_poll_status_and_teardown(fake):
    proc = rp(fake, "up", "--gpus", "8", "--nodes", "2", "--gpu-type", GPU, "--no-wait")
    assert proc.returncode == 0, proc.stderr
    [cid] = fake.clusters
    [create] = [r for r in fake.requests if r.method == "POST" and r.path == "/v2/clusters"]
    assert create.authorized
    assert create.body["compute"]["podCount"] == 2 and create.body["type"] == CLUSTER_TEMPLATE["type"]
    record = json.loads(fake.record.read_text())["resources"]
    assert [(r["kind"], r["id"], r["nodes"]) for r in record] == [("cluster", cid, 2)]

    status = rp(fake, "status")
    assert status.returncode == 0 and f"cluster {cid}" in status.stdout
    assert "0/2 nodes running" in status.stdout  # the fake's pods are still starting

    down = rp(fake, "down")
    assert down.returncode == 0, down.stderr
    assert fake.clusters[cid]["deleted"] and not fake.record.exists()
    assert any(r.method == "DELETE" and r.path == f"/v2/clusters/{cid}" for r in fake.requests)
    assert_no_secrets(fake, proc.stdout, proc.stderr, status.stdout, down.stdout)


def test_missing_api_key_is_a_clear_error_and_nothing_is_sent(fake):
    proc = rp(fake, "up", "--gpus", "1", "--gpu-type", GPU, env={"RUNPOD_API_KEY": None})
    assert_user_error(proc, "RUNPOD_API_KEY is not set")
    assert fake.requests == [] and not fake.record.exists()


def test_wrong_api_key_is_refused_clearly(fake):
    proc = rp(fake, "up", "--gpus", "1", "--gpu-type", GPU, env={"RUNPOD_API_KEY": "rpa_wrong"})
    assert_user_error(proc, "RunPod rejected the API key in RUNPOD_API_KEY")
    assert not fake.record.exists()
    assert "rpa_wrong" not in proc.stdout + proc.stderr


def test_api_error_is_reported_and_nothing_recorded(fake):
    fake.graphql_error = "There are no longer any instances available with the requested specifications."
    proc = rp(fake, "up", "--gpus", "1", "--gpu-type", GPU)
    assert_user_error(proc, "RunPod API error", "no longer any instances available")
    assert not fake.record.exists() and fake.pods == {}


def test_unknown_gpu_type_names_the_flag(fake):
    proc = rp(fake, "up", "--gpus", "1", "--gpu-type", "NVIDIA Imaginary 9000")
    assert_user_error(proc, "--gpu-type", "NVIDIA Imaginary 9000")
    assert fake.pods == {}


def test_multi_node_on_plain_pods_is_refused(fake):
    proc = rp(fake, "up", "--gpus", "1", "--nodes", "2", "--mode", "pod", "--gpu-type", GPU)
    assert_user_error(proc, "--nodes 2 with --mode pod", "Instant Cluster")
    assert fake.requests == []


def test_missing_ray_token_is_refused_before_any_request(fake):
    proc = rp(fake, "up", "--gpus", "1", "--gpu-type", GPU, env={"RAY_AUTH_TOKEN": None})
    assert_user_error(proc, "RAY_AUTH_TOKEN is not set")
    assert fake.requests == []


@pytest.mark.netns
def test_up_waits_for_the_real_ray_head_then_status_and_down(fake, netns_nodes, tmp_path):
    """The pod's container is infra/bootstrap.sh in a namespace with the template's env; `up`
    polls the fake until the pod runs, then waits until that real Ray job server answers."""
    net = netns_nodes(1)
    node = net.nodes[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MOOLA_"))}
    env.update(POD_TEMPLATE["env"])
    env.update({"PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
                "RAY_AUTH_TOKEN": fake.env["RAY_AUTH_TOKEN"], "MOOLA_MIN_SHM_MB": "1",
                "MOOLA_RAY_NUM_CPUS": "1", "MOOLA_RAY_TEMP_DIR": f"/tmp/{net.prefix}-0",
                "MOOLA_RAY_START_ARGS": "--object-store-memory 100000000"})
    try:
        net.popen(node, [str(REPO / "infra" / "bootstrap.sh")], env, tmp_path / "pod.log")
        proxy = {"MOOLA_RUNPOD_PROXY_URL": f"http://{node.addr}:{{port}}"}
        start = time.monotonic()
        up = rp(fake, "up", "--gpus", "1", "--gpu-type", GPU, "--wait-timeout", "150",
                env=proxy, timeout=200)
        assert up.returncode == 0, (up.stdout, up.stderr, (tmp_path / "pod.log").read_text()[-3000:])
        address = f"http://{node.addr}:8265"
        assert f"ray head answering at {address}" in up.stdout
        assert f"submit --address {address}" in up.stdout
        [pod_id] = fake.pods
        assert fake.pods[pod_id]["polls"] > fake.polls_until_running  # it polled until running
        assert_matches_pod_template(created_pod_input(fake), fake.env, gpus=1)
        assert time.monotonic() - start < 150

        status = rp(fake, "status", env=proxy)
        assert status.returncode == 0, status.stderr
        assert f"pod {pod_id}" in status.stdout and "ray head: answering" in status.stdout
        wrong = rp(fake, "status", env={**proxy, "RAY_AUTH_TOKEN": "not-the-token"})
        assert_user_error(wrong, "refused RAY_AUTH_TOKEN")

        # An Instant Cluster waits the same way, for all its nodes and then node 0's head.
        up2 = rp(fake, "up", "--gpus", "1", "--nodes", "2", "--gpu-type", GPU, "--wait-timeout", "60",
                 env=proxy, timeout=90)
        assert up2.returncode == 0, up2.stderr
        [cid] = fake.clusters
        assert fake.clusters[cid]["polls"] > fake.polls_until_running
        assert f"ray head answering at {address}" in up2.stdout

        down = rp(fake, "down")
        assert down.returncode == 0 and f"terminated pod {pod_id}" in down.stdout
        assert f"deleted cluster {cid}" in down.stdout
        assert fake.pods[pod_id]["terminated"] and fake.clusters[cid]["deleted"]
        assert not fake.record.exists()
        assert_no_secrets(fake, up.stdout, up.stderr, up2.stdout, status.stdout, down.stdout,
                          wrong.stderr)
    finally:
        net.stop_all()
        shutil.rmtree(f"/tmp/{net.prefix}-0", ignore_errors=True)
