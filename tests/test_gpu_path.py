"""The GPU path of the worker loop, checked on CPU (issue 8): the device feed (one-ahead prefetch
keeps batches and loader state exact), the bf16 autocast option (fp32 losses, same keys, a real
bf16 forward), a bf16 local run, the config check, and bench/gpu_step.py in its quick mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.loader import ShardLoader
from pipeline.model import JadeCompact, JadeConfig
from pipeline.reducer import LOSS_STATS, LossConfig, MultiTaskModel, build_weighting
from pipeline.train.device_feed import DeviceFeed, autocast_model, rank_slice
from pipeline.train.rundir import read_metrics
from tests.fixtures.cli import assert_user_error, run_cli
from tests.test_train_local import SMALL_MODEL, make_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("gpu-shards") / "d", n_train=40, n_val=12)


def _loader(shards, start_epoch=0):
    loader = ShardLoader(shards, "train", batch_size=8, seed=3, verify=False)
    loader.set_epoch(start_epoch)
    return loader


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 3)])
def test_feed_yields_the_loaders_slices_and_state(shards, prefetch, rank, world):
    expected, states = [], []
    plain = _loader(shards)
    for batch in plain:
        expected.append(rank_slice(batch, rank, world))
        states.append(plain.state_dict())
    loader = _loader(shards)
    feed = DeviceFeed(loader, rank, world, "cpu", prefetch=prefetch)
    got, got_states = [], []
    for batch in feed:
        got.append(batch)
        got_states.append(feed.loader_state)  # what a checkpoint taken now must save
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert got_states == states
    assert [s["batches_consumed"] for s in got_states] == [1, 2, 3, 4, 5]
    if prefetch:  # the loader itself ran one batch ahead while batch 1 was out
        loader2 = _loader(shards)
        it = iter(DeviceFeed(loader2, rank, world, "cpu", prefetch=True))
        next(it)
        assert loader2.state_dict()["batches_consumed"] == 2


def test_feed_resumes_from_the_state_it_reported(shards):
    """A checkpoint of feed.loader_state mid-epoch resumes at the next untrained batch."""
    loader = _loader(shards)
    feed = DeviceFeed(loader, 0, 1, "cpu", prefetch=True)
    it = iter(feed)
    seen = [next(it)["index"] for _ in range(2)]
    saved = feed.loader_state
    rest = [b["index"] for b in it]
    resumed = _loader(shards)
    resumed.load_state_dict(saved)
    again = [b["index"] for b in DeviceFeed(resumed, 0, 1, "cpu", prefetch=True)]
    assert len(again) == len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(again, rest))
    assert not any(torch.equal(seen[-1], b) for b in again)


def test_rank_slices_cover_the_global_batch(shards):
    batch = next(iter(_loader(shards)))
    parts = [rank_slice(batch, r, 3)["index"] for r in range(3)]
    assert torch.equal(torch.cat(parts), batch["index"])
    assert sorted(len(p) for p in parts) == [2, 3, 3]


def _multitask():
    torch.manual_seed(0)
    cfg, loss_cfg = JadeConfig(hidden=16, head_width=16), LossConfig()
    return MultiTaskModel(JadeCompact(cfg), build_weighting(loss_cfg.weighting, cfg.tasks),
                          loss_cfg)


def test_autocast_runs_the_model_in_bf16_and_the_losses_in_fp32(shards):
    batch = next(iter(_loader(shards)))
    ref = _multitask()
    mt = _multitask()
    keys = list(mt.state_dict())
    inner_dtypes = []
    linear = next(m for m in mt.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: inner_dtypes.append(o.dtype))
    autocast_model(mt.model, "cpu")
    total, losses, outputs = mt(batch)
    assert inner_dtypes == [torch.bfloat16]          # the forward really ran in bf16
    # the model's outputs come back fp32; the loss statistics are float64 by design
    assert outputs.pop(LOSS_STATS).dtype == torch.float64
    assert all(v.dtype == torch.float32 for v in outputs.values() if v.is_floating_point())
    assert total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert list(mt.state_dict()) == keys              # no wrapper: checkpoints unchanged
    ref_total, _, _ = ref(batch)
    assert not torch.equal(total, ref_total)          # bf16 differs from fp32 ...
    assert torch.allclose(total, ref_total, rtol=0.05, atol=0.05)  # ... but only by rounding
    total.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in mt.parameters())


def test_bf16_local_run_trains_and_records(shards, tmp_path):
    cfg = tmp_path / "bf16.yaml"
    cfg.write_text(SMALL_MODEL + "train:\n  precision: bf16\n")
    out = tmp_path / "run"
    proc = run_cli("train", "--workers", "0", "--data", shards, "--out", out, "--config",
                   str(cfg), "--epochs", "1", "--batch-size", "8", "--seed", "0", timeout=240)
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(str(out))
    assert len(records) == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in records[0]["train"].values())
    assert "precision: bf16" in (out / "config.yaml").read_text()


def test_unknown_precision_is_one_clear_error(shards, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  precision: fp16\n")
    out = tmp_path / "run"
    proc = run_cli("train", "--workers", "0", "--data", shards, "--out", out, "--config",
                   str(cfg), "--epochs", "1")
    assert_user_error(proc, "train.precision", "fp16")
    assert not out.exists()


def test_bench_quick_prints_the_comparison():
    proc = subprocess.run([sys.executable, "bench/gpu_step.py", "--quick", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()
            if re.match(r"^\s*\d+\s+fp32\s", line)]
    assert [int(r[0]) for r in rows] == [32, 256], proc.stdout
    for batch, _, a, g, b, bg, ratio, graphed, load, *_ in rows:
        a, b, ratio, load = float(a), float(b), float(ratio), float(load)
        assert a > 0 and b > 0 and load > 0
        assert ratio == pytest.approx(b / a, abs=0.006)
        assert g == bg == "n/a"        # no CUDA graph without CUDA
        assert graphed == "0/4"        # and the pipeline ran its 4 steps eagerly
    assert "pipeline: local mode" in proc.stdout  # states which mode (b) ran in


def test_ddp_graph_bench_without_gpus_says_what_it_needs():
    proc = subprocess.run([sys.executable, "bench/gpu_ddp.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs 2 CUDA GPUs" in proc.stderr and "Traceback" not in proc.stderr
