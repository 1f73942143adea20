"""TensorBoard event files written by the epoch sink hold every numeric value of the records,
read back with TensorBoard's own EventAccumulator, for a local and an s3:// run directory."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.report.live import EpochSink
from pipeline.report.tensorboard import scalars

RECORDED = Path(__file__).parent / "data" / "recorded_run"


def recorded() -> list[dict]:
    return [json.loads(line) for line in (RECORDED / "metrics.jsonl").read_text().splitlines()]


def read_scalars(tb_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_scalar_names_follow_the_record():
    flat = scalars({"epoch": 3, "run_id": "x", "val": {"span": 0.3}, "weights": {"countdown": 2},
                    "type": {"recall": [0.5, None, 0.25]}, "best": True, "lr": 1e-3,
                    "starving": [], "log_vars": None})
    assert flat == {"val/span": 0.3, "weights/countdown": 2.0, "type/recall/0": 0.5,
                    "type/recall/2": 0.25, "lr": 1e-3}


def test_sink_writes_every_scalar_of_every_epoch(tmp_path):
    records = recorded()
    sink = EpochSink(str(tmp_path), None, stream=io.StringIO())
    for r in records:
        sink.on_epoch(r)
    sink.close()
    got = read_scalars(tmp_path / "tb")
    expected = {}
    for r in records:
        for name, value in scalars(r).items():
            expected.setdefault(name, []).append((r["epoch"], value))
    assert {"val/span", "train/countdown", "weights/countdown", "log_vars/pointer",
            "grad_share/countdown", "grad_ratio_countdown_pointer", "span/f1",
            "pointer/hit3_both", "samples_per_s"} <= set(got)
    assert set(got) == set(expected)
    for name, points in expected.items():
        events = got[name]
        assert [e.step for e in events] == [step for step, _ in points], name
        assert [e.value for e in events] == pytest.approx([v for _, v in points], rel=1e-6), name


def test_non_finite_losses_reach_tensorboard(tmp_path):
    sink = EpochSink(str(tmp_path), None, stream=io.StringIO())
    sink.on_epoch({"epoch": 0, "train": {"span": math.nan}, "val": {"span": math.inf}})
    sink.close()
    got = read_scalars(tmp_path / "tb")
    assert math.isnan(got["train/span"][0].value) and math.isinf(got["val/span"][0].value)


@pytest.mark.s3
def test_s3_run_dir_gets_event_files_after_every_epoch(tmp_path, s3_env):
    run = f"{s3_env.uri}/runs/r1"
    sink = EpochSink(run, None, stream=io.StringIO())
    records = recorded()[:3]
    sink.on_epoch(records[0])
    keys = [k for k in s3_env.keys() if k.startswith("runs/r1/tb/events.out.tfevents")]
    assert len(keys) == 1  # uploaded before the run ends
    for r in records[1:]:
        sink.on_epoch(r)
    sink.close()
    local = tmp_path / "tb"
    local.mkdir()
    client = s3_env.server.boto3_client()
    for key in s3_env.keys():
        if key.startswith("runs/r1/tb/"):
            client.download_file(s3_env.name, key, str(local / Path(key).name))
    got = read_scalars(local)
    assert [e.step for e in got["val/span"]] == [0, 1, 2]


def test_mlflow_uri_without_mlflow_installed_warns_and_keeps_going(tmp_path, monkeypatch, capsys):
    import importlib.util
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here; this checks the path without it")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    sink = EpochSink(str(tmp_path), None, stream=io.StringIO())
    assert sink.mlflow is None
    sink.on_epoch(recorded()[0])
    sink.close()
    assert "MLFLOW_TRACKING_URI is set but mlflow is not installed" in capsys.readouterr().err
    assert read_scalars(tmp_path / "tb")["val/span"][0].step == 0
