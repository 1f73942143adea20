"""The worker loop's parts, without Ray: best epoch and patience, the resume point (loader
position, RNG, the half-done epoch's sums), the epoch record, the checkpoint composed from the
parts and read back, the gradient probe's thresholds from the config, and the whole loop on one
process through a runtime that is not Ray's (the seam a Ray Tune trial will use)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.train import checkpoint as ckpt
from pipeline.train.objective import MultiTaskObjective
from pipeline.train.optimization import Optimization
from pipeline.train.progress import (WORST, LoaderPosition, TrainProgress, continue_rng,
                                     dropout_seed, epoch_so_far, mid_epoch_checkpoint_due,
                                     probe_due, seed_partial)
from pipeline.train.records import (EpochTotals, TrainedEpoch, empty_task_warnings,
                                    epoch_record, lookup, pooled_losses, reduce_epoch)
from pipeline.train.run_state import RunState, check_resumable, manifest_hash
from pipeline.train.trainer import SCORE_ATTR, run_finished
from tests.ddp_helpers import global_batch

FEATURES = [f"f{i}" for i in range(12)]
TASKS = ("type", "pointer", "span", "countdown")


# --------------------------------------------------------------------- best epoch, patience

def scored(progress: TrainProgress, scores, mode="min", steps_per_epoch=6):
    improved = []
    for score in scores:
        progress.step += steps_per_epoch
        progress.end_epoch()
        improved.append(progress.observe(score, mode))
    return improved


def test_the_best_epoch_is_the_lowest_score_and_names_its_checkpoint():
    progress = TrainProgress()
    assert scored(progress, [3.0, 2.0, 2.5, None, 1.0]) == [True, True, False, False, True]
    assert progress.best == {"score": 1.0, "epoch": 4, "checkpoint": "checkpoint_e0005_s00000030"}
    assert progress.best_epoch == 4 and progress.bad_epochs == 0
    assert progress.best_checkpoint == {"checkpoint_e0005_s00000030"}


def test_max_mode_keeps_the_highest_and_a_tie_is_no_improvement():
    progress = TrainProgress()
    assert scored(progress, [0.2, 0.5, 0.5, 0.4], mode="max") == [True, True, False, False]
    assert progress.best["score"] == 0.5 and progress.best_epoch == 1
    assert progress.bad_epochs == 2


def test_unscored_epochs_count_against_patience_and_there_is_no_best():
    progress = TrainProgress()
    assert scored(progress, [None, None]) == [False, False]
    assert progress.best is None and progress.best_epoch is None
    assert progress.best_checkpoint == set()
    assert progress.should_stop(2) and not progress.should_stop(3)
    assert "never scored" in progress.early_stop_text(10, "val_loss")


def test_patience_zero_never_stops():
    progress = TrainProgress()
    scored(progress, [1.0] + [2.0] * 20)
    assert progress.bad_epochs == 20 and not progress.should_stop(0)


def test_early_stop_says_when_what_and_the_best():
    progress = TrainProgress()
    scored(progress, [1.0, 0.5, 0.6, 0.7])
    assert progress.should_stop(2)
    assert progress.early_stop_text(20, "span.f1") == (
        "early stopping after epoch 4/20: span.f1 has not improved for 2 epochs "
        "(best 0.5 at epoch 2)")


@pytest.mark.parametrize("scores", [[3, 2, 2.5, 2.6, 2.7, 1], [None, None, 1, 2], [1, 1, 1, 1, 1],
                                    [5, 4, 3, 2, 1, 0]])
@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_the_loop_stops_exactly_when_the_driver_thinks_the_run_is_finished(scores, patience):
    """The driver (trainer.run_finished) writes the report when it sees the last record: it
    must agree with the loop's stop rule epoch by epoch."""
    cfg = TrainConfig()
    cfg.train.epochs, cfg.train.early_stop_patience = len(scores), patience
    progress = TrainProgress()
    for score in scores:
        progress.end_epoch()
        progress.observe(score, "min")
        record = {"epoch": progress.epoch - 1, "best_epoch": progress.best_epoch}
        last = progress.epoch >= cfg.train.epochs or progress.should_stop(patience)
        assert run_finished(record, cfg) == last, (progress.epoch, record)
        if last:
            break


def test_progress_round_trips_and_a_half_done_epoch_is_consumed_once():
    progress = TrainProgress()
    scored(progress, [2.0, 3.0])
    progress.step += 2
    state = {**progress.state_dict(), "partial": torch.arange(9.0)}
    again = TrainProgress()
    again.load_state_dict(state)
    assert again.state_dict() == progress.state_dict()
    assert torch.equal(again.take_partial(), torch.arange(9.0))
    assert again.take_partial() is None


# --------------------------------------------------------------------- schedules in an epoch

def test_the_probe_runs_on_each_epochs_last_batch_and_every_n_steps():
    assert [probe_due(True, 0, s, s == 5) for s in range(6)] == [False] * 5 + [True]
    assert [probe_due(True, 4, s, False) for s in range(8)] == [
        False, False, False, True, False, False, False, True]
    assert not probe_due(False, 1, 3, True)


def test_mid_epoch_checkpoints_every_n_steps_but_not_at_an_epochs_end():
    assert [mid_epoch_checkpoint_due(s, 4, False) for s in (3, 4, 8)] == [False, True, True]
    assert not mid_epoch_checkpoint_due(24, 4, last_batch=True)
    assert not mid_epoch_checkpoint_due(4, 0, last_batch=False)


# --------------------------------------------------------------------- the resume point

class FakeLoader:
    def __init__(self, n_batches=6):
        self.n, self.epoch, self.batches_consumed = n_batches, 0, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state):
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]


def test_the_position_is_after_the_last_trained_batch_not_where_a_prefetching_loader_is():
    loader = FakeLoader()
    position = LoaderPosition(loader)
    loader.batches_consumed = 4                      # the feed has staged batch 4 already
    position.trained_through({"epoch": 0, "batches_consumed": 3})
    assert position.state_dict() == {"epoch": 0, "batches_consumed": 3}
    assert not position.ends_epoch({"epoch": 0, "batches_consumed": 5})
    assert position.ends_epoch({"epoch": 0, "batches_consumed": 6})
    position.next_epoch(1)                           # between epochs: the loader's own state
    assert position.state_dict() == {"epoch": 1, "batches_consumed": 0}
    resumed = LoaderPosition(FakeLoader())
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 3})
    assert resumed.state_dict() == {"epoch": 0, "batches_consumed": 3}


def test_the_same_world_size_continues_the_rng_exactly():
    torch.manual_seed(5)
    torch.rand(3)
    saved = ckpt.capture_rng()
    want = torch.rand(4)
    torch.manual_seed(123)
    assert continue_rng(saved, saved_world=2, world=2, seed=7, rank=1, step=10)
    assert torch.equal(torch.rand(4), want)


@pytest.mark.parametrize("rng_file", [True, False], ids=["other-world", "no-rng-file"])
def test_another_world_size_reseeds_per_rank_and_step(rng_file):
    saved = ckpt.capture_rng() if rng_file else None
    assert not continue_rng(saved, saved_world=2, world=3, seed=7, rank=2, step=10)
    got = torch.rand(4)
    torch.manual_seed(7 * 1000 + 2 + 1 + 10)
    assert torch.equal(got, torch.rand(4))
    assert dropout_seed(7, 2) == 7003 and dropout_seed(7, 2, 10) == 7013


def test_a_half_done_epoch_seeds_the_sums_exactly():
    sums = torch.zeros(2, 4, dtype=torch.float64)
    partial = torch.cat([torch.arange(1.0, 9.0, dtype=torch.float64), torch.tensor([40.0])])
    assert seed_partial(sums, partial) == 40
    assert torch.equal(sums.flatten(), partial[:-1])


def test_a_half_done_epoch_of_the_old_layout_is_not_seeded_and_says_so(capsys):
    sums = torch.zeros(2, 4, dtype=torch.float64)
    assert seed_partial(sums, torch.zeros(7)) == 0
    assert not sums.any()
    assert "saved by an older version" in capsys.readouterr().out


def test_the_sums_saved_mid_epoch_are_those_a_resume_seeds():
    sums = torch.tensor([[1.5, 2.0, 0.0, 3.0], [3.0, 4.0, 0.0, 6.0]], dtype=torch.float64)
    partial = epoch_so_far(sums, 17)   # no process group: this rank's are the global sums
    again = torch.zeros_like(sums)
    assert seed_partial(again, partial) == 17 and torch.equal(again, sums)


def test_a_checkpoint_of_other_data_or_another_config_is_refused():
    state = {"manifest_hash": "aaa", "config_hash": "ccc"}
    check_resumable(state, "ccc", "aaa", "ck")
    with pytest.raises(UserError, match="other data.*same --data"):
        check_resumable(state, "ccc", "bbb", "ck")
    with pytest.raises(UserError, match="another model/loss/optimiser config"):
        check_resumable(state, "ddd", "aaa", "ck")
    assert manifest_hash({"a": 1, "created": 1}) == manifest_hash({"a": 1, "created": 2})


# --------------------------------------------------------------------- the epoch record

def test_epoch_losses_are_pooled_per_element_and_a_task_without_elements_has_none():
    trained = TrainedEpoch(torch.tensor([[3.0, 1.0], [6.0, 0.0]], dtype=torch.float64),
                           samples=10, resumed_samples=4, time_s=2.0, started_at=1.0,
                           graphed_steps=0)
    totals = reduce_epoch(trained, torch.tensor([[2.0, 0.0], [4.0, 0.0]], dtype=torch.float64),
                          ("a", "b"))
    assert totals.train == {"a": 0.5, "b": None} and totals.train_elements == {"a": 6, "b": 0}
    assert totals.val == {"a": 0.5, "b": None} and totals.val_elements == {"a": 4, "b": 0}
    assert (totals.samples, totals.resumed_samples) == (10, 4)
    assert pooled_losses(torch.tensor([3.0, 0.0, 6.0, 0.0]), ("a", "b"))[0] == {"a": 0.5, "b": None}


def totals(val=None):
    val = val or {"type": 0.5, "pointer": None, "span": 0.25, "countdown": 1.0}
    return EpochTotals(train={t: 1.0 for t in TASKS}, val=val,
                       train_elements={t: 3 for t in TASKS},
                       val_elements={t: (0 if val[t] is None else 2) for t in TASKS},
                       samples=100.0, resumed_samples=40.0)


def test_the_record_has_the_runs_keys_and_counts_only_this_process_s_samples_per_second():
    trained = TrainedEpoch(torch.zeros(2, 4), 0, 0, time_s=3.0, started_at=12.5, graphed_steps=5)
    record = epoch_record(epoch=2, step=18, world=2, run_id="r1", totals=totals(),
                          trained=trained, figures={"weights": {"type": 1.0}, "span": {"f1": 0.3}},
                          lr=1e-3)
    assert record["samples_per_s"] == pytest.approx(20.0)  # (100 - 40 resumed) / 3 s
    assert record["val_loss"] == pytest.approx(1.75)        # a task without elements adds nothing
    assert record["elements"]["val"]["pointer"] == 0
    assert [record[k] for k in ("epoch", "step", "world_size", "run_id")] == [2, 18, 2, "r1"]
    assert record["span"] == {"f1": 0.3} and record["weights"] == {"type": 1.0}
    assert (record["lr"], record["graphed_steps"], record["started_at"]) == (1e-3, 5, 12.5)
    json.dumps(record)                                      # metrics.jsonl takes it as it is
    zero = epoch_record(epoch=0, step=0, world=1, run_id="r", totals=totals(),
                        trained=TrainedEpoch(torch.zeros(2, 4), 0, 0, 0.0, 0.0, 0), figures={},
                        lr=1.0)
    assert zero["samples_per_s"] is None


def test_the_best_metric_is_looked_up_dotted_and_nothing_to_score_is_none():
    record = {"val_loss": 2.0, "span": {"f1": 0.4, "none": None, "nan": math.nan}, "flag": True}
    assert lookup(record, "val_loss") == 2.0 and lookup(record, "span.f1") == 0.4
    for key in ("span.none", "span.nan", "flag", "span.f1.deeper", "missing"):
        assert lookup(record, key) is None, key


def test_a_split_with_no_element_for_a_task_is_named_in_a_warning():
    record = {"epoch": 3, "elements": {"train": {"type": 2, "span": 0},
                                       "val": {"type": 0, "span": 0}}}
    assert empty_task_warnings(record) == [
        "warning: epoch 4: no train element for span (no labeled window with a target): its "
        "loss is not defined",
        "warning: epoch 4: no val element for span, type (no labeled window with a target): "
        "their losses are not defined"]


# --------------------------------------------------------------------- the probe's thresholds

def tiny_config(**alarms) -> TrainConfig:
    cfg = TrainConfig(run_id="test-run")
    cfg.model.hidden, cfg.model.head_width = 8, 8
    cfg.loss.span_pos_weight, cfg.loss.type_class_weight = 1.0, None
    for key, value in alarms.items():
        setattr(cfg.alarms, key, value)
    return cfg


def batch() -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in global_batch("some").items()}


def starving_after(cfg: TrainConfig, checks: int) -> list[bool]:
    """Whether the probe lists the countdown as starving after each of `checks` checks, with
    the countdown's loss weighted 1e-6 (its gradient share ~1e-8). A check is 4 LSTM backwards
    (~0.1 s on one core): few of them."""
    cfg.loss.weighting = "fixed"
    cfg.loss.weighting_options = {"weights": {"type": 1.0, "pointer": 200.0, "span": 0.5,
                                              "countdown": 1e-6}}
    torch.manual_seed(0)
    objective = MultiTaskObjective.build(cfg, {"features": FEATURES}, "cpu")
    _, losses, _ = objective.module(batch())
    hook = objective.probe_hook(objective.module)
    flags = []
    for _ in range(checks):
        hook(losses)
        flags.append("countdown" in objective.figures({})["starving"])
    return flags


def test_the_probe_flags_with_the_runs_alarm_thresholds_not_its_own_defaults():
    assert starving_after(tiny_config(), 1) == [False]        # the defaults: 0.05 for 3 checks
    assert starving_after(tiny_config(starve_checks=1), 1) == [True]
    assert starving_after(tiny_config(starve_checks=1, starve_share=1e-12), 1) == [False]


def test_a_resumed_probe_keeps_the_runs_thresholds_and_continues_its_streak():
    cfg = tiny_config(starve_checks=5, starve_share=0.2)
    objective = MultiTaskObjective.build(cfg, {"features": FEATURES}, "cpu")
    old = {"every": 0, "starve_share": 0.05, "starve_checks": 3, "steps": 0,  # an older
           "below": {"countdown": 2}, "last": None}                            # checkpoint
    objective.probe.load_state_dict(old)
    assert (objective.probe.starve_share, objective.probe.starve_checks) == (0.2, 5)
    assert objective.probe.below == {"countdown": 2}


# --------------------------------------------------------------------- checkpoint of the parts

class InProcessRuntime:
    """The runtime seam on one process, as a Ray Tune trial would have it: no process group,
    restore from a directory, report copies each checkpoint into `store`."""

    def __init__(self, store, restore_from=None):
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        self.store, self.restore_from, self.reports = str(store), restore_from, []

    def restore_dir(self):
        return contextlib.nullcontext(self.restore_from)

    def prepare_model(self, module):
        return module

    def report(self, metrics, directory, name, keep):
        shutil.copytree(directory, os.path.join(self.store, name))
        self.reports.append((metrics, name, set(keep)))


def parts(cfg, runtime):
    torch.manual_seed(cfg.train.seed)
    objective = MultiTaskObjective.build(cfg, {"features": FEATURES}, "cpu")
    optim = Optimization.build(objective.param_groups(cfg.train), "cosine", 100, "cpu", False)
    return RunState(cfg, "mhash", runtime, objective, optim, LoaderPosition(FakeLoader()),
                    TrainProgress())


STATE_KEYS = {"multitask", "model", "optimizer", "scheduler", "loader", "probe", "epoch", "step",
              "best", "bad_epochs", "partial", "world_size", "config_hash", "manifest_hash",
              "model_config", "run_id"}


def test_a_checkpoint_holds_every_parts_state_and_restores_into_fresh_parts(tmp_path):
    cfg = tiny_config()
    runtime = InProcessRuntime(tmp_path)
    run = parts(cfg, runtime)
    # a few steps, so the optimiser, the schedule and the weighting have state
    rows = batch()
    for i in range(3):
        total, losses, _ = run.objective.module(rows)
        if i == 0:
            run.objective.probe_hook(run.objective.module)(losses)
        run.optim.optimizer.zero_grad()
        total.backward()
        run.optim.optimizer.step()
        run.optim.after_step()
        run.progress.step += 1
    run.progress.end_epoch()                       # an epoch's end: its record and score
    run.position.next_epoch(1)
    run.progress.observe(1.25, "min")
    run.save(record={"epoch": 0}, score=1.25)
    run.progress.step += 1                         # one batch into the next epoch
    run.position.trained_through({"epoch": 1, "batches_consumed": 1})
    mid = torch.arange(9.0, dtype=torch.float64)
    run.save(partial=mid)

    (m1, n1, k1), (m2, n2, k2) = runtime.reports
    assert (n1, n2) == ("checkpoint_e0001_s00000003", "checkpoint_e0001_s00000004")
    assert m1 == {"epoch": 0, "step": 3, SCORE_ATTR: 1.25} and k1 == k2 == {n1}
    assert m2 == {"epoch": 1, "step": 4, SCORE_ATTR: WORST["min"]}
    assert ckpt.read_meta(str(tmp_path / n1))["loader"] == {"epoch": 1, "batches_consumed": 0}
    directory = tmp_path / n2
    state = ckpt.read_state(str(directory))
    assert set(state) == STATE_KEYS
    meta = ckpt.read_meta(str(directory))
    assert meta["loader"] == {"epoch": 1, "batches_consumed": 1} and meta["record"] is None
    assert (meta["epoch"], meta["step"], meta["best"]["score"]) == (1, 4, 1.25)
    assert os.path.exists(directory / ckpt.rng_file(0))

    again = parts(cfg, InProcessRuntime(tmp_path / "unused", restore_from=str(directory)))
    again.restore()
    assert again.progress.state_dict() == run.progress.state_dict()
    assert torch.equal(again.progress.take_partial(), mid)
    assert again.position.state_dict() == {"epoch": 1, "batches_consumed": 1}
    for key, value in run.objective.module.state_dict().items():
        assert torch.equal(again.objective.module.state_dict()[key], value), key
    assert again.optim.lr == run.optim.lr and again.optim.scheduler.last_epoch == 3
    assert again.objective.probe.state_dict() == run.objective.probe.state_dict()
    a, b = run.optim.optimizer.state_dict()["state"], again.optim.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


def test_a_restore_from_other_data_is_one_clear_error(tmp_path):
    cfg = tiny_config()
    runtime = InProcessRuntime(tmp_path)
    parts(cfg, runtime).save(record={"epoch": 0})
    saved = str(tmp_path / runtime.reports[0][1])
    other = parts(cfg, InProcessRuntime(tmp_path, restore_from=saved))
    other.manifest_hash = "other"
    with pytest.raises(UserError, match="trained on other data"):
        other.restore()


# --------------------------------------------------------------------- the loop on one process

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from tests.test_train_local import make_shards
    return make_shards(tmp_path_factory.mktemp("loop-parts") / "shards", n_train=24, n_val=8)


def run_config(data, out, **train) -> TrainConfig:
    cfg = tiny_config()
    cfg.data, cfg.out = data, str(out)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.probe_every = 2, 8, 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_the_loop_runs_on_one_process_through_a_runtime_that_is_not_rays(small_data, tmp_path):
    """Build, restore, train, evaluate, record, save: under the seam alone; and a restart from
    a mid-epoch checkpoint ends exactly like the uninterrupted run."""
    from pipeline.train.rundir import read_metrics
    from pipeline.train.worker import run_worker

    full = InProcessRuntime(tmp_path / "store-full")
    os.makedirs(full.store)
    run_worker(run_config(small_data, tmp_path / "full", checkpoint_every_steps=2), full)
    records = read_metrics(str(tmp_path / "full"))
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["step"] == 6
    assert [name for _, name, _ in full.reports] == [
        "checkpoint_e0000_s00000002", "checkpoint_e0001_s00000003",
        "checkpoint_e0001_s00000004", "checkpoint_e0002_s00000006"]
    assert (tmp_path / "full" / "best_val_predictions.npz").exists()

    # a restart from the checkpoint inside epoch 2 (step 4: 1 of its 3 batches done)
    resumed = InProcessRuntime(tmp_path / "store-resumed",
                               restore_from=os.path.join(full.store, "checkpoint_e0001_s00000004"))
    os.makedirs(resumed.store)
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", out)
    run_worker(run_config(small_data, out, checkpoint_every_steps=2), resumed)
    got = read_metrics(str(out))
    assert [r["epoch"] for r in got] == [0, 1]
    assert got[1]["train"] == pytest.approx(records[1]["train"], rel=1e-12)
    assert got[1]["val"] == pytest.approx(records[1]["val"], rel=1e-12)
    want = ckpt.read_state(os.path.join(full.store, "checkpoint_e0002_s00000006"))
    have = ckpt.read_state(os.path.join(resumed.store, "checkpoint_e0002_s00000006"))
    for key, value in want["multitask"].items():
        assert torch.equal(have["multitask"][key], value), key
