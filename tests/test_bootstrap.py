"""infra/bootstrap.sh, the container entrypoint, run without Docker: bad RunPod-style environments
fail fast with one clear line, and a single pod (no node variables) runs for real in a network
namespace: Ray head with token auth, the command run with RAY_ADDRESS, SIGTERM forwarded to it and its exit status passed on,
a small /dev/shm reported. The multi-node paths are in test_two_node.py. Also the rest of infra/:
the storage bootstrap (`storage check`) and the local stack (`stack up|env|down`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.cli import REPO, assert_user_error, run_cli

BOOTSTRAP = str(REPO / "infra" / "bootstrap.sh")
VENV_BIN = str(Path(sys.executable).parent)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "NCCL_", "GLOO_", "MOOLA_"))
           and k not in ("NODE_RANK", "NUM_NODES", "PRIMARY_ADDR", "MASTER_ADDR", "NODE_ADDR",
                         "NUM_TRAINERS")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def bootstrap(env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([BOOTSTRAP, *args], env=env, capture_output=True, text=True, timeout=timeout)


TOKEN = "tok-" + secrets.token_hex(8)


@pytest.mark.parametrize("variables, message", [
    ({"NODE_RANK": "2", "NUM_NODES": "2", "PRIMARY_ADDR": "169.254.1.2", "NODE_ADDR": "169.254.1.3"},
     "NODE_RANK=2 must be below NUM_NODES=2"),
    ({"NODE_RANK": "one", "NUM_NODES": "2"}, "rank=one is not a non-negative integer"),
    ({"NODE_RANK": "1", "NUM_NODES": "2", "NODE_ADDR": "169.254.1.3"},
     "neither PRIMARY_ADDR nor MASTER_ADDR is set"),
    ({"NODE_RANK": "1", "NUM_NODES": "2", "MASTER_ADDR": "169.254.1.2"}, "NODE_ADDR"),
    ({"NUM_NODES": "0"}, "NUM_NODES=0 must be at least 1"),
    ({"MOOLA_HEAD_WAIT_S": "soon"}, "head_wait_s=soon"),
])
def test_bad_environment_fails_fast_with_one_clear_line(variables, message):
    proc = bootstrap(clean_env(RAY_AUTH_TOKEN=TOKEN, **variables), "moola-pipeline", "--help")
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if ": error: " in l]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout
    assert "ray" not in proc.stdout.lower()  # nothing was started


def test_missing_ray_token_is_refused():
    proc = bootstrap(clean_env(), "moola-pipeline", "--help")
    assert proc.returncode != 0
    assert "RAY_AUTH_TOKEN is not set" in proc.stderr


CHECK_COMMAND = r"""
import os, signal, sys, time, ray
ray.init(address=os.environ["RAY_ADDRESS"])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))  # a clean shutdown with its own status
print("RESOURCES", ray.cluster_resources().get("CPU"))
print("NCCL", os.environ.get("NCCL_SOCKET_IFNAME"), "GLOO", os.environ.get("GLOO_SOCKET_IFNAME"))
print("AUTH", os.environ.get("RAY_AUTH_MODE"))
print("CHECKS" + " DONE", flush=True)  # (split so the echoed command line does not match)
time.sleep(600)
"""


@pytest.mark.netns
def test_single_pod_runs_head_then_command_and_forwards_sigterm(netns_nodes, tmp_path):
    net = netns_nodes(1)
    node = net.nodes[0]
    temp = f"/tmp/{net.prefix}-0"
    log = tmp_path / "pod.log"
    env = clean_env(RAY_AUTH_TOKEN=TOKEN, MOOLA_RAY_NUM_CPUS="1", MOOLA_RAY_TEMP_DIR=temp,
                    MOOLA_RAY_START_ARGS="--object-store-memory 100000000",
                    MOOLA_MIN_SHM_MB=str(10**9), PYTHONUNBUFFERED="1")
    try:
        proc = net.popen(node, [BOOTSTRAP, sys.executable, "-c", CHECK_COMMAND], env, log)
        deadline = time.monotonic() + 150
        while "CHECKS DONE" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        out = log.read_text()
        assert "RESOURCES 1.0" in out, out[-4000:]  # it reached this pod's Ray head via RAY_ADDRESS
        assert "AUTH token" in out
        # A single pod has no ens1: collectives are left to pick their interface.
        assert "NCCL None GLOO None" in out
        assert "warning: /dev/shm is" in out and "--shm-size" in out

        # `docker stop` / pod shutdown: SIGTERM reaches the running command at once, and its
        # exit status is the container's.
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 7, log.read_text()[-3000:]
        out = log.read_text()
        assert "command exited with status 7" in out
        assert TOKEN not in out
        # The head went down with the command (Ray's dashboard helpers follow within seconds).
        deadline = time.monotonic() + 20
        while net.pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert net.pids() == []
    finally:
        net.stop_all()
        shutil.rmtree(temp, ignore_errors=True)


# -- storage bootstrap: `moola-pipeline storage check URI` ------------------------------------

def test_storage_check_creates_the_bucket_and_leaves_nothing_behind(s3_server):
    bucket = f"t-{secrets.token_hex(6)}"
    proc = run_cli("storage", "check", f"s3://{bucket}/runs/exp1", env=s3_server.env())
    assert proc.returncode == 0, proc.stderr
    assert f"created bucket {bucket}" in proc.stdout
    client = s3_server.boto3_client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    # The probe is gone; pyarrow leaves the prefix itself as an empty directory marker.
    assert set(keys) <= {"runs/exp1/", "runs/"}, keys
    again = run_cli("storage", "check", f"s3://{bucket}/runs/exp1", env=s3_server.env())
    assert again.returncode == 0 and "created" not in again.stdout
    assert s3_server.secret_key not in proc.stdout + proc.stderr + again.stdout


def test_storage_check_with_wrong_credentials_names_the_uri_and_creates_nothing(s3_server):
    bucket = f"t-{secrets.token_hex(6)}"
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = run_cli("storage", "check", f"s3://{bucket}/p", env=env)
    assert_user_error(proc, f"s3://{bucket}", "access denied", "AWS_SECRET_ACCESS_KEY")
    names = [b["Name"] for b in s3_server.boto3_client().list_buckets()["Buckets"]]
    assert bucket not in names
    assert "not-the-secret" not in proc.stderr + proc.stdout


def test_storage_check_unreachable_endpoint_is_one_clear_line():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
           "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    proc = run_cli("storage", "check", "s3://somewhere/p", env=env, timeout=60)
    assert_user_error(proc, "cannot reach the S3 endpoint http://127.0.0.1:9")


def test_storage_check_local_directory(tmp_path):
    target = tmp_path / "a" / "b"
    proc = run_cli("storage", "check", str(target))
    assert proc.returncode == 0 and "created directory" in proc.stdout
    assert target.is_dir() and list(target.iterdir()) == []


# -- local stack: `moola-pipeline stack up|env|down` ------------------------------------------

def test_local_stack_up_env_down(tmp_path):
    import requests

    stack_dir = tmp_path / "stack"
    env = {"MOOLA_STACK_DIR": str(stack_dir), "RAY_ADDRESS": None, "RAY_AUTH_TOKEN": None}
    up = run_cli("stack", "up", "--num-cpus", "1", env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        exported = dict(line[len("export "):].split("=", 1) for line in up.stdout.splitlines()
                        if line.startswith("export "))
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN",
                "RAY_AUTH_MODE"} <= set(exported)
        state = json.loads((stack_dir / "state.json").read_text())
        assert exported["AWS_SECRET_ACCESS_KEY"] not in json.dumps(state)
        assert exported["RAY_AUTH_TOKEN"] not in json.dumps(state)

        # What it prints is what works: S3 with those keys, the job server with that token.
        check = run_cli("storage", "check", "s3://stack-check/x", env=exported)
        assert check.returncode == 0, check.stderr
        jobs = state["dashboard_url"] + "/api/jobs/"
        ok = requests.get(jobs, headers={"Authorization": f"Bearer {exported['RAY_AUTH_TOKEN']}"}, timeout=10)
        assert ok.status_code == 200
        assert requests.get(jobs, timeout=10).status_code in (401, 403)
        assert run_cli("stack", "env", env=env).stdout == up.stdout
        assert_user_error(run_cli("stack", "up", env=env), "already running")
    finally:
        down = run_cli("stack", "down", env=env, timeout=120)
    assert down.returncode == 0 and "local stack stopped" in down.stdout
    assert not (stack_dir / "state.json").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(state["dashboard_url"] + "/api/jobs/", timeout=5)
    assert_user_error(run_cli("stack", "env", env=env), "no local stack is running")
