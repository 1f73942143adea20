"""Faults broken on purpose with real processes (issue 7): a corrupt shard (disk and S3), two runs
on one out dir (one after the other and at the same moment), and a full disk while writing shards
and checkpoints. Worker kill and driver kill are in tests/test_resume.py; node loss in
tests/test_fault_node.py.

Tiny data (48 + 12 windows), a small model and Ray Train local mode (--workers 0) keep this file
fast; the data sets are module-scoped and copied where a test damages them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from pipeline.train.checkpoint import read_meta
from pipeline.train.rundir import checkpoint_dirs, read_metrics
from tests.fixtures.cli import REPO, assert_user_error, run_cli
from tests.test_train_local import make_shards

SMALL = "model:\n  hidden: 16\n  head_width: 16\ntrain:\n  probe_every: 4\n  keep_checkpoints: 50\n"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("faults") / "shards", n_train=48, n_val=12)


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "run.yaml"
    p.write_text(SMALL)
    return str(p)


def train_args(data, out, cfg, epochs=2):
    return ["train", "--workers", "0", "--data", data, "--out", out, "--config", cfg,
            "--epochs", str(epochs), "--batch-size", "8", "--seed", "3"]


def start(args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll `condition` until it holds, `proc` ends or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None) and not condition():
        time.sleep(0.05)


def assert_failed_clearly(proc: subprocess.Popen, err: str, *needles: str) -> None:
    assert proc.returncode != 0, err[-3000:]
    assert "Traceback" not in err, err[-4000:]
    for needle in needles:
        assert needle in err, err[-4000:]


def first_train_shard(data) -> str:
    import json
    manifest = json.loads(open(os.path.join(data, "manifest.json")).read())
    return next(s["path"] for s in manifest["shards"] if s["split"] == "train")


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# --- 5. a shard corrupted between runs -------------------------------------------------------

def test_corrupt_shard_on_disk_is_refused_before_out_is_written_and_rerun_works(
        shards, small_yaml, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    victim = data / first_train_shard(str(data))
    original = victim.read_bytes()
    flip_byte(victim, len(original) // 2)          # same size: only the sha256 can tell
    out = tmp_path / "run"
    proc = run_cli(*train_args(data, out, small_yaml), timeout=240)
    assert_user_error(proc, str(victim), "sha256", "does not match")
    assert not out.exists()                         # nothing written into OUT

    victim.write_bytes(original[:-100])             # truncated: refused by size
    proc = run_cli(*train_args(data, out, small_yaml), timeout=240)
    assert_user_error(proc, str(victim), "truncated")
    assert not out.exists()

    victim.write_bytes(original)                    # repaired: the same command now trains
    proc = run_cli(*train_args(data, out, small_yaml), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(str(out))] == [0, 1]


def test_corrupt_shard_in_s3_is_refused_before_out_is_written(shards, small_yaml, s3_bucket,
                                                               tmp_path):
    client = s3_bucket.server.boto3_client()
    for name in sorted(os.listdir(shards)):
        client.upload_file(os.path.join(shards, name), s3_bucket.name, f"data/{name}")
    key = f"data/{first_train_shard(shards)}"
    body = bytearray(client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(body))
    out = f"{s3_bucket.uri}/run"
    proc = run_cli(*train_args(f"{s3_bucket.uri}/data", out, small_yaml), env=s3_bucket.env,
                   timeout=240)
    assert_user_error(proc, f"{s3_bucket.uri}/{key}", "sha256", "does not match")
    assert not [k for k in s3_bucket.keys() if k.startswith("run/")]


# --- 7. two runs on one out dir --------------------------------------------------------------

def test_two_runs_on_one_out_dir_only_one_runs(shards, small_yaml, tmp_path):
    out = tmp_path / "run"
    args = train_args(shards, out, small_yaml, epochs=4)
    # Started at the same moment: both pass the "is OUT empty" check; the exclusive create of
    # config.yaml lets exactly one through.
    a, b = start(args), start(args)
    try:
        # A third, started while the winner is still training, is refused too.
        wait_until(lambda: checkpoint_dirs(str(out)))
        assert checkpoint_dirs(str(out)), "no run got going"
        assert any(p.poll() is None for p in (a, b)), "the winner ended before the third try"
        third = run_cli(*args, timeout=240)
        assert_user_error(third, str(out), "already holds a run")
        results = [(p, *p.communicate(timeout=240)) for p in (a, b)]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, [(p.returncode, e[-2000:]) for p, _, e in results]
    loser = next(e + o for p, o, e in results if p.returncode != 0)
    assert "already holds a run" in loser and "Traceback" not in loser
    # The winner's run is whole and alone: one record per epoch, no interleaving.
    assert [r["epoch"] for r in read_metrics(str(out))] == [0, 1, 2, 3]


# --- 6. disk full -----------------------------------------------------------------------------

@contextmanager
def tmpfs(path, size: str):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory) -> str:
    """Write a file until the disk is full; returns its path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return path


def test_disk_full_while_writing_shards_leaves_no_manifest(tmp_path):
    with tmpfs(tmp_path / "small", "2m") as mnt:
        out = mnt / "shards"
        proc = run_cli("data", "build", "--source", "synth", "--windows", "2000",
                       "--windows-out", tmp_path / "windows", "--out", out, timeout=240)
        assert_user_error(proc, "no space left on device", str(out))
        assert not (out / "manifest.json").exists()


def test_disk_full_while_writing_checkpoints_keeps_only_whole_ones_and_resume_works(
        shards, small_yaml, tmp_path):
    with tmpfs(tmp_path / "small", "8m") as mnt:
        out = mnt / "run"
        proc = start([*train_args(shards, out, small_yaml, epochs=3), "--checkpoint-every", "2"])
        try:
            wait_until(lambda: any((out / n / "meta.json").exists()
                                   for n in checkpoint_dirs(str(out))), proc)
            filler = fill(mnt)
            _, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert_failed_clearly(proc, err, "no space left on device")
        whole = [n for n in checkpoint_dirs(str(out)) if (out / n / "meta.json").exists()]
        assert whole
        os.remove(filler)
        proc = run_cli("train", "--out", out, "--resume", timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [r["epoch"] for r in read_metrics(str(out))] == [0, 1, 2]
        assert read_meta(str(out / checkpoint_dirs(str(out))[-1]))["step"] == 3 * 6


# --- 3. the S3 server stopped during checkpoint uploads, then started again --------------------

def restart(server) -> None:
    """Start the stopped `weed` again with the same command line: same ports, same data dir."""
    from pipeline.devstack.seaweed import _die_with_parent
    log = open(server.log_path, "ab")
    server.process = subprocess.Popen(server.process.args, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=str(server.workdir),
                                      start_new_session=True, preexec_fn=_die_with_parent)
    log.close()
    # Not seaweed._wait_ready: its probe bucket exists now, and create_bucket says so.
    client, deadline = server.boto3_client(), time.time() + 60
    while True:
        assert server.alive(), server.log_path.read_text(errors="replace")[-2000:]
        try:
            client.put_object(Bucket="faults", Key="ready-probe", Body=b"ok")
            client.delete_object(Bucket="faults", Key="ready-probe")
            return
        except Exception:
            assert time.time() < deadline, "SeaweedFS did not come back"
            time.sleep(0.3)


@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS server of this test's own, since the test stops it (the session one stays)."""
    from pipeline.devstack.seaweed import start_seaweed
    server = start_seaweed(tmp_path / "seaweed")
    try:
        server.boto3_client().create_bucket(Bucket="faults")
        yield server
    finally:
        server.stop()


def test_s3_down_during_checkpoints_fails_clearly_and_resume_skips_partial_checkpoints(
        shards, small_yaml, own_s3):
    out = "s3://faults/run"
    env = own_s3.env()
    client = own_s3.boto3_client()

    def keys():
        pages = client.get_paginator("list_objects_v2").paginate(Bucket="faults", Prefix="run/")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    proc = start([*train_args(shards, out, small_yaml, epochs=3), "--checkpoint-every", "1"], env)
    try:
        wait_until(lambda: any(k.endswith("/meta.json") for k in keys()), proc)
        own_s3.stop()                                  # mid-run: checkpoints every step
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_failed_clearly(proc, err, "cannot reach the S3 endpoint", out)

    restart(own_s3)
    whole = sorted({k.split("/")[1] for k in keys() if k.endswith("/meta.json")})
    assert whole
    # A checkpoint cut short (files but no meta.json, newer than every whole one) must never be
    # chosen for resume: plant one as the S3 outage could leave it.
    client.put_object(Bucket="faults", Key="run/checkpoint_e0002_s00000099/state.pt",
                      Body=b"half an upload")
    proc = run_cli("train", "--out", out, "--resume", env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in client.get_object(
        Bucket="faults", Key="run/metrics.jsonl")["Body"].read().decode().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["step"] == 3 * 6
