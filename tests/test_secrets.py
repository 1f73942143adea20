"""Secrets never leak: with AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, RUNPOD_API_KEY and
RAY_AUTH_TOKEN set to marker values, a full run leaves no marker anywhere it wrote.

The markers are real credentials here, not decoys: our own SeaweedFS server is started with the
marker keys and our own Ray head with the marker token, so every step must actually use them.
The run: `data build` to S3, a local-mode `train` with OUT on S3 (checkpoints, config.yaml,
report), `report`, `submit` of a train job to the token-auth cluster (whose nodes carry the S3
keys, as a RunPod node would), `runpod up --dry-run`. Then every local file and every S3 object
is downloaded and grepped, with the commands' stdout/stderr, the job's logs and everything the
job server stored about the job (entrypoint, runtime_env, metadata).
"""

from __future__ import annotations

import os
import re
import secrets

import pytest

from pipeline.devstack.ray_head import start_ray_head
from pipeline.devstack.seaweed import start_seaweed
from tests.fixtures.cli import assert_user_error, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.s3]

MARK = secrets.token_hex(4)
S3_SECRET = f"MARKs3secret{MARK}x" * 2
S3_KEY_ID = f"MARKs3keyid{MARK}"
RUNPOD_KEY = f"MARKrunpod{MARK}key"
RAY_TOKEN = f"MARKraytoken{MARK}" * 3
MARKERS = (S3_SECRET, S3_KEY_ID, RUNPOD_KEY, RAY_TOKEN)
CONFIG = """model: {hidden: 8, head_width: 8}
train: {probe_every: 2}
alarms: {starve_share: 0.1, plateau_epochs: 3}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A SeaweedFS server keyed with the markers and a Ray head with the marker token whose
    processes carry the S3 keys; both stopped at the end."""
    server = start_seaweed(tmp_path_factory.mktemp("weed"), access_key=S3_KEY_ID,
                           secret_key=S3_SECRET)
    head = None
    try:
        head = start_ray_head(2, token=RAY_TOKEN, extra_env=server.env())
        yield server, head
    finally:
        if head is not None:
            head.stop()
        server.stop()


def leaks(data: bytes | str) -> list[str]:
    if isinstance(data, str):
        data = data.encode(errors="replace")
    return [m for m in MARKERS if m.encode() in data]


def test_no_marker_in_files_objects_logs_job_metadata_or_dry_run(stack, tmp_path):
    server, head = stack
    bucket = f"secrets-{MARK}"
    server.boto3_client().create_bucket(Bucket=bucket)
    env = {**server.env(), "RUNPOD_API_KEY": RUNPOD_KEY, "RAY_AUTH_TOKEN": RAY_TOKEN,
           "RAY_ADDRESS": None}
    local = tmp_path / "local"
    local.mkdir()
    (local / "run.yaml").write_text(CONFIG)
    shards, run = f"s3://{bucket}/shards", f"s3://{bucket}/runs/r1"
    outputs: list[tuple[str, str]] = []

    def cli(*args, timeout=300):
        proc = run_cli(*args, env=env, cwd=local, timeout=timeout)
        outputs.append((" ".join(map(str, args[:2])), proc.stdout + proc.stderr))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    cli("data", "build", "--out", shards, "--windows", "48", "--val-fraction", "0.25")
    cli("train", "--workers", "0", "--data", shards, "--out", run, "--config", local / "run.yaml",
        "--epochs", "2", "--batch-size", "8")
    cli("report", run, "--out", local / "report-copy.html")
    # a train job on the cluster: its nodes have the S3 keys; the submitter sends only the token
    job = cli("submit", "--address", head.dashboard_url, "--no-working-dir", "--follow", "--",
              "--workers", "0", "--data", shards, "--out", f"s3://{bucket}/runs/job",
              "--config", local / "run.yaml", "--epochs", "1", "--batch-size", "8", timeout=400)
    job_id = re.search(r"^job: (\S+)$", job.stdout, re.M).group(1)
    cli("logs", job_id, "--address", head.dashboard_url)
    cli("status", job_id, "--address", head.dashboard_url)
    dry = cli("runpod", "up", "--gpus", "1", "--gpu-type", "NVIDIA GeForce RTX 4090", "--dry-run")
    # the request names the secrets it sends, masked (the pod gets them from `up`'s environment)
    assert "Bearer ****" in dry.stdout
    assert 'key: "AWS_SECRET_ACCESS_KEY", value: "****"' in dry.stdout
    assert 'key: "RAY_AUTH_TOKEN", value: "****"' in dry.stdout

    # The run really used S3 and recorded what it should.
    client = server.boto3_client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.startswith("runs/r1/checkpoint_") for k in keys), keys
    assert any(k.startswith("runs/job/checkpoint_") for k in keys), keys
    assert {"shards/manifest.json", "runs/r1/config.yaml", "runs/r1/report.html",
            "runs/r1/metrics.jsonl", "runs/job/config.yaml"} <= set(keys)
    config_yaml = client.get_object(Bucket=bucket, Key="runs/r1/config.yaml")["Body"].read()
    assert b"starve_share: 0.1" in config_yaml   # the alarms section went through

    found = {}
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if leaks(body):
            found[f"s3://{bucket}/{key}"] = leaks(body)
    for dirpath, _, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                if leaks(f.read()):
                    found[path] = leaks(open(path, "rb").read())
    for what, text in outputs:
        if leaks(text):
            found[f"output of {what}"] = leaks(text)

    from ray.job_submission import JobSubmissionClient
    info = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers()).get_job_info(job_id)
    assert info.status == "SUCCEEDED"
    stored = repr(info.__dict__) + repr(info.runtime_env) + repr(info.metadata) + info.entrypoint
    if leaks(stored):
        found["job server record"] = leaks(stored)
    driver_logs = list(head.log_dir().glob(f"job-driver-{job_id}*"))  # the job's own log
    assert driver_logs, sorted(p.name for p in head.log_dir().iterdir())
    for log in driver_logs:
        if leaks(log.read_bytes()):
            found[str(log)] = leaks(log.read_bytes())
    # positive control: the markers are the live credentials (so the grep looks for real ones)
    assert S3_SECRET in (server.workdir / "s3-config.json").read_text()
    assert leaks(f"x{RAY_TOKEN}x") == [RAY_TOKEN]
    assert not found, f"markers leaked: {found}"


def test_wrong_keys_are_denied_by_the_server_and_reported(stack, tmp_path):
    server, _ = stack
    bucket = f"denied-{MARK}"
    server.boto3_client().create_bucket(Bucket=bucket)
    wrong = {**server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-" + MARK,
             "RAY_ADDRESS": None}
    out = tmp_path / "never"
    for args in (["data", "build", "--out", f"s3://{bucket}/shards", "--windows", "30"],
                 ["storage", "check", f"s3://{bucket}/probe"],
                 ["train", "--workers", "0", "--data", f"s3://{bucket}/shards", "--out", str(out)]):
        proc = run_cli(*args, env=wrong, timeout=120)
        assert_user_error(proc, f"s3://{bucket}", "access denied")
        assert "wrong-secret-" not in proc.stdout + proc.stderr and not leaks(proc.stderr)
    assert not out.exists()
    # nothing reached the bucket
    assert "Contents" not in server.boto3_client().list_objects_v2(Bucket=bucket)
    # an unknown key id is denied just the same
    proc = run_cli("data", "validate", f"s3://{bucket}/shards",
                   env={**wrong, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ACCESS_KEY_ID": "nobody"})
    assert_user_error(proc, "access denied")
