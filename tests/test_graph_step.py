"""The CUDA-graph step (issue 8), checked without a GPU.

A CUDA graph cannot be captured on CPU, so these tests run the graphed *schedule* with the
recorded step replayed eagerly on the static buffers (`replay="eager"`, or MOOLA_GRAPH_REPLAY=eager
for a whole run): warmup count, capture on a full batch, static-buffer copies, eager fallback for
a smaller last batch and for probe steps, the loss sums held in place, tensor learning rates the
scheduler fills in place, and checkpoints that load on either side. That it trains exactly like
the eager step is the assertion; the capture itself is exercised by bench/gpu_step.py on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model import JadeCompact, JadeConfig
from pipeline.reducer import LossConfig, MultiTaskModel, build_weighting
from pipeline.train.rundir import read_metrics
from pipeline.train.step import (TrainStep, load_optimizer_state, make_optimizer, make_scheduler,
                                 portable_state, use_graphs)
from tests.fixtures.cli import assert_user_error, run_cli
from tests.test_train_local import SMALL_MODEL, make_shards

FULL = 8


def _model(weighting="uncertainty"):
    torch.manual_seed(0)
    cfg = JadeConfig(hidden=16, head_width=16, n_features=12)
    loss_cfg = LossConfig(weighting=weighting)
    return MultiTaskModel(JadeCompact(cfg), build_weighting(loss_cfg.weighting, cfg.tasks),
                          loss_cfg), cfg.tasks


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(-1, 90, (n,), generator=g)
    return {"features": torch.randn(n, 105, 12, generator=g),
            "valid": torch.rand(n, 105, generator=g) > 0.1,
            "label": torch.randint(-1, 3, (n,), generator=g),
            "expansion_start": start, "expansion_end": (start + 6).clamp(max=104),
            "index": torch.arange(n) + seed * 100}


# Two epochs of 6 batches: full, ..., a smaller last batch; a probe on each epoch's last batch.
EPOCHS = [[_batch(FULL, e * 10 + i) for i in range(5)] + [_batch(5, e * 10 + 9)] for e in range(2)]


def _train(graphs, weighting="uncertainty", scheduler="cosine", epochs=EPOCHS, state=None,
           fallback=False):
    model, tasks = _model(weighting)
    model.train()
    optimizer = make_optimizer(model.param_groups(1e-2, 0.01, 0.05), torch.device("cpu"), graphs)
    sched = make_scheduler(optimizer, scheduler, 12)
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"], "cpu", graphs)
        sched.load_state_dict(state["scheduler"])
    step = TrainStep(model, optimizer, tasks, 1.0, "cpu", graphs=graphs, warmup=2, replay="eager",
                     fallback=fallback)
    torch.manual_seed(7)  # dropout draws the same numbers either way
    if state is not None:
        torch.set_rng_state(state["rng"])
    probed, sums = [], []
    for batches in epochs:
        step.loss_sums.zero_()
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            probe = (lambda losses: probed.append(sorted(losses))) if last else None
            step(batch, batch["label"].shape[0], FULL, probe)
            sched.step()
        sums.append(step.loss_sums.clone())
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    saved = {"model": model.state_dict(), "optimizer": portable_state(optimizer.state_dict()),
             "scheduler": portable_state(sched.state_dict()), "rng": torch.get_rng_state()}
    return params, sums, step, optimizer, probed, saved


@pytest.mark.parametrize("weighting", ["uncertainty", "running-mean"])
def test_graphed_schedule_trains_like_the_eager_step(weighting):
    eager_params, eager_sums, eager, _, eager_probed, _ = _train(False, weighting)
    params, sums, graphed, optimizer, probed, _ = _train(True, weighting)
    # 2 warm-up steps, then a capture whose replay is the 3rd step; the smaller last batch of
    # each epoch (which also carries the probe) runs eagerly; every other full batch replays.
    assert graphed.counts == {"eager": 2 + 2, "replayed": 3 + 5}
    assert eager.counts == {"eager": 12, "replayed": 0}
    assert probed == eager_probed and len(probed) == 2     # the probe saw its losses each epoch
    # Same parameters and loss sums (the lr is a float32 tensor in the graphed run).
    torch.testing.assert_close(params, eager_params, rtol=1e-5, atol=1e-6)
    for a, b in zip(sums, eager_sums):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # The cosine schedule reached the captured step through the lr tensor, in place, computed
    # on the host in float64 (one rounding to float32).
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float32
    assert isinstance(optimizer.param_groups[0]["initial_lr"], float)
    expected = 1e-2 * 0.5 * (1 + math.cos(math.pi * 12 / 12))
    assert float(lr) == pytest.approx(expected, abs=1e-9)


def test_replays_read_each_new_batch_not_the_captured_one():
    """Batches 1-2 warm up, 3 is captured (and replayed), 4 is replayed, 5 is probed (eager). A
    replay that kept training on the captured batch would equal the run that sees batch 3 twice;
    it must equal the eager run instead."""
    b = EPOCHS[0][:5]
    _, sums, graphed, *_ = _train(True, epochs=[b])
    _, eager_sums, *_ = _train(False, epochs=[b])
    _, stuck_sums, *_ = _train(False, epochs=[[b[0], b[1], b[2], b[2], b[4]]])
    assert graphed.counts == {"eager": 3, "replayed": 2}
    torch.testing.assert_close(sums[0], eager_sums[0], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(sums[0], stuck_sums[0], rtol=1e-4)


def test_a_probe_step_or_a_smaller_batch_before_capture_does_not_count_as_warmup():
    model, tasks = _model()
    optimizer = make_optimizer(model.param_groups(1e-3, 0.0, None), torch.device("cpu"), True)
    step = TrainStep(model, optimizer, tasks, 0.0, "cpu", graphs=True, warmup=1, replay="eager")
    step(_batch(5, 1), 5, FULL)                         # smaller: eager, not warm-up
    step(_batch(FULL, 2), FULL, FULL, lambda _: None)   # probe: eager, not warm-up
    assert step.graph is None and step.warmed == 0
    step(_batch(FULL, 3), FULL, FULL)                   # warm-up
    step(_batch(FULL, 4), FULL, FULL)                   # capture + replay
    assert step.graph is not None and step.counts == {"eager": 3, "replayed": 1}
    step(_batch(FULL, 5) | {"extra": torch.zeros(FULL)}, FULL, FULL)  # other keys: eager
    assert step.counts == {"eager": 4, "replayed": 1}


def _syncing_step(self, fn):
    fn()  # the step still runs (sync debug "warn" mode only reports)
    return ["called a synchronizing CUDA operation"]


def test_a_step_that_syncs_with_the_host_stays_eager_under_auto(monkeypatch, capsys):
    eager_params, eager_sums, *_ = _train(False)
    monkeypatch.setattr(TrainStep, "_syncs_in", _syncing_step)
    params, sums, step, *_ = _train(True, fallback=True)
    err = capsys.readouterr().err
    assert err.count("warning: not using CUDA graphs: the step synchronises with the host "
                     "(called a synchronizing CUDA operation)") == 1
    assert step.graph is None and step.counts == {"eager": 12, "replayed": 0}
    torch.testing.assert_close(params, eager_params, rtol=1e-5, atol=1e-6)
    for a, b in zip(sums, eager_sums):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_a_step_that_syncs_with_the_host_is_one_clear_error_under_on(monkeypatch):
    from pipeline.errors import UserError
    monkeypatch.setattr(TrainStep, "_syncs_in", _syncing_step)
    with pytest.raises(UserError, match=r"train.cuda_graphs 'on': cannot capture .* synchronises "
                                         r"with the host .*use 'auto'"):
        _train(True)


def test_only_the_last_warmup_step_is_checked_for_syncs(monkeypatch):
    checked = []
    monkeypatch.setattr(TrainStep, "_syncs_in", lambda self, fn: checked.append(self.warmed) or fn() or [])
    _train(True, epochs=EPOCHS[:1])
    assert checked == [1]  # warmup=2: the second warm-up step, once


@pytest.mark.parametrize("fallback", [True, False])
def test_a_failed_capture_stops_the_run_with_the_way_out(monkeypatch, fallback):
    """A failed capture leaves the CUDA stream and allocator undefined: never train on."""
    from pipeline.errors import UserError

    def failing(self):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    monkeypatch.setattr(TrainStep, "_record", failing)
    with pytest.raises(UserError) as err:
        _train(True, fallback=fallback)
    assert str(err.value) == ("capturing the training step as a CUDA graph failed (RuntimeError: "
                              "CUDA error: operation not permitted when stream is capturing): set "
                              "train.cuda_graphs: off")


@pytest.mark.parametrize("writer,reader", [(True, False), (False, True), (True, True)])
def test_checkpoints_move_between_graphed_and_eager_runs(writer, reader):
    """Train 1 epoch, save, resume for the 2nd: equal to 2 uninterrupted epochs, whichever side
    wrote the checkpoint; the saved lrs are floats, the loaded optimiser keeps its own flags."""
    full_params, *_ = _train(False)
    _, _, _, _, _, saved = _train(writer, epochs=EPOCHS[:1])
    assert all(isinstance(g["lr"], float) for g in saved["optimizer"]["param_groups"])
    assert all(isinstance(v, float) for v in saved["scheduler"]["_last_lr"])
    params, _, _, optimizer, _, _ = _train(reader, epochs=EPOCHS[1:], state=saved)
    torch.testing.assert_close(params, full_params, rtol=1e-4, atol=1e-5)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) == reader


def test_who_captures():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_graphs("auto", cuda, 1) and use_graphs("on", cuda, 1) and use_graphs("on", cuda, 4)
    assert not use_graphs("auto", cuda, 4)   # DDP: opt in with "on"
    assert not use_graphs("off", cuda, 1)
    assert not any(use_graphs(s, cpu, w) for s in ("auto", "on", "off") for w in (1, 2))
    with pytest.raises(ValueError, match="cuda_graphs"):
        use_graphs("always", cuda, 1)


# ------------------------------------------------------------------- the loop, end to end

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 44 train windows at batch 8: 5 full batches and a last one of 4, per epoch.
    return make_shards(tmp_path_factory.mktemp("graph-shards") / "d", n_train=44, n_val=12)


def _run(shards, out, tmp_path, env=None, extra="", epochs=2):
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(SMALL_MODEL + "train:\n  scheduler: cosine\n" + extra)
    return run_cli("train", "--data", shards, "--out", str(out), "--config", str(cfg),
                   "--workers", "0", "--epochs", str(epochs), "--batch-size", "8", "--seed", "3",
                   env=env)


def test_a_graphed_local_run_records_its_replays_and_matches_an_eager_run(shards, tmp_path):
    graphed = _run(shards, tmp_path / "graphed", tmp_path,
                   env={"MOOLA_GRAPH_REPLAY": "eager"}, extra="  cuda_graphs: on\n")
    assert graphed.returncode == 0, graphed.stderr[-2000:]
    eager = _run(shards, tmp_path / "eager", tmp_path)
    assert eager.returncode == 0, eager.stderr[-2000:]
    g, e = read_metrics(str(tmp_path / "graphed")), read_metrics(str(tmp_path / "eager"))
    # Epoch 0: 3 warm-up steps, then capture + replay of batches 4 and 5; batch 6 (smaller,
    # probed) eager. Epoch 1: 5 replays.
    assert [r["graphed_steps"] for r in g] == [2, 5]
    assert [r["graphed_steps"] for r in e] == [0, 0]
    for a, b in zip(g, e):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
        for task in a["train"]:
            assert a["train"][task] == pytest.approx(b["train"][task], rel=1e-4, abs=1e-6)
            assert a["val"][task] == pytest.approx(b["val"][task], rel=1e-4, abs=1e-6)


def test_cuda_graphs_on_without_a_gpu_is_one_clear_error(shards, tmp_path):
    out = tmp_path / "on-cpu"
    proc = _run(shards, out, tmp_path, extra="  cuda_graphs: on\n", epochs=1)
    assert_user_error(proc, "train.cuda_graphs", "no GPU")
    assert not out.exists()  # refused before the run directory is made


def test_cuda_graphs_on_for_cpu_workers_is_refused_before_anything_runs(shards, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  cuda_graphs: on\n")
    out = tmp_path / "never"
    proc = run_cli("train", "--data", shards, "--out", str(out), "--config", str(cfg),
                   "--workers", "2")
    assert_user_error(proc, "train.cuda_graphs", "--gpus-per-worker")
    assert not out.exists()
    cfg.write_text("train:\n  cuda_graphs: sometimes\n")
    proc = run_cli("train", "--data", shards, "--out", str(out), "--config", str(cfg),
                   "--workers", "0")
    assert_user_error(proc, "train.cuda_graphs", "sometimes")
    assert not out.exists()


def test_graphed_ddp_workers_get_the_nccl_setting_pytorchs_recipe_asks_for(monkeypatch):
    from pipeline.config import TrainConfig
    from pipeline.train.trainer import _worker_env
    monkeypatch.delenv("MOOLA_GRAPH_REPLAY", raising=False)

    def env(graphs, workers, gpus):
        cfg = TrainConfig()
        cfg.train.cuda_graphs, cfg.cluster.workers, cfg.cluster.gpus_per_worker = graphs, workers, gpus
        return _worker_env(cfg)

    assert env("on", 2, 1)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    for case in (("auto", 2, 1), ("off", 2, 1), ("on", 1, 1), ("on", 2, 0)):
        assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env(*case), case  # Ray's default stays
    assert env("auto", 2, 0) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    monkeypatch.setenv("MOOLA_GRAPH_REPLAY", "eager")  # the CPU test hook reaches the workers
    assert env("auto", 2, 0)["MOOLA_GRAPH_REPLAY"] == "eager"
