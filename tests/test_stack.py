"""The local development stack (`moola-pipeline stack up|env|down`), run as a user runs it: it
comes up again on the same state dir with the data of the last session, `down --wipe` deletes
that data, every port it opens is on loopback, its exports make the jobs commands work without
`--address` (while `train` still joins a cluster only with one), and a failure to start is one
line. The basic up/env/down cycle is in test_bootstrap.py."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import psutil

from pipeline.devstack.ray_head import RayHead
from tests.fixtures.cli import REPO, assert_user_error, run_cli

# a shell of a user who has not exported a stack (or any cluster) yet
BARE = {"MOOLA_STACK_DIR": None, "RAY_ADDRESS": None, "RAY_AUTH_TOKEN": None,
        "RAY_AUTH_MODE": None, "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
        "AWS_ENDPOINT_URL": None, "AWS_ENDPOINT_URL_S3": None,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None}


def exports(stdout: str) -> dict[str, str]:
    """The `export NAME=VALUE` lines, unquoted as a shell's eval would."""
    pairs = [line[len("export "):].split("=", 1) for line in stdout.splitlines()
             if line.startswith("export ")]
    return {name: shlex.split(value)[0] for name, value in pairs}


def up(stack_dir: Path) -> subprocess.CompletedProcess:
    proc = run_cli("stack", "up", "--num-cpus", "1", "--dir", stack_dir, env=BARE, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def down(stack_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_cli("stack", "down", *flags, "--dir", stack_dir, env=BARE, timeout=120)


def listening(procs) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `procs`. Written out here
    rather than taken from pipeline.devstack.sockets, which `stack up` uses for the same check."""
    found = set()
    for proc in procs:
        try:
            found |= {(proc.name(), c.laddr.ip, c.laddr.port)
                      for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return sorted(found)


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback  # ::ffff:127.0.0.1 too


def s3_client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


class DevStack:
    """A stack in its own state dir, driven through the CLI; `ensure_up()` starts it when a test
    before left it down, so the tests of this module need no particular order."""

    def __init__(self, stack_dir: Path):
        self.dir = stack_dir
        self.up_output = ""

    def up(self) -> "DevStack":
        self.up_output = up(self.dir).stdout
        return self

    def ensure_up(self) -> "DevStack":
        return self if (self.dir / "state.json").exists() else self.up()

    def down(self, *flags: str) -> subprocess.CompletedProcess:
        return down(self.dir, *flags)

    @property
    def env(self) -> dict[str, str]:
        return exports(self.up_output)

    @property
    def state(self) -> dict:
        return json.loads((self.dir / "state.json").read_text())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One stack for the module (started once, a few tests restart or wipe it)."""
    dev = DevStack(tmp_path_factory.mktemp("stack") / "dev stack")  # a space: hints must quote it
    try:
        yield dev.up()
    finally:
        if dev.down("--wipe").returncode != 0:  # never leave a stack running
            from pipeline.deploy.local_stack import stop
            stop(dev.dir)


def test_up_again_serves_the_data_of_the_last_session(stack):
    body, key = uuid.uuid4().bytes, "runs/r1/metrics.jsonl"
    first = stack.ensure_up().env
    s3_client(first).create_bucket(Bucket="moola")
    s3_client(first).put_object(Bucket="moola", Key=key, Body=body)
    assert stack.down().returncode == 0

    second = stack.up().env  # a second `stack up` on the same state dir
    assert second["AWS_ENDPOINT_URL"] != first["AWS_ENDPOINT_URL"]  # a new server, new ports
    assert s3_client(second).get_object(Bucket="moola", Key=key)["Body"].read() == body
    buckets = [b["Name"] for b in s3_client(second).list_buckets()["Buckets"]]
    assert buckets == ["moola"]  # the readiness probe leaves nothing behind


def test_wipe_leaves_what_the_stack_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "stack.log").write_text("old log")
    proc = down(tmp_path, "--wipe")
    assert proc.returncode == 0 and "no local stack was running" in proc.stdout, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_every_port_of_the_stack_is_on_loopback(stack):
    env, state = stack.ensure_up().env, stack.state
    gcs_port = int(state["ray_address"].rsplit(":", 1)[1])
    # A driver on the printed `train --address` runs a task, so a Ray worker listens too.
    driver = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys\n"
         "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
         "ip = ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote())\n"
         "print(ray.get_runtime_context().gcs_address, ip, flush=True)\n"
         "sys.stdin.read()\n", state["ray_address"]],
        env={**_bare_environ(), **env}, cwd=str(REPO), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        joined = driver.stdout.readline().split()
        assert joined == [state["ray_address"], "127.0.0.1"], joined
        head = RayHead(gcs_address="", dashboard_url="", token="", num_cpus=0, client_port=0,
                       temp_dir=Path(state["ray_temp_dir"]),
                       cluster_id=state.get("ray_cluster_id", ""))
        owner = psutil.Process(state["pid"])  # its tree holds weed; Ray's daemons detach from it
        found = listening([owner, *owner.children(recursive=True), *head.processes()])
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
    ports = {port for _, _, port in found}
    s3_port, jobs_port = (int(state[k].rsplit(":", 1)[1]) for k in ("s3_endpoint", "dashboard_url"))
    assert {gcs_port, s3_port, jobs_port} <= ports  # the check saw the stack's processes
    assert any(name.startswith("ray::") and "Agent" not in name for name, _, _ in found)  # a worker
    assert [f for f in found if not is_loopback(f[1])] == []
    assert state["exposed"] == []  # what `stack up` checked (and would have printed)


def test_exports_reach_the_job_server_and_hints_name_the_dir(stack, tmp_path):
    env, state, stack_dir = stack.ensure_up().env, stack.state, stack.dir
    assert env["RAY_ADDRESS"] == state["dashboard_url"]
    listed = run_cli("list", env={**BARE, **env})  # no --address
    assert listed.returncode == 0, listed.stderr
    quoted = shlex.quote(str(stack_dir))
    assert f"moola-pipeline stack down --dir {quoted}" in stack.up_output
    assert f"moola-pipeline train --address {state['ray_address']}" in stack.up_output
    again = run_cli("stack", "up", "--dir", stack_dir, env=BARE)
    assert_user_error(again, "already running", f"stack env --dir {quoted}",
                      f"stack down --dir {quoted}")
    other = tmp_path / "other"
    assert_user_error(run_cli("stack", "env", "--dir", other, env=BARE),
                      "no local stack is running", f"stack up --dir {other}")


def test_train_without_address_does_not_join_the_stack(stack):
    """RAY_ADDRESS is exported for the jobs commands; `train` must still start its own Ray."""
    env, state = stack.ensure_up().env, stack.state
    assert env.get("RAY_ADDRESS")
    code = ("import ray\n"
            "from pipeline.config import load_config\n"
            "from pipeline.train.trainer import init_ray\n"
            "init_ray(load_config(None, {'data': '/d', 'out': '/o', 'cluster.workers': 1}))\n"
            "print(ray.get_runtime_context().gcs_address)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**_bare_environ(), **env},
                          cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    joined = proc.stdout.strip().splitlines()[-1]
    assert joined and joined != state["ray_address"]


def test_a_stack_that_cannot_start_says_why_in_one_line(tmp_path):
    (tmp_path / "seaweed").write_text("not a directory")  # where the S3 data would live
    proc = run_cli("stack", "up", "--dir", tmp_path, env=BARE, timeout=120)
    assert_user_error(proc, "did not start", "seaweed", str(tmp_path / "stack.log"))
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no traceback, no log tail
    assert not (tmp_path / "state.json").exists()


def _bare_environ() -> dict:
    return {k: v for k, v in os.environ.items() if k not in BARE}


def test_the_exposure_check_tells_loopback_from_all_interfaces():
    from pipeline.devstack.sockets import exposed, listeners

    socks = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"),
                             (socket.AF_INET6, "::1"), (socket.AF_INET6, "::")):
            s = socket.socket(family)
            s.bind((host, 0))
            s.listen()
            socks.append((host, s.getsockname()[1], s))
        me = [psutil.Process()]
        ours = {s.getsockname()[1] for _, _, s in socks}
        assert {l.port for l in listeners(me)} >= ours
        assert sorted((l.ip, l.port) for l in exposed(me) if l.port in ours) == \
            sorted((h, p) for h, p, _ in socks if h in ("0.0.0.0", "::"))
    finally:
        for _, _, s in socks:
            s.close()


def test_down_wipe_deletes_the_data(stack):
    """Last in the file to save a restart (any test after it would start the stack again)."""
    env = stack.ensure_up().env
    s3_client(env).create_bucket(Bucket="wipe-me")
    s3_client(env).put_object(Bucket="wipe-me", Key="k", Body=b"v")
    assert any((stack.dir / "seaweed").rglob("*.dat"))
    wiped = stack.down("--wipe")
    assert wiped.returncode == 0 and "local stack stopped" in wiped.stdout, wiped.stderr
    assert not stack.dir.exists()  # the data, the keys and the logs
