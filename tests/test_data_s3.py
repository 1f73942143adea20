"""Data commands and the loader against a real SeaweedFS S3 server on loopback."""

import numpy as np
import pytest

from pipeline import storage
from pipeline.data.loader import ShardLoader
from tests.fixtures.cli import run_cli

pytestmark = pytest.mark.s3


def test_fixture_gives_a_working_private_bucket(s3_env):
    uri = storage.join(s3_env.uri, "x", "hello.json")
    storage.write_json_atomic(uri, {"hello": 1})
    assert storage.read_json(uri) == {"hello": 1}
    assert s3_env.keys() == ["x/hello.json"]


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def test_synth_shard_validate_inspect_and_load_over_s3(s3_env, tmp_path):
    env = s3_env.env
    windows, shards = f"{s3_env.uri}/data/w", f"{s3_env.uri}/data/s"
    ok(run_cli("data", "synth", "--out", windows, "--windows", "50", "--seed", "0", env=env))
    proc = ok(run_cli("data", "shard", "--in", windows, "--out", shards, "--rows-per-shard", "16",
                      env=env))
    assert "train 40, val 10" in proc.stdout
    keys = s3_env.keys()
    assert "data/s/manifest.json" in keys and "data/s/train-00002.parquet" in keys
    assert not [k for k in keys if "tmp" in k]
    assert "ok" in ok(run_cli("data", "validate", shards, env=env)).stdout
    assert "train-00001.parquet" in ok(run_cli("data", "inspect", shards, env=env)).stdout

    # the same windows sharded locally give the same batches as the S3 shards
    local = str(tmp_path / "s")
    ok(run_cli("data", "shard", "--in", windows, "--out", local, "--rows-per-shard", "16", env=env))
    for rank in (0, 1):
        remote_loader = ShardLoader(shards, "train", rank=rank, world_size=2, batch_size=8, seed=4)
        local_loader = ShardLoader(local, "train", rank=rank, world_size=2, batch_size=8, seed=4)
        remote_batches, local_batches = list(remote_loader), list(local_loader)
        assert len(remote_batches) == len(local_batches) == 3
        for a, b in zip(remote_batches, local_batches):
            for key in a:
                np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_build_straight_to_s3(s3_env):
    out = f"{s3_env.uri}/built"
    ok(run_cli("data", "build", "--out", out, "--windows", "20", env=s3_env.env))
    loader = ShardLoader(out, "val", batch_size=100)
    assert loader.num_samples == 4 and len(loader) == 1
    assert sorted(next(iter(loader))["index"].tolist()) == [0, 1, 2, 3]
