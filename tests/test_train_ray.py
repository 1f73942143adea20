"""`train` on the session's real Ray cluster: 2 DDP workers match 1 worker on the same global
batch (the reducer is exact, data order is seeded), also when the 2 workers run the CUDA-graph
schedule (replayed eagerly here: no GPU), and the record has every key."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.checkpoint import read_state
from pipeline.train.rundir import checkpoint_dirs, read_metrics
from tests.fixtures.cli import assert_user_error, run_cli
from tests.fixtures.ray_cluster import _get_head
from tests.test_train_local import RECORD_KEYS, TASKS, make_shards

pytestmark = pytest.mark.ray

# No dropout: each rank draws its own masks, so dropout would differ between 1 and 2 workers.
NO_DROPOUT = ("model:\n  hidden: 16\n  head_width: 16\n  input_dropout: 0.0\n"
              "  dense_dropout: 0.0\ntrain:\n  probe_every: 3\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _ray_heads):
    ray_cluster = _get_head(_ray_heads, "plain")  # the session cluster (module-scoped use)
    base = tmp_path_factory.mktemp("ray")
    shards = make_shards(base / "shards", n_train=40, n_val=12)
    cfg = base / "run.yaml"
    cfg.write_text(NO_DROPOUT)
    # The graphed schedule under DDP warms up 11 steps: with no probe steps, 2 epochs of 10
    # batches of 4 give 11 warm-up steps, then a capture and 8 more replays in epoch 2.
    graph_cfg = base / "graphed.yaml"
    graph_cfg.write_text(NO_DROPOUT.replace("probe_every: 3", "probe: false"))
    out = {}
    for name, workers, config, env in ((1, 1, cfg, {}), (2, 2, cfg, {}),
                                       ("graphed", 2, graph_cfg, {"MOOLA_GRAPH_REPLAY": "eager"})):
        out[name] = base / f"w{name}"
        proc = run_cli("train", "--address", ray_cluster.address, "--workers", str(workers),
                       "--data", shards, "--out", out[name], "--config", config,
                       "--epochs", "2", "--batch-size", "4", env=ray_cluster.env() | env,
                       timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("which", [2, "graphed"])
def test_two_workers_match_one_worker_on_the_same_global_batch(runs, which):
    one, two = read_metrics(str(runs[1])), read_metrics(str(runs[which]))
    assert [r["world_size"] for r in two] == [2, 2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [10, 20]
    assert [r["graphed_steps"] for r in two] == ([0, 9] if which == "graphed" else [0, 0])
    for a, b in zip(one, two):
        for split in ("train", "val"):
            assert b[split] == pytest.approx(a[split], rel=1e-4, abs=1e-6), split
        assert b["span"]["bars"] == a["span"]["bars"]          # every val bar scored once
        assert b["countdown"]["mae_bars"] == pytest.approx(a["countdown"]["mae_bars"], rel=1e-4)
        assert b["type"]["accuracy"] == pytest.approx(a["type"]["accuracy"])
    pa = read_state(f"{runs[1]}/{checkpoint_dirs(str(runs[1]))[-1]}")["model"]
    pb = read_state(f"{runs[which]}/{checkpoint_dirs(str(runs[which]))[-1]}")["model"]
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5), k


def test_ray_run_record_has_every_key_and_ray_checkpoints(runs):
    records = read_metrics(str(runs[2]))
    for r in records:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert set(r["val"]) == TASKS
        for task in TASKS:  # the task metrics, merged at the top level
            assert task in r
        assert r["span"]["f1"] is not None and r["pointer"]["hit3_start"] is not None
    names = checkpoint_dirs(str(runs[2]))
    assert names[-1] == "checkpoint_e0002_s00000020"
    files = set(p.name for p in (runs[2] / names[-1]).iterdir())
    assert {"state.pt", "meta.json", "rng-rank0.pt", "rng-rank1.pt"} <= files  # both ranks' parts
    assert (runs[2] / "checkpoint_manager_snapshot.json").exists()          # Ray's own state


def test_wrong_cluster_address_is_a_user_error(tmp_path):
    shards = make_shards(tmp_path / "s", n_train=8, n_val=4)
    proc = run_cli("train", "--address", "127.0.0.1:1", "--workers", "1", "--data", shards,
                   "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "4", timeout=120)
    assert_user_error(proc, "--address 127.0.0.1:1")
    assert not (tmp_path / "run").exists()


def test_wrong_token_is_a_user_error(tmp_path, ray_cluster):
    shards = make_shards(tmp_path / "s", n_train=8, n_val=4)
    env = {**ray_cluster.env(), "RAY_AUTH_TOKEN": "x" * 32}
    proc = run_cli("train", "--address", ray_cluster.address, "--workers", "1", "--data", shards,
                   "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "4", env=env,
                   timeout=180)
    assert_user_error(proc, f"--address {ray_cluster.address}", "RAY_AUTH_TOKEN")
    assert not (tmp_path / "run").exists()
