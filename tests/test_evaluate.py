"""`moola-pipeline evaluate`: test metrics with bootstrap intervals beside naive baselines, the
span threshold chosen on val and applied on test, the selection-split label, S3 runs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.errors import UserError
from pipeline.evaluate import choose_threshold, evaluate_run, threshold_from_predictions
from pipeline.evaluate.evaluate import predict, split_labels
from pipeline.evaluate.threshold import read_threshold
from pipeline.evaluate.windows import decode_runs, event_rows
from pipeline.train.metrics import TaskMetrics
from tests.fixtures.cli import assert_user_error, run_cli

SMALL = "model:\n  hidden: 16\n  head_width: 16\n"


def _train(tmp, data, name="run", epochs=2):
    cfg = tmp / "small.yaml"
    cfg.write_text(SMALL)
    out = tmp / name
    proc = run_cli("train", "--workers", "0", "--data", data, "--out", out, "--config", cfg,
                   "--epochs", str(epochs), "--batch-size", "16", timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    assert run_cli("data", "synth", "--out", tmp / "w", "--windows", "150").returncode == 0
    proc = run_cli("data", "shard", "--in", tmp / "w", "--out", tmp / "s", "--test-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    out = _train(tmp, str(tmp / "s"))
    return out, str(tmp / "s")


def test_evaluate_writes_metrics_intervals_baselines_and_lift(run):
    out, data = run
    proc = run_cli("evaluate", out, "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr
    assert "lift" in proc.stdout and "span.event_hit50" in proc.stdout and "best baseline" in proc.stdout
    result = json.loads((out / "eval" / "test.json").read_text())
    assert result["split"] == "test" and not result["selection_split"]
    test_labels = split_labels(data, "test")["label"]
    assert result["windows"] == len(test_labels)
    m = result["metrics"]
    for key in ("type.accuracy", "type.balanced_accuracy", "span.f1", "span.prob_separation",
                "span.event_iou", "pointer.center_mae_bars", "countdown.mae_bars"):
        entry = m[key]
        assert entry["low"] <= entry["value"] <= entry["high"], key
        assert entry["baselines"] and entry["best_baseline"] in entry["baselines"]
        assert entry["lift"]["low"] <= entry["lift"]["value"] <= entry["lift"]["high"]
    # the majority baseline by hand: the train majority class's share of the test windows
    train_labels = split_labels(data, "train")["label"]
    majority = np.bincount(train_labels[train_labels >= 0]).argmax()
    labeled = test_labels[test_labels >= 0]
    assert m["type.accuracy"]["baselines"]["majority"]["value"] == pytest.approx(
        float((labeled == majority).mean()))
    assert m["type.balanced_accuracy"]["baselines"]["majority"]["value"] == pytest.approx(0.5)
    # the class-prior draw, in expectation: recall of class k is p_k, accuracy sum_k share_k p_k
    prior = np.bincount(train_labels[train_labels >= 0], minlength=2) / (train_labels >= 0).sum()
    share = np.bincount(labeled, minlength=2) / len(labeled)
    assert m["type.accuracy"]["baselines"]["prior"]["value"] == pytest.approx(float(share @ prior))
    assert m["type.balanced_accuracy"]["baselines"]["prior"]["value"] == pytest.approx(0.5)
    # a constant span probability separates nothing
    assert m["span.prob_separation"]["baselines"]["base_rate"]["value"] == pytest.approx(0.0, abs=1e-9)


def test_the_interval_is_deterministic_by_seed(run, tmp_path):
    out, _ = run
    a = evaluate_run(str(out), bootstrap=100, seed=3, out=str(tmp_path / "a.json"))
    b = evaluate_run(str(out), bootstrap=100, seed=3, out=str(tmp_path / "b.json"))
    c = evaluate_run(str(out), bootstrap=100, seed=4, out=str(tmp_path / "c.json"))
    assert a["metrics"] == b["metrics"]
    assert a["metrics"]["span.f1"]["low"] != c["metrics"]["span.f1"]["low"] or \
        a["metrics"]["type.accuracy"]["low"] != c["metrics"]["type.accuracy"]["low"]


def test_the_threshold_chosen_on_val_is_applied_unchanged_on_test(run, tmp_path):
    out, data = run
    stored = read_threshold(str(out))["span_threshold"]  # written by training, at its best epoch
    assert threshold_from_predictions(str(out)) == stored
    preds = np.load(out / "best_val_predictions.npz")
    assert stored == choose_threshold(preds["span_prob"], preds)
    result = evaluate_run(str(out), bootstrap=0, out=str(tmp_path / "t.json"))
    assert result["span_threshold"] == stored
    # the test span F1 is the one at that threshold, recomputed independently
    from pipeline.trained_run import open_run
    model = open_run(str(out), "best").model
    outputs, batch = predict(model, data, "test")
    metrics = TaskMetrics(("span",), span_threshold=stored)
    metrics.update({k: torch.as_tensor(v) for k, v in outputs.items()},
                   {k: torch.as_tensor(v) for k, v in batch.items()})
    assert result["metrics"]["span.f1"]["value"] == pytest.approx(metrics.compute()["span"]["f1"])


def test_val_results_are_labelled_the_selection_split(run):
    out, _ = run
    proc = run_cli("evaluate", out, "--split", "val", "--bootstrap", "20")
    assert proc.returncode == 0, proc.stderr
    assert "SELECTION SPLIT" in proc.stdout
    result = json.loads((out / "eval" / "val.json").read_text())
    assert result["selection_split"] is True and "optimistic" in result["note"]


def test_a_data_set_without_a_test_split_is_one_clear_error(tmp_path):
    assert run_cli("data", "synth", "--out", tmp_path / "w", "--windows", "60").returncode == 0
    assert run_cli("data", "shard", "--in", tmp_path / "w", "--out", tmp_path / "s").returncode == 0
    out = _train(tmp_path, str(tmp_path / "s"), epochs=1)
    proc = run_cli("evaluate", out)
    assert_user_error(proc, "no test split", "data shard", "--test-fraction")
    with pytest.raises(UserError, match="no whole checkpoint nope"):
        evaluate_run(str(out), split="val", checkpoint="nope")


def test_evaluate_reads_a_run_in_s3(run, s3_bucket, monkeypatch):
    out, _ = run
    s3_bucket.use(monkeypatch)
    from pipeline import storage
    fs, path = storage.resolve(f"{s3_bucket.uri}/runs/r1")
    pafs.copy_files(str(out), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    proc = run_cli("evaluate", f"{s3_bucket.uri}/runs/r1", "--bootstrap", "50", env=s3_bucket.env)
    assert proc.returncode == 0, proc.stderr
    assert "runs/r1/eval/test.json" in " ".join(s3_bucket.keys())
    local = evaluate_run(str(out), bootstrap=50, out=str(out / "eval" / "local.json"))
    remote = json.loads(storage.read_bytes(f"{s3_bucket.uri}/runs/r1/eval/test.json"))
    # the same figures; another process may run torch with another thread count (earlier tests
    # in this one set it), which moves the last bits of the model's outputs
    assert _numbers(remote["metrics"]) == pytest.approx(_numbers(local["metrics"]), rel=1e-6,
                                                        abs=1e-9)


def _numbers(tree, prefix="") -> dict:
    """{dotted key: number} of a nested dict (None and strings as they are)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def test_events_are_decoded_runs_matched_by_iou():
    prob = np.zeros((2, 105))
    prob[0, 40:50] = 0.9   # true 40..49: IoU 1
    prob[0, 80:83] = 0.9   # a second, wrong run: the best run counts
    prob[1, 10:20] = 0.9   # true 15..34: IoU 5/25 = 0.2, a miss at 0.5
    batch = {"label": np.array([0, 1]), "expansion_start": np.array([40, 15]),
             "expansion_end": np.array([49, 34]), "valid": np.ones((2, 105), bool)}
    assert decode_runs(prob[0], batch["valid"][0], 0.5) == [(40, 49), (80, 82)]
    rows = event_rows(prob, batch, 0.5)
    assert rows[0].tolist() == [1.0, 1.0, 1.0]
    assert rows[1].tolist() == pytest.approx([0.2, 0.0, 1.0])


def test_the_run_records_the_auto_loss_weights_of_its_train_split(run):
    """`loss.*: auto` became the numbers of the manifest's train label counts, in config.yaml."""
    import yaml

    from pipeline.config import LossSection
    from pipeline.reducer.losses import resolve_auto_weights
    out, data = run
    saved = yaml.safe_load((out / "config.yaml").read_text())["loss"]
    counts = json.loads((out / "manifest.json").read_text())["label_counts"]["train"]
    expected = resolve_auto_weights(LossSection(), counts, num_classes=3)
    assert saved["span_pos_weight"] == pytest.approx(expected["span_pos_weight"])
    assert saved["type_class_weight"] == pytest.approx(expected["type_class_weight"])
    assert saved["span_pos_weight"] == pytest.approx(
        counts["out_span_bars"] / counts["in_span_bars"], rel=1e-3)
