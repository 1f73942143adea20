"""Bad input on the shard side: one clear error naming the file, exit != 0, no traceback,
nothing written."""

import os
import shutil

import pytest

from pipeline.data.loader import ShardLoader
from pipeline.devstack.seaweed import free_ports
from pipeline.errors import UserError
from tests.fixtures.cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A synthetic windows data set and its shard set (read-only templates: copy before harm)."""
    root = tmp_path_factory.mktemp("bad")
    windows, shards = str(root / "w"), str(root / "s")
    assert run_cli("data", "synth", "--out", windows, "--windows", "30").returncode == 0
    assert run_cli("data", "shard", "--in", windows, "--out", shards).returncode == 0
    return windows, shards


def copy(src, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def listing(path):
    return sorted(os.listdir(path)) if os.path.exists(path) else None


def test_shard_with_a_sha256_that_does_not_match_the_manifest(dataset, tmp_path):
    shards = copy(dataset[1], tmp_path, "s")
    target = os.path.join(shards, "train-00000.parquet")
    with open(target, "r+b") as f:  # same size, one byte changed inside the feature data
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = listing(shards)
    assert_user_error(run_cli("data", "validate", shards), "train-00000.parquet", "sha256",
                      "does not match")
    with pytest.raises(UserError, match="train-00000.parquet: sha256 .* does not match"):
        ShardLoader(shards, "train")
    assert listing(shards) == before


def test_truncated_shard(dataset, tmp_path):
    shards = copy(dataset[1], tmp_path, "s")
    target = os.path.join(shards, "val-00000.parquet")
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.truncate(size // 3)
    assert_user_error(run_cli("data", "validate", shards), "val-00000.parquet", "truncated")
    with pytest.raises(UserError, match="val-00000.parquet: .*truncated"):
        ShardLoader(shards, "val")


def test_truncated_windows_parquet_input(dataset, tmp_path):
    windows = copy(dataset[0], tmp_path, "w")
    target = os.path.join(windows, "windows.parquet")
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) - 100)
    out = str(tmp_path / "out")
    assert_user_error(run_cli("data", "shard", "--in", windows, "--out", out),
                      "windows.parquet", "Parquet")
    assert listing(out) in (None, [])


def test_dataset_without_a_manifest(dataset, tmp_path):
    shards = copy(dataset[1], tmp_path, "s")
    os.remove(os.path.join(shards, "manifest.json"))
    for command in ("validate", "inspect"):
        assert_user_error(run_cli("data", command, shards), "manifest.json", "not a complete")
    with pytest.raises(UserError, match="manifest.json: missing"):
        ShardLoader(shards, "train")
    empty = str(tmp_path / "nothing")
    assert_user_error(run_cli("data", "validate", empty), empty, "no shard set")


@pytest.mark.s3
def test_s3_uri_with_wrong_credentials(dataset, s3_bucket):
    env = dict(s3_bucket.env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    out = f"{s3_bucket.uri}/shards"
    proc = run_cli("data", "shard", "--in", dataset[0], "--out", out, env=env)
    assert_user_error(proc, s3_bucket.uri, "access denied", "AWS_SECRET_ACCESS_KEY")
    assert "not-the-secret" not in proc.stderr + proc.stdout
    assert s3_bucket.keys() == []


@pytest.mark.s3
def test_unreachable_s3_endpoint(dataset, tmp_path):
    port = free_ports(1)[0]  # nothing listens here
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL_S3": None,
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1",
           "MOOLA_S3_MAX_ATTEMPTS": "1", "MOOLA_S3_CONNECT_TIMEOUT_S": "2"}
    proc = run_cli("data", "shard", "--in", dataset[0], "--out", "s3://bucket/shards", env=env,
                   timeout=120)
    assert_user_error(proc, "s3://bucket", "cannot reach", f"127.0.0.1:{port}")
    assert_user_error(run_cli("data", "validate", "s3://bucket/shards", env=env, timeout=120),
                      "s3://bucket", "cannot reach")


def test_s3_uri_without_a_bucket(dataset, tmp_path):
    assert_user_error(run_cli("data", "shard", "--in", dataset[0], "--out", "s3://"),
                      "s3://", "needs a bucket")
    assert_user_error(run_cli("data", "validate", "s3:///shards"), "s3:///shards", "needs a bucket")
