"""`moola-pipeline train --workers 0` (Ray Train local mode): the run directory, the metrics
record, determinism, refusals, and an exact mid-epoch `--resume`. No Ray cluster needed."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch

from pipeline.data.shards import random_chunks, write_shard_set
from pipeline.train.checkpoint import read_meta, read_state
from pipeline.train.rundir import checkpoint_dirs, read_metrics
from tests.fixtures.cli import assert_user_error, run_cli

SMALL_MODEL = "model:\n  hidden: 16\n  head_width: 16\n"

# Every key issue 4 asks for in each metrics.jsonl record.
RECORD_KEYS = {"epoch", "step", "world_size", "train", "val", "weights", "log_vars", "grad_norm",
               "grad_ratio_countdown_pointer", "samples_per_s", "epoch_time_s", "lr"}
TASKS = {"type", "pointer", "span", "countdown"}


def make_shards(path, n_train=48, n_val=12, seed=0) -> str:
    names = [f"f{i}" for i in range(12)]
    write_shard_set(str(path), names, itertools.chain(
        random_chunks(n_train, split="train", seed=seed),
        random_chunks(n_val, split="val", seed=seed + 1)))
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "d")


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "run.yaml"
    p.write_text(SMALL_MODEL + "train:\n  probe_every: 2\n")
    return str(p)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shards, small_yaml):
    """One finished 2-epoch local run (seed 0), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("base") / "run"
    proc = run_cli("train", "--workers", "0", "--data", shards, "--out", out, "--config",
                   small_yaml, "--epochs", "2", "--batch-size", "8", "--seed", "0",
                   env={"AWS_SECRET_ACCESS_KEY": "do-not-store-me-123"}, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def train(*args, timeout=240):
    return run_cli("train", "--workers", "0", *args, timeout=timeout)


def final_params(out) -> dict:
    return read_state(f"{out}/{checkpoint_dirs(str(out))[-1]}")["model"]


def test_local_run_writes_run_dir_and_every_metric_key(base_run):
    out, proc = base_run
    records = read_metrics(str(out))
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert set(r["train"]) == TASKS and set(r["val"]) == TASKS
        assert set(r["weights"]) == TASKS and abs(sum(r["weights"].values()) - 1) < 1e-6
        assert set(r["log_vars"]) == TASKS           # uncertainty weighting has them
        assert set(r["grad_norm"]) == TASKS
        assert r["world_size"] == 1 and r["samples_per_s"] > 0
    assert records[1]["step"] == 2 * 6             # 48 samples / batch 8 per epoch
    # Resolved config, the manifest copy, checkpoints with full state, predictions of the best.
    cfg_text = (out / "config.yaml").read_text()
    assert "epochs: 2" in cfg_text and "do-not-store-me-123" not in cfg_text
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"] == 48
    names = checkpoint_dirs(str(out))
    assert names[-1] == "checkpoint_e0002_s00000012"
    state = read_state(str(out / names[-1]))
    assert {"model", "multitask", "optimizer", "scheduler", "loader", "probe",
            "config_hash", "manifest_hash"} <= set(state)
    assert state["loader"]["epoch"] == 2 and state["loader"]["batches_consumed"] == 0
    preds = dict(__import__("numpy").load(out / "best_val_predictions.npz"))
    assert preds["span_prob"].shape == (12, 105) and sorted(preds["index"]) == list(range(12))
    assert "best checkpoint" in proc.stdout and str(out) in proc.stdout
    assert (out / "workers" / "rank0.json").exists()


def test_same_seed_same_metrics_other_seed_differs(tmp_path, shards, small_yaml, base_run):
    runs = {"base": [(r["train"], r["val"]) for r in read_metrics(str(base_run[0]))]}
    for name, seed in (("same", 0), ("other", 4)):
        proc = train("--data", shards, "--out", tmp_path / name, "--config", small_yaml,
                     "--epochs", "2", "--batch-size", "8", "--seed", str(seed))
        assert proc.returncode == 0, proc.stderr
        runs[name] = [(r["train"], r["val"]) for r in read_metrics(str(tmp_path / name))]
    assert runs["same"] == runs["base"]
    assert runs["other"] != runs["base"]


def test_reusing_out_dir_without_resume_is_refused(shards, small_yaml, base_run):
    out = base_run[0]
    before = (out / "metrics.jsonl").read_text()
    proc = train("--data", shards, "--out", out, "--config", small_yaml, "--epochs", "1")
    assert_user_error(proc, str(out), "--resume")
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_without_a_run_is_refused(tmp_path):
    assert_user_error(train("--out", tmp_path / "none", "--resume"), "--resume", "config.yaml")


def test_bad_flags_are_user_errors_and_write_nothing(tmp_path, shards):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", shards, "--out", out, "--workers", "3",
                   "--batch-size", "16")
    assert_user_error(proc, "--batch-size 16", "--workers 3")
    assert not out.exists()
    assert_user_error(train("--data", tmp_path / "missing", "--out", out), "missing")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert_user_error(train("--data", shards, "--out", out, "--config", bad), "train.epochz",
                      "bad.yaml")
    assert_user_error(train("--data", shards, "--out", out, "--balance", "nope"), "nope")


def test_resume_with_changed_optimisation_is_refused(base_run):
    out = base_run[0]
    assert_user_error(train("--out", out, "--resume", "--lr", "0.5", "--epochs", "2"),
                      "train.lr")


def test_resume_mid_epoch_continues_at_the_right_epoch_and_batch(tmp_path, shards, small_yaml):
    """A run stopped after a mid-epoch checkpoint continues from exactly that batch."""
    common = ["--data", shards, "--batch-size", "8", "--checkpoint-every", "4", "--epochs", "3"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert train(*common, "--out", full, "--config", small_yaml).returncode == 0
    # The stopped run: 3 epochs of 6 steps, checkpoints at steps 4, 6(end), 8, 12(end), ...
    # Cut it back to its checkpoint at step 8 (epoch 1, batch 2), as if it had died there.
    yaml = tmp_path / "keep.yaml"
    yaml.write_text(SMALL_MODEL + "train:\n  probe_every: 2\n  keep_checkpoints: 20\n")
    proc = train(*common, "--out", stopped, "--config", yaml)
    assert proc.returncode == 0, proc.stderr
    names = checkpoint_dirs(str(stopped))
    cut = names.index("checkpoint_e0001_s00000008")
    meta = read_meta(str(stopped / names[cut]))
    assert meta["loader"]["epoch"] == 1 and meta["loader"]["batches_consumed"] == 2
    for name in names[cut + 1:]:
        shutil.rmtree(stopped / name)
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # epochs 0, 1 were done

    proc = train("--out", stopped, "--resume")
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(str(stopped))
    assert [r["epoch"] for r in records] == [0, 1, 2]  # epoch 1's stale line was replaced
    expect = read_metrics(str(full))
    for got, want in zip(records, expect):
        assert got["step"] == want["step"]
        assert got["train"] == pytest.approx(want["train"], rel=1e-6)
        assert got["val"] == pytest.approx(want["val"], rel=1e-6)
    a, b = final_params(stopped), final_params(full)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.s3
def test_local_mode_run_and_resume_on_s3(s3_env, shards, small_yaml):
    """OUT on a real S3 server: records, config and checkpoints land there; --resume reads them."""
    out = f"{s3_env.uri}/runs/r1"
    proc = run_cli("train", "--workers", "0", "--data", shards, "--out", out, "--config",
                   small_yaml, "--epochs", "1", "--batch-size", "8", env=s3_env.env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = s3_env.keys()
    assert "runs/r1/config.yaml" in keys and "runs/r1/metrics.jsonl" in keys
    assert "runs/r1/checkpoint_e0001_s00000006/state.pt" in keys
    proc = run_cli("train", "--out", out, "--resume", "--epochs", "2", env=s3_env.env,
                   timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["step"] == 12
    assert "runs/r1/checkpoint_e0002_s00000012/state.pt" in s3_env.keys()


def test_early_stopping_keeps_the_best_checkpoint_and_says_where(tmp_path, shards):
    # lr is constant, so with mode max it never improves after epoch 0: patience 2 stops the
    # run after epoch 2 of 10, and the best checkpoint is the one written after epoch 0.
    cfg = tmp_path / "es.yaml"
    cfg.write_text(SMALL_MODEL + "train:\n  best_metric: lr\n  best_mode: max\n"
                   "  early_stop_patience: 2\n  keep_checkpoints: 1\n")
    out = tmp_path / "run"
    proc = train("--data", shards, "--out", out, "--config", cfg, "--epochs", "10",
                 "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(str(out))
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(r["best_epoch"] == 0 for r in records)
    assert "early stopping" in proc.stdout + proc.stderr
    best = out / "checkpoint_e0001_s00000006"
    assert best.is_dir(), checkpoint_dirs(str(out))      # kept though keep_checkpoints is 1
    assert f"best checkpoint (epoch 1): {best}" in proc.stdout
    assert str(out / "report.html") in proc.stdout


def test_unknown_best_metric_is_refused_before_training(tmp_path, shards):
    out = tmp_path / "run"
    proc = train("--data", shards, "--out", out, "--best-metric", "span.f2")
    assert_user_error(proc, "span.f2", "span.f1", "--best-metric")
    assert not out.exists()


def test_probe_off_trains_exactly_the_same_and_records_no_gradient_figures(tmp_path, shards,
                                                                           base_run):
    """`train.probe: false` (benchmarks) only drops the diagnostics: the probe, when on, reads
    gradients without disturbing the step, so the losses are identical."""
    cfg = tmp_path / "noprobe.yaml"
    cfg.write_text(SMALL_MODEL + "train:\n  probe: false\n")
    proc = train("--data", shards, "--out", tmp_path / "run", "--config", cfg,
                 "--epochs", "2", "--batch-size", "8", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(str(tmp_path / "run"))
    base = read_metrics(str(base_run[0]))
    assert [r["train"] for r in records] == [r["train"] for r in base]
    assert all(r["grad_norm"] is None and r["grad_ratio_countdown_pointer"] is None
               for r in records)
    assert all(r["grad_norm"] for r in base)


@pytest.mark.parametrize("unlabeled", ["train", "val"])
def test_a_split_without_labeled_windows_is_refused_before_training(tmp_path, unlabeled):
    # Training on it would "succeed" with every loss 0 and a green report.
    names = [f"f{i}" for i in range(12)]
    frac = {"train": 1.0, "val": 1.0, unlabeled: 0.0}
    data = tmp_path / "bars"
    write_shard_set(str(data), names, itertools.chain(
        random_chunks(48, split="train", seed=0, labeled_fraction=frac["train"]),
        random_chunks(12, split="val", seed=1, labeled_fraction=frac["val"])))
    out = tmp_path / "run"
    proc = train("--data", data, "--out", out, "--epochs", "1", "--batch-size", "8")
    assert_user_error(proc, str(data), f"the {unlabeled} split has no labeled window",
                      "moola-pipeline pretrain")
    assert not out.exists()  # refused before anything was written


def test_a_split_with_one_labeled_window_is_accepted_by_the_preflight(tmp_path):
    from pipeline.data.label_counts import label_counts
    from pipeline.data.manifest import load_manifest
    names = [f"f{i}" for i in range(12)]
    data = tmp_path / "few"
    write_shard_set(str(data), names, itertools.chain(
        random_chunks(40, split="train", seed=0, labeled_fraction=0.0),
        random_chunks(1, split="train", seed=2, labeled_fraction=1.0)))
    manifest = load_manifest(str(data))
    assert label_counts(str(data), manifest)["train"]["labeled"] == 1
    assert "val" not in label_counts(str(data), manifest)
    del manifest["label_counts"]  # a shard set from before the manifest counted labels
    assert label_counts(str(data), manifest)["train"]["labeled"] == 1
