"""`submit`, `status`, `logs`, `stop`, `list` against a real token-auth `ray start --head` cluster."""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from pipeline.devstack.ray_head import free_ports
from tests.fixtures.cli import assert_user_error, run_cli

pytestmark = pytest.mark.ray

SECRET = "MARKER-secret-do-not-ship-7f3a"
KEY_ID = "MARKER-keyid-4b1c"


def _cli(cluster, *args, env=None, timeout=120):
    full_env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID,
                "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "RAY_ADDRESS": None, **cluster.env()}
    full_env.update(env or {})
    return run_cli(*args, env=full_env, timeout=timeout)


def _python(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


def _job_id(proc) -> str:
    match = re.search(r"^job: (\S+)$", proc.stdout, re.M)
    assert match, proc.stdout + proc.stderr
    return match.group(1)


def _ray_client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers())


def test_submit_follow_status_logs_list_and_no_credential_shipped(ray_cluster):
    code = ("import os, pipeline; print('hello-from-job', os.environ.get('AWS_ENDPOINT_URL')); "
            "print('shipped-code', pipeline.__file__.startswith(os.getcwd()), "
            "os.path.isfile('pipeline/jobs.py'), os.path.isdir('.venv'))")
    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--follow",
                "--entrypoint", _python(code))
    assert proc.returncode == 0, proc.stderr
    job_id = _job_id(proc)
    # the job ran where the code shipped, with the forwarded (non-secret) endpoint
    assert "hello-from-job http://127.0.0.1:9" in proc.stdout
    assert "shipped-code True True False" in proc.stdout  # the working dir's code, not the venv
    assert "SUCCEEDED" in proc.stderr

    status = _cli(ray_cluster, "status", job_id, "--address", ray_cluster.dashboard_url)
    assert status.returncode == 0, status.stderr
    assert f"{job_id}: SUCCEEDED" in status.stdout

    logs = _cli(ray_cluster, "logs", job_id, "--address", ray_cluster.dashboard_url)
    assert logs.returncode == 0 and "hello-from-job" in logs.stdout

    listed = _cli(ray_cluster, "list", "--address", ray_cluster.dashboard_url)
    assert listed.returncode == 0 and job_id in listed.stdout

    # everything the job server stored about the job: no credential, but the code and endpoint
    info = _ray_client(ray_cluster).get_job_info(job_id)
    stored = repr(info.__dict__)
    assert SECRET not in stored and KEY_ID not in stored and ray_cluster.token not in stored
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "working_dir" in info.runtime_env


def test_submit_train_builds_the_train_entrypoint_and_records_the_run(ray_cluster, tmp_path):
    # No `train` reaches the cluster here: the job is stopped before it matters; what is checked
    # is what submit sends (entrypoint, metadata, env) and what it prints.
    out = str(tmp_path / "run1")
    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--no-working-dir",
                "--env", "MOOLA_TEST_FLAG=1", "--", "--data", "/nowhere", "--out", out, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    job_id = _job_id(proc)
    assert f"run: {out}" in proc.stdout
    info = _ray_client(ray_cluster).get_job_info(job_id)
    assert info.entrypoint == f"moola-pipeline train --data /nowhere --out {out} --epochs 1 --address auto"
    assert info.metadata["moola_run_uri"] == out
    assert info.runtime_env["env_vars"]["MOOLA_TEST_FLAG"] == "1"
    _cli(ray_cluster, "stop", job_id, "--address", ray_cluster.dashboard_url)


def test_submit_a_real_train_run_to_the_token_auth_cluster(ray_cluster, tmp_path):
    import itertools
    import json

    from pipeline.data.shards import random_chunks, write_shard_set

    data = str(tmp_path / "shards")
    write_shard_set(data, [f"f{i}" for i in range(12)], itertools.chain(
        random_chunks(16, split="train", seed=0), random_chunks(8, split="val", seed=1)))
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  hidden: 16\n  head_width: 16\n")
    out = tmp_path / "run"
    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--follow", "--",
                "--data", data, "--out", str(out), "--config", str(config), "--workers", "0",
                "--epochs", "1", "--batch-size", "8", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"run: {out}" in proc.stdout and "SUCCEEDED" in proc.stderr
    status = _cli(ray_cluster, "status", _job_id(proc), "--address", ray_cluster.dashboard_url)
    assert status.returncode == 0 and f"run: {out}" in status.stdout, status.stdout + status.stderr
    # how far it got, from its metrics.jsonl (record epoch 0 is the first of 1)
    assert "progress: epoch 1 of 1 done" in status.stdout, status.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 0
    assert set(records[0]["span"]) >= {"f1", "window_f1", "prob_separation"}
    assert records[0]["pointer"]["windows"] == 8  # every val window scored once
    # nothing the job wrote holds the submitter's credentials
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_failed_job_is_reported_with_non_zero_exit(ray_cluster):
    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--follow",
                "--no-working-dir", "--entrypoint", _python("import sys; print('about to fail'); sys.exit(3)"))
    assert_user_error(proc, "failed", "exit code 3", "moola-pipeline logs")
    job_id = _job_id(proc)
    assert "about to fail" in proc.stdout
    status = _cli(ray_cluster, "status", job_id, "--address", ray_cluster.dashboard_url)
    assert_user_error(status, f"job {job_id} failed")
    # one line, not the job's output again
    assert [line for line in status.stderr.splitlines() if line.strip()] == \
        [line for line in status.stderr.splitlines() if line.startswith("error: ")]
    assert "about to fail" not in status.stderr


def test_a_failed_train_job_is_reported_with_its_own_error_line(ray_cluster, tmp_path):
    # a real `train` on the cluster, refused by its preflight: the user needs its words (what to
    # change), not Ray's "exit code 2"
    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--follow", "--",
                "--data", str(tmp_path / "no-shards"), "--out", str(tmp_path / "run"),
                "--workers", "0", "--epochs", "1", timeout=240)
    job_id = _job_id(proc)
    assert_user_error(proc, f"job {job_id} failed: --data {tmp_path / 'no-shards'}: not found",
                      "moola-pipeline data build")
    status = _cli(ray_cluster, "status", job_id, "--address", ray_cluster.dashboard_url)
    assert_user_error(status, f"job {job_id} failed: --data {tmp_path / 'no-shards'}: not found, so no "
                              "shard set here", f"`moola-pipeline logs {job_id}`")
    assert "exit code" not in status.stderr and "error: error:" not in status.stderr
    assert [line for line in status.stderr.splitlines() if line.strip()] == \
        [line for line in status.stderr.splitlines() if line.startswith("error: ")]


def test_list_shows_the_progress_of_a_running_jobs_run(ray_cluster, tmp_path):
    import shutil
    from pathlib import Path

    from pipeline.jobs import METADATA_RUN_URI, JobsClient

    run = tmp_path / "run"  # a run dir of 8 recorded epochs out of the 8 its config asks for
    shutil.copytree(Path(__file__).parent / "data" / "recorded_run", run)
    client = JobsClient(ray_cluster.dashboard_url, ray_cluster.token)
    job_id = client.submit(_python("import time; time.sleep(300)"),
                           metadata={METADATA_RUN_URI: str(run)})
    try:
        assert client.wait(job_id, timeout_s=0).status in ("PENDING", "RUNNING")
        listed = _cli(ray_cluster, "list", "--address", ray_cluster.dashboard_url)
        assert listed.returncode == 0, listed.stderr
        (line,) = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
        assert line.endswith(f"{run} (epoch 8 of 8 done)"), line
        status = _cli(ray_cluster, "status", job_id, "--address", ray_cluster.dashboard_url)
        assert "progress: epoch 8 of 8 done" in status.stdout, status.stdout
    finally:
        client.stop(job_id)


def test_stop_a_running_job_and_refuse_a_reused_job_id(ray_cluster):
    import uuid

    job_id = f"moola-test-{uuid.uuid4().hex[:8]}"
    sleeper = _python("import time; print('started', flush=True); time.sleep(300)")
    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--no-working-dir",
                "--job-id", job_id, "--entrypoint", sleeper)
    assert _job_id(proc) == job_id
    again = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--no-working-dir",
                 "--job-id", job_id, "--entrypoint", sleeper)
    assert_user_error(again, f"--job-id {job_id}", "already exists")
    stopped = _cli(ray_cluster, "stop", job_id, "--address", ray_cluster.dashboard_url)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{job_id}: STOPPED" in stopped.stdout
    status = _cli(ray_cluster, "status", job_id, "--address", ray_cluster.dashboard_url)
    assert f"{job_id}: STOPPED" in status.stdout


def test_wrong_or_missing_token_is_refused_and_cluster_keeps_running(ray_cluster):
    wrong = _cli(ray_cluster, "list", "--address", ray_cluster.dashboard_url, "--token", "not-the-token")
    assert_user_error(wrong, "refused the auth token", ray_cluster.dashboard_url)
    wrong_env = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url,
                     "--entrypoint", "echo hi", env={"RAY_AUTH_TOKEN": "also-wrong"})
    assert_user_error(wrong_env, "refused the auth token")
    missing = _cli(ray_cluster, "list", "--address", ray_cluster.dashboard_url,
                   env={"RAY_AUTH_TOKEN": None, "RAY_AUTH_MODE": None})
    assert_user_error(missing, "requires an auth token", "RAY_AUTH_TOKEN")
    assert "not-the-token" not in wrong.stderr  # the token is not echoed back
    ok = _cli(ray_cluster, "list", "--address", ray_cluster.dashboard_url)
    assert ok.returncode == 0, ok.stderr


def test_unreachable_address_and_unknown_job(ray_cluster):
    (port,) = free_ports(1)
    proc = _cli(ray_cluster, "status", "raysubmit_x", "--address", f"127.0.0.1:{port}")
    assert_user_error(proc, "cannot reach the Ray job server", f"http://127.0.0.1:{port}")
    proc = _cli(ray_cluster, "list", env={"RAY_ADDRESS": None})
    assert_user_error(proc, "--address")
    for command in ("status", "stop"):
        proc = _cli(ray_cluster, command, "raysubmit_doesnotexist", "--address", ray_cluster.dashboard_url)
        assert_user_error(proc, "no job 'raysubmit_doesnotexist'")
    proc = _cli(ray_cluster, "logs", "--follow", "raysubmit_doesnotexist", "--address", ray_cluster.dashboard_url)
    assert_user_error(proc, "no job 'raysubmit_doesnotexist'")


def test_address_from_ray_address_env(ray_cluster):
    proc = _cli(ray_cluster, "list", env={"RAY_ADDRESS": ray_cluster.dashboard_url})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--env", f"AWS_SECRET_ACCESS_KEY={SECRET}", "--", "--out", "/tmp/r"], "--env AWS_SECRET_ACCESS_KEY"),
    (["--", "--out", "/tmp/r", "--note", SECRET], "AWS_SECRET_ACCESS_KEY"),
    (["--", "--data", "/d"], "--out"),
    (["--", "--out", "runs/r1"], "--out runs/r1"),
    (["--env", "NOEQUALS", "--", "--out", "/tmp/r"], "--env 'NOEQUALS'"),
])
def test_bad_submit_input_is_refused_before_anything_is_sent(args, needle):
    # an unreachable address: these must fail on the input, before any connection
    (port,) = free_ports(1)
    proc = run_cli("submit", "--address", f"127.0.0.1:{port}", *args,
                   env={"AWS_SECRET_ACCESS_KEY": SECRET})
    assert_user_error(proc, needle)
    assert SECRET not in proc.stderr


class _Proxy:
    """A TCP forwarder to the job server that the test can cut, like a dropped tunnel."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self):
        import socket

        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def test_lost_connection_while_following_is_reported(ray_cluster):
    import subprocess

    proc = _cli(ray_cluster, "submit", "--address", ray_cluster.dashboard_url, "--no-working-dir",
                "--entrypoint", _python("import time\nfor i in range(300): print('tick', i, flush=True); time.sleep(0.2)"))
    job_id = _job_id(proc)
    proxy = _Proxy(int(ray_cluster.dashboard_url.rsplit(":", 1)[1]))
    env = {**__import__("os").environ, **ray_cluster.env(), "PYTHONUNBUFFERED": "1"}
    follower = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "logs", job_id, "--follow", "--address",
         f"http://127.0.0.1:{proxy.port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env)
    try:
        first = follower.stdout.readline()  # the stream is flowing through the proxy
        assert first.strip(), follower.stderr.read()
        proxy.cut()
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    done = subprocess.CompletedProcess(follower.args, follower.returncode, first + out, err)
    assert_user_error(done, "lost the connection", job_id)
    # the job itself is unaffected
    status = _cli(ray_cluster, "status", job_id, "--address", ray_cluster.dashboard_url)
    assert f"{job_id}: RUNNING" in status.stdout
    _cli(ray_cluster, "stop", job_id, "--address", ray_cluster.dashboard_url)


def test_a_second_head_coexists_and_stopping_it_leaves_the_first_running(ray_cluster):
    from pipeline.devstack.ray_head import start_ray_head

    second = start_ray_head(num_cpus=1)
    try:
        assert second.dashboard_url != ray_cluster.dashboard_url
        assert second.address != ray_cluster.address
        ok = _cli(ray_cluster, "list", "--address", second.dashboard_url, env=second.env())
        assert ok.returncode == 0, ok.stderr
        mine = {p.pid for p in second.processes()}
        assert mine and not mine & {p.pid for p in ray_cluster.processes()}
    finally:
        second.stop()
    assert not second.processes() and not second.temp_dir.exists()
    assert ray_cluster.processes()
    still = _cli(ray_cluster, "list", "--address", ray_cluster.dashboard_url)
    assert still.returncode == 0, still.stderr


@pytest.mark.s3
def test_job_on_a_cluster_with_node_credentials_writes_to_s3_without_shipping_them(ray_s3_cluster, s3_bucket):
    # The submitter has no AWS keys at all; the cluster's nodes have their own (as on RunPod).
    uri = f"{s3_bucket.uri}/from-job.txt"
    code = f"from pipeline import storage; storage.write_bytes_atomic({uri!r}, b'written-by-job')"
    env = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
           "AWS_ENDPOINT_URL": s3_bucket.server.endpoint, **ray_s3_cluster.env()}
    proc = run_cli("submit", "--address", ray_s3_cluster.dashboard_url, "--follow",
                   "--entrypoint", _python(code), env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    body = s3_bucket.server.boto3_client().get_object(Bucket=s3_bucket.name, Key="from-job.txt")
    assert body["Body"].read() == b"written-by-job"
    info = _ray_client(ray_s3_cluster).get_job_info(_job_id(proc))
    assert s3_bucket.server.secret_key not in repr(info.__dict__)
