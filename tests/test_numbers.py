"""Issue 16: the loss, metric and split arithmetic every user-facing figure stands on.

Each test pins one defect the review found, against a hand computation or an independent
recomputation (one pooled batch over the whole split), so that none can come back silently.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data import schema, splits
from pipeline.data.loader import ShardLoader
from pipeline.data.shards import random_chunks, write_shard_set
from pipeline.model import JadeCompact, JadeConfig
from pipeline.reducer import LossConfig, MultiTaskModel, build_weighting, task_losses
from pipeline.train.checkpoint import checkpoint_name, read_state
from pipeline.train.device_feed import rank_slice
from pipeline.train.loop import pooled_losses
from pipeline.train.metrics import TaskMetrics
from pipeline.train.rundir import checkpoint_dirs, read_metrics
from pipeline.train.step import TrainStep
from tests.fixtures.cli import run_cli
from tests.fixtures.ray_cluster import _get_head

TASKS = ("type", "pointer", "span", "countdown")
NO_DROPOUT = ("model:\n  hidden: 16\n  head_width: 16\n  input_dropout: 0.0\n"
              "  dense_dropout: 0.0\ntrain:\n  probe: false\n")
FEATURES = [f"f{i}" for i in range(12)]


def make_shards(path, n_train: int, n_val: int, labeled_fraction: float = 0.7) -> str:
    """Random shards with unlabeled rows mixed in (label -1: no element of any task)."""
    write_shard_set(str(path), FEATURES, itertools.chain(
        random_chunks(n_train, split="train", seed=0, labeled_fraction=labeled_fraction),
        random_chunks(n_val, split="val", seed=1, labeled_fraction=labeled_fraction)))
    return str(path)


def pooled_val_loss(data: str, checkpoint_dir) -> dict[str, float]:
    """The checkpoint's per-task loss on the whole val split as ONE batch (eval mode), with the
    run's own loss config (its auto weights resolved in config.yaml)."""
    from dataclasses import asdict

    from pipeline.config import load_config
    state = read_state(str(checkpoint_dir))
    run_cfg = load_config(str(checkpoint_dir.parent / "config.yaml"))
    mt = MultiTaskModel.build(JadeConfig(**state["model_config"]), LossConfig(**asdict(run_cfg.loss)))
    mt.load_state_dict(state["multitask"])
    mt.eval()
    loader = ShardLoader(data, "val", batch_size=10_000, seed=0, shuffle=False, verify=False)
    batch = next(iter(loader))
    with torch.no_grad():
        out = mt.model(batch["features"])
        return {t: float(v) for t, v in task_losses(out, batch, mt.loss_cfg).items()}


def end_checkpoint(out, record):
    return out / checkpoint_name(record["epoch"] + 1, record["step"])


# ---- 1. epoch losses are per-element means, not means of per-batch means -------------------

@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pooled")
    data = make_shards(base / "shards", n_train=48, n_val=42)
    cfg = base / "run.yaml"
    cfg.write_text(NO_DROPOUT)
    runs = {}
    for batch in (8, 41):
        out = base / f"b{batch}"
        proc = run_cli("train", "--workers", "0", "--data", data, "--out", out, "--config", cfg,
                       "--epochs", "1", "--batch-size", str(batch), timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[batch] = out
    return data, runs


@pytest.mark.parametrize("batch", [8, 41])
def test_val_loss_is_one_pooled_batch_over_the_split_whatever_the_batch_size(local_runs, batch):
    """With 42 val windows the old mean of batch means weighed the last window of batch 41 as
    much as the other 41 together."""
    data, runs = local_runs
    record = read_metrics(str(runs[batch]))[-1]
    expected = pooled_val_loss(data, end_checkpoint(runs[batch], record))
    for task in TASKS:
        assert record["val"][task] == pytest.approx(expected[task], rel=1e-5), task
    assert record["val_loss"] == pytest.approx(sum(expected.values()), rel=1e-5)
    assert record["elements"]["val"]["type"] == int(
        (next(iter(ShardLoader(data, "val", batch_size=100, seed=0, shuffle=False)))["label"] >= 0).sum())


def _step_model(seed=0):
    torch.manual_seed(seed)
    cfg = JadeConfig(n_features=12, hidden=16, head_width=16, input_dropout=0.0, dense_dropout=0.0)
    return MultiTaskModel(JadeCompact(cfg), build_weighting("uncertainty", cfg.tasks),
                          LossConfig())


def _batches(data: str, batch_size: int):
    return list(ShardLoader(data, "train", batch_size=batch_size, seed=0, shuffle=False,
                            verify=False))


def test_train_loss_sums_pool_every_element_of_the_epoch(local_runs):
    """TrainStep's sums over an epoch (lr 0: the model does not move) give the loss of one batch
    over all the epoch's rows, for an uneven last batch and batches without labels."""
    data, _ = local_runs
    mt = _step_model()
    optimizer = torch.optim.AdamW(mt.param_groups(0.0, 0.0, 0.0))
    step = TrainStep(mt, optimizer, mt.tasks, grad_clip=1.0, device="cpu")
    batches = _batches(data, 7)  # 48 rows: six of 7 and one of 6
    batches.append({k: v[:3].clone() for k, v in batches[0].items()})
    batches[-1]["label"].fill_(-1)  # a batch of unlabeled rows adds no element
    batches[-1]["expansion_start"].fill_(-1)
    batches[-1]["expansion_end"].fill_(-1)
    for b in batches:
        step(b, b["label"].shape[0], 7)
    means, counts = pooled_losses(step.loss_sums, mt.tasks)
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    with torch.no_grad():
        mt.train()  # no dropout in this model: train mode changes nothing
        expected = task_losses(mt.model(whole["features"]), whole, mt.loss_cfg)
    for task in TASKS:
        assert means[task] == pytest.approx(float(expected[task]), rel=1e-6), task
    assert counts["type"] == int((whole["label"] >= 0).sum())


def test_a_task_with_no_element_has_no_mean():
    means, counts = pooled_losses(torch.tensor([[3.0, 0.0], [6.0, 0.0]], dtype=torch.float64),
                                  ("type", "span"))
    assert means == {"type": 0.5, "span": None} and counts == {"type": 6, "span": 0}


# ---- 1 + 6 + empty slice, under DDP: 2 workers, then a mid-epoch resume on 1 ---------------

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, _ray_heads):
    ray_cluster = _get_head(_ray_heads, "plain")
    base = tmp_path_factory.mktemp("ddp-pooled")
    # val 41 at batch 10: the last val batch has 1 row, so rank 1 gets none of it
    data = make_shards(base / "shards", n_train=48, n_val=41)
    cfg = base / "run.yaml"
    cfg.write_text(NO_DROPOUT)
    out = base / "w2"
    proc = run_cli("train", "--address", ray_cluster.address, "--workers", "2", "--data", data,
                   "--out", out, "--config", cfg, "--epochs", "1", "--batch-size", "10",
                   "--checkpoint-every", "2", env=ray_cluster.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, out


def test_two_workers_and_an_empty_rank_slice_give_the_pooled_val_loss(ddp_run):
    data, out = ddp_run
    record = read_metrics(str(out))[-1]
    assert record["world_size"] == 2
    expected = pooled_val_loss(data, end_checkpoint(out, record))
    for task in TASKS:
        assert record["val"][task] == pytest.approx(expected[task], rel=1e-5), task


def test_a_mid_epoch_resume_on_another_worker_count_records_the_same_epoch(ddp_run, tmp_path):
    """Checkpoint at step 4 of 5 (2 workers), resumed in local mode (1 process): the epoch's
    train loss is the uninterrupted one (the old W-scaled partial sums gave 1.5 -> 1.8 at
    4 -> 1), and samples/s counts only the samples trained after the resume."""
    data, out = ddp_run
    full = read_metrics(str(out))[-1]
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    mid = checkpoint_name(0, 4)
    assert mid in checkpoint_dirs(str(run))
    for name in checkpoint_dirs(str(run)):
        if name > mid:
            shutil.rmtree(run / name)
    (run / "metrics.jsonl").unlink()
    proc = run_cli("train", "--workers", "0", "--out", run, "--resume", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = read_metrics(str(run))[-1]
    assert resumed["world_size"] == 1 and resumed["step"] == full["step"] == 5
    for task in TASKS:
        assert resumed["train"][task] == pytest.approx(full["train"][task], rel=1e-4), task
    # step 5 alone ran after the resume: its 8 rows
    assert resumed["samples_per_s"] * resumed["epoch_time_s"] == pytest.approx(8, rel=1e-6)


def test_a_rank_without_rows_trains_on_a_padding_row_with_no_elements():
    batch = {"features": torch.randn(1, 105, 12), "valid": torch.ones(1, 105, dtype=torch.bool),
             "label": torch.tensor([1]), "expansion_start": torch.tensor([10]),
             "expansion_end": torch.tensor([20]), "index": torch.tensor([7])}
    pad = rank_slice(batch, 0, 2)  # 1 row over 2 ranks: rank 0 gets none
    assert pad["features"].shape[0] == 1
    assert pad["label"].tolist() == [-1] and pad["index"].tolist() == [-1]
    assert not pad["valid"].any()
    assert rank_slice(batch, 1, 2)["index"].tolist() == [7]
    assert batch["label"].tolist() == [1]  # the global batch itself is untouched


# ---- 7 and 4 inside the training step ------------------------------------------------------

def test_batches_without_labels_leave_the_log_variances_alone():
    mt = _step_model()
    optimizer = torch.optim.AdamW(mt.param_groups(1e-3, 0.0, 0.05))
    step = TrainStep(mt, optimizer, mt.tasks, grad_clip=1.0, device="cpu")
    batch = {"features": torch.randn(8, 105, 12), "valid": torch.ones(8, 105, dtype=torch.bool),
             "label": torch.full((8,), -1), "expansion_start": torch.full((8,), -1),
             "expansion_end": torch.full((8,), -1), "index": torch.arange(8)}
    for _ in range(100):
        step(batch, 8, 8)
    assert mt.weighting.log_vars() == {t: 0.0 for t in mt.tasks}  # was -5 (weight 148)


def test_the_training_step_projects_clamped_log_variances_into_their_range(local_runs):
    data, _ = local_runs
    torch.manual_seed(0)
    cfg = JadeConfig(n_features=12, hidden=16, head_width=16)
    mt = MultiTaskModel(JadeCompact(cfg), build_weighting("uncertainty", cfg.tasks,
                                                          {"clamp": [-0.5, 0.5]}), LossConfig())
    optimizer = torch.optim.AdamW(mt.param_groups(1e-3, 0.0, 1.0))  # s moves ~1 per step
    step = TrainStep(mt, optimizer, mt.tasks, grad_clip=1.0, device="cpu")
    for b in _batches(data, 8):
        step(b, b["label"].shape[0], 8)
    raw = [float(p.detach()) for p in mt.weighting.parameters()]
    assert all(-0.5 <= s <= 0.5 for s in raw), raw
    assert any(abs(s) == 0.5 for s in raw)  # the steps did push s onto a bound


def test_clipping_leaves_the_log_variance_gradients_out_of_the_budget():
    mt = _step_model()
    step = TrainStep(mt, torch.optim.AdamW(mt.param_groups(1e-3)), mt.tasks, grad_clip=1.0,
                     device="cpu")
    own = {id(p) for p in mt.weighting.parameters()}
    assert own and not own & {id(p) for p in step.clipped}
    assert len(step.clipped) == len(list(mt.parameters())) - len(own)


# ---- 3 and 5: the metrics -----------------------------------------------------------------

def _perfect_span_logits(start, end):
    logits = torch.full((len(start), 105), -20.0)
    for i, (s, e) in enumerate(zip(start, end)):
        logits[i, s:e + 1] = 20.0
    return logits


def test_a_window_whose_expansion_lies_in_the_warm_up_is_left_out_of_window_scores():
    """A perfect model scored window_f1 0.5 on these two windows (the second one's expansion,
    bars 2-10, is all warm-up: no bar to find)."""
    start, end = torch.tensor([50, 2]), torch.tensor([60, 10])
    valid = torch.ones(2, 105, dtype=torch.bool)
    valid[:, :20] = False  # the 20 warm-up bars of window-only data
    batch = {"label": torch.tensor([0, 1]), "expansion_start": start, "expansion_end": end,
             "valid": valid}
    m = TaskMetrics(("span",))
    m.update({"span_logits": _perfect_span_logits(start.tolist(), end.tolist())}, batch)
    span = m.compute()["span"]
    assert span["window_f1"] == 1.0 and span["window_precision"] == 1.0
    assert span["windows"] == 1 and span["windows_unscored"] == 1
    assert span["f1"] == 1.0


def _type_f1(pred: list[int], true: list[int]) -> float:
    m = TaskMetrics(("type",))
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 3).float()
    m.update({"type_logits": logits}, {"label": torch.tensor(true),
                                       "expansion_start": torch.zeros(len(true), dtype=torch.long),
                                       "expansion_end": torch.zeros(len(true), dtype=torch.long)})
    return m.compute()["type"]["f1_macro"]


def test_macro_f1_averages_over_the_target_classes_only():
    """41 of 42 right: the error predicted as never-a-target class 2 gave 0.659 (class 2 counted
    with F1 0), as class 1 0.976. Now both average classes 0 and 1 only."""
    true = [0] * 30 + [1] * 12
    as_two, as_one = list(true), list(true)
    as_two[0], as_one[0] = 2, 1
    f1_class0 = 2 * 29 / (30 + 29)
    assert _type_f1(as_two, true) == pytest.approx((f1_class0 + 1.0) / 2)
    assert _type_f1(as_one, true) == pytest.approx((f1_class0 + 2 * 12 / (12 + 13)) / 2)
    assert _type_f1(as_two, true) > 0.97


# ---- 2. time splits from t0: minutes are not bars -----------------------------------------

def halted_series(n_bars=600, halt_after=360, halt_minutes=60, step_minutes=1, seed=0):
    """1-minute bars (or `step_minutes`) with one session halt; returns (t0 of each bar, ohlc)."""
    rng = np.random.default_rng(seed)
    minutes = np.arange(n_bars) * step_minutes
    minutes[halt_after:] += halt_minutes
    close = 17_000 + np.cumsum(rng.normal(0, 2, n_bars))
    ohlc = np.stack([close - 0.5, close + 1.0, close - 1.0, close], axis=1)
    t = np.datetime64("2024-03-04T14:30", "us") + minutes * np.timedelta64(1, "m")
    return t, ohlc


def windows_every(t, ohlc, stride):
    starts = np.arange(0, len(t) - 105 + 1, stride)
    return starts, t[starts], np.stack([ohlc[s:s + 105] for s in starts])


@pytest.mark.parametrize("kind", ["halt", "5-minute"])
def test_a_time_split_from_t0_never_puts_shared_bars_in_two_splits(kind):
    """Windows every 55 bars: with a 60-minute halt two windows 115 minutes apart share 50 bars;
    with 5-minute bars 105 minutes are 21 bars. The minute embargo passed both."""
    t, ohlc = halted_series() if kind == "halt" else halted_series(step_minutes=5, halt_minutes=0)
    stride = 55 if kind == "halt" else 30
    starts, t0, w_ohlc = windows_every(t, ohlc, stride)
    groups = np.array([f"w{i}" for i in range(len(starts))])
    split, report = splits.assign_splits(t0, groups, policy="time", val_fraction=0.3, ohlc=w_ohlc)
    assert report.key == "t0" and report.embargoed >= 1
    # the truth, from the bar ordinals the split did not see
    truth = splits.check_leakage(split, groups, bar_index=starts)
    assert truth.ok, truth.examples
    assert splits.check_leakage(split, groups, t0=t0.astype(np.int64), ohlc=w_ohlc).ok
    # the old rule (minutes only) leaks, and the content check sees it
    old = np.where(np.arange(len(starts)) < len(starts) - round(len(starts) * 0.3), "train", "val")
    old_minutes = (t0 - t0.min()) // np.timedelta64(1, "m")
    edge = int(np.flatnonzero(old == "val")[0])
    old[(old == "train") & (old_minutes > old_minutes[edge] - 105)] = "embargo"
    assert not splits.check_leakage(old, groups, bar_index=starts).ok
    leak = splits.check_leakage(old, groups, t0=t0.astype(np.int64), ohlc=w_ohlc)
    assert not leak.ok and "share" in leak.examples[0]


def _t0_dataset(path, t0, ohlc, n):
    """A canonical window data set with t0 and inline bars only (the moola ingest path)."""
    ws = schema.windows_table([f"w{i}" for i in range(n)], [f"w{i}" for i in range(n)], t0=t0,
                              ohlc=ohlc, label=np.zeros(n, np.int64),
                              expansion_start=np.full(n, 40), expansion_end=np.full(n, 60))
    schema.write_dataset(str(path), schema.WindowSet(ws, None, {}), source={"test": "t0 only"})
    return str(path)


def test_data_shard_and_validate_on_t0_only_windows_across_a_halt(tmp_path):
    t, ohlc = halted_series()
    starts, t0, w_ohlc = windows_every(t, ohlc, 55)
    src = _t0_dataset(tmp_path / "windows", t0, w_ohlc, len(starts))
    out = tmp_path / "shards"
    proc = run_cli("data", "shard", "--in", src, "--out", out, "--split", "time",
                   "--val-fraction", "0.3")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert "by content" in manifest["split_policy"]["guarantee"]
    assert manifest["excluded"]["embargo"] >= 1
    assert run_cli("data", "validate", str(out)).returncode == 0


def test_data_validate_refuses_shards_whose_splits_share_bars(tmp_path):
    """Shards written by hand: a train and a val window 115 minutes apart that share 50 bars
    (t0 only), and a pair 50 bars apart by bar_index (no t0): both passed `data validate`."""
    t, ohlc = halted_series()
    starts, t0, w_ohlc = windows_every(t, ohlc, 55)

    def chunk(split, rows, with_t0, with_index):
        base = next(random_chunks(len(rows), split=split, seed=len(rows)))[1]
        base.update(window_id=[f"w{r}" for r in rows], group_id=[f"w{r}" for r in rows],
                    t0=pa.array(t0[rows]) if with_t0 else None,
                    ohlc=w_ohlc[rows].astype(np.float32),
                    bar_index=starts[rows] if with_index else None)
        return split, base

    n = len(starts)
    for with_t0, with_index, name in ((True, False, "t0"), (False, True, "bars")):
        out = tmp_path / name
        write_shard_set(str(out), FEATURES, [chunk("train", np.arange(0, 6), with_t0, with_index),
                                             chunk("val", np.arange(6, n), with_t0, with_index)])
        proc = run_cli("data", "validate", str(out))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "leakage" in proc.stderr + proc.stdout and "share" in proc.stderr + proc.stdout
