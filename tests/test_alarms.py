"""Balance alarms fire on constructed failing runs and stay silent on a healthy one; the live sink
prints them once, logs them to alarms.jsonl, and continues streaks across a resume."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest

from pipeline.report.alarms import AlarmChecker, AlarmConfig, replay
from pipeline.report.live import EpochSink, epoch_progress, summary_line

RECORDED = Path(__file__).parent / "data" / "recorded_run"
sys.path.insert(0, str(RECORDED.parent))
from make_recorded_run import make_run  # noqa: E402

TASKS = ("type", "pointer", "span", "countdown")


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path, "metrics.jsonl").read_text().splitlines()]


def healthy_record(epoch: int, **changes) -> dict:
    """Every task improving 5% an epoch, shares balanced, log-variances moderate."""
    r = {"epoch": epoch,
         "train": {t: 1.0 * 0.95 ** epoch for t in TASKS},
         "val": {t: 1.1 * 0.95 ** epoch for t in TASKS},
         "grad_share": {t: 0.25 for t in TASKS},
         "log_vars": {t: -0.1 * epoch for t in TASKS}}
    for key, value in changes.items():
        r[key] = {**r[key], **value} if isinstance(value, dict) else value
    return r


def kinds(alarms) -> set[tuple[str, str]]:
    return {(a.kind, a.task) for a in alarms}


def test_healthy_run_is_silent_and_starving_run_fires(tmp_path):
    assert replay(records(make_run(str(tmp_path / "h")))) == []
    starving = records(make_run(str(tmp_path / "s"), starving=True))
    found = {first.key: first for first, _ in replay(starving)}
    assert set(found) == {("starving", "countdown"), ("plateau", "countdown")}
    assert found[("starving", "countdown")].epoch <= 3  # seen in the first epochs, not at 20


def test_starving_needs_n_consecutive_low_shares():
    checker = AlarmChecker(AlarmConfig(starve_share=0.05, starve_checks=3))
    low = {"countdown": 0.01, "type": 0.33, "pointer": 0.33, "span": 0.33}
    assert checker.check(healthy_record(0, grad_share=low)) == []
    assert checker.check(healthy_record(1, grad_share=low)) == []
    assert checker.check(healthy_record(2, grad_share={"countdown": 0.2})) == []  # streak broken
    for e in (3, 4):
        assert checker.check(healthy_record(e, grad_share=low)) == []
    fired = checker.check(healthy_record(5, grad_share=low))
    assert kinds(fired) == {("starving", "countdown")}
    assert "0.01, < 0.05 for 3 epochs" in fired[0].message


def test_probe_listed_starving_task_fires_at_once():
    alarms = AlarmChecker().check(healthy_record(0, starving=["pointer"]))
    assert kinds(alarms) == {("starving", "pointer")}


def test_log_variance_at_its_clamp_from_the_run_config():
    cfg = AlarmConfig.from_run_config({"loss": {"weighting_options": {"clamp": [-4, 4]}}})
    assert cfg.logvar_clamp == (-4.0, 4.0)
    checker = AlarmChecker(cfg)
    at_clamp = {"pointer": -4.0}
    assert checker.check(healthy_record(0, log_vars=at_clamp)) == []
    fired = checker.check(healthy_record(1, log_vars=at_clamp))
    assert kinds(fired) == {("logvar_bound", "pointer")}
    assert "clamp -4" in fired[0].message
    # near but not at the clamp, or no clamp and a moderate s: silent
    assert AlarmChecker(cfg).check(healthy_record(0, log_vars={"pointer": -3.9})) == []


def test_log_variance_runaway_without_a_clamp():
    checker = AlarmChecker(AlarmConfig(logvar_limit=6.0, logvar_epochs=2))
    for e in range(2):
        fired = checker.check(healthy_record(e, log_vars={"countdown": 7.5}))
    assert kinds(fired) == {("logvar_bound", "countdown")}


def test_plateau_only_while_other_tasks_improve():
    checker = AlarmChecker(AlarmConfig(plateau_epochs=4))
    fired = []
    for e in range(6):
        fired = checker.check(healthy_record(e, val={"span": 0.7}))
    assert kinds(fired) == {("plateau", "span")}
    assert "span: val loss has not improved for 5 epochs" in fired[0].message
    # every task flat: nothing is "left behind" (early stopping's business, not an alarm)
    flat = AlarmChecker(AlarmConfig(plateau_epochs=4))
    for e in range(8):
        out = flat.check({"epoch": e, "val": {t: 0.5 for t in TASKS}})
    assert out == []


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_fires_at_once(bad):
    fired = AlarmChecker().check(healthy_record(0, train={"pointer": bad}))
    assert kinds(fired) == {("nonfinite", "pointer")}
    assert "train loss is" in fired[0].message


def test_missing_keys_raise_nothing():
    checker = AlarmChecker()
    for e in range(10):
        assert checker.check({"epoch": e, "train": {"type": None}, "grad_share": None}) == []


def test_sink_prints_each_alarm_once_and_logs_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = io.StringIO()
    sink = EpochSink(str(run), None, stream=out, tensorboard=False)
    low = {"countdown": 0.01, "type": 0.33, "pointer": 0.33, "span": 0.33}
    active = [sink.on_epoch(healthy_record(e, grad_share=low)) for e in range(5)]
    sink.close()
    assert [len(a) for a in active] == [0, 0, 1, 1, 1]
    text = out.getvalue()
    assert text.count("ALARM [starving]") == 1
    summaries = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(summaries) == 5 and all("train type" in line for line in summaries)
    logged = [json.loads(line) for line in (run / "alarms.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["task"], a["epoch"]) for a in logged] == [("starving", "countdown", 2)]


def test_sink_continues_streaks_after_a_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    low = {"countdown": 0.01, "type": 0.33, "pointer": 0.33, "span": 0.33}
    done = [healthy_record(e, grad_share=low) for e in range(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    sink = EpochSink(str(run), None, stream=io.StringIO(), tensorboard=False)
    assert sink.on_epoch(healthy_record(2, grad_share=low))  # third low epoch overall


def test_summary_line_has_losses_weights_and_metrics():
    record = json.loads((RECORDED / "metrics.jsonl").read_text().splitlines()[3])
    assert record["epoch"] == 3  # the record counts from 0, the line from 1
    line = summary_line(record)
    assert line.startswith("epoch 4 | train type ")
    assert summary_line(record, total_epochs=8).startswith("epoch 4/8 | train type ")
    for part in ("| val type ", "| w type ", "ptr ", "cd ", "span F1 ", "samples/s"):
        assert part in line
    assert "\n" not in line
    assert "graphed" not in line  # an eager run (the recorded one) says nothing of graphs
    record = json.loads((RECORDED / "metrics.jsonl").read_text().splitlines()[3])
    assert summary_line(record | {"graphed_steps": 61}).endswith(" 61 graphed")


def test_epoch_progress_plain_lines_when_not_a_tty():
    out = io.StringIO()
    with epoch_progress(8, 2, stream=out) as bar:
        for _ in range(8):
            bar.advance()
    # the third epoch (record epoch 2) reads as epoch 3, like the summary line
    assert out.getvalue().splitlines() == [f"epoch 3: {n}/8 batches" for n in (2, 4, 6, 8)]


def test_epoch_progress_is_a_rich_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with epoch_progress(4, 1, stream=out) as bar:
        for _ in range(4):
            bar.advance()
    text = out.getvalue()
    assert "epoch 2" in text and "4/4" in text and "batches" not in text


def test_alarm_text_counts_epochs_from_1_and_the_record_from_0():
    # a person reads "epoch 3" for the third epoch; alarms.jsonl keeps the record's epoch 2
    checker = AlarmChecker(AlarmConfig(starve_share=0.05, starve_checks=1))
    low = {"countdown": 0.01, "type": 0.33, "pointer": 0.33, "span": 0.33}
    for e in (0, 1):
        checker.check(healthy_record(e))
    (alarm,) = checker.check(healthy_record(2, grad_share=low))
    assert alarm.epoch == 2 and alarm.to_dict()["epoch"] == 2
    assert "< 0.05 for 1 epoch (epoch 3)" in alarm.message  # one epoch, not "1 epochs"
    (nan,) = AlarmChecker().check(healthy_record(4, train={"span": math.nan}))
    assert nan.message == "span: train loss is nan at epoch 5" and nan.epoch == 4
    from pipeline.report.alarms import describe_thresholds
    text = describe_thresholds(AlarmConfig(starve_checks=1, logvar_epochs=2, plateau_epochs=1))
    assert "for 1 epoch;" in text and "for 2 epochs;" in text and "1 epoch without" in text


def test_plateau_text_names_the_best_epoch_from_1():
    checker = AlarmChecker(AlarmConfig(plateau_epochs=2))
    fired = []
    for e in range(4):  # span stops improving after record epoch 0, the others keep improving
        fired = checker.check(healthy_record(e, val={"span": 1.0}))
    (alarm,) = [a for a in fired if a.kind == "plateau"]
    assert alarm.epoch == 3
    assert "not improved for 3 epochs (best 1 at epoch 1)" in alarm.message
