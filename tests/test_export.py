"""`moola-pipeline export`: the .pt2 (torch.export.load) and the ONNX model (onnxruntime) give
the eager model's outputs at batch 1, 7 and 1024; model.json carries what a user of the files
needs; the ONNX graph's op types are known; bad input is one clear error and writes nothing.

One tiny run (60 synthetic windows, 1 epoch, local mode) and one export serve the module: the
capture and the ONNX translation take most of this file's time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.evaluate import evaluate_run
from pipeline.trained_run import open_run
from tests.fixtures.cli import run_cli

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

SMALL = "model:\n  hidden: 16\n  head_width: 16\n"
BATCHES = (1, 7, 1024)
HEADS = ("type_logits", "pointers", "span_logits", "countdown")


def _main(*args) -> tuple[int, str]:
    """`moola-pipeline ARGS` in this process (the console script's own entry point): exit code
    and everything it printed. Saves a fresh interpreter and torch import per call."""
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, buf.getvalue()


def _assert_user_error(code: int, text: str, *needles: str) -> None:
    assert code != 0, text
    assert "Traceback" not in text and text.count("error:") == 1, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    proc = run_cli("data", "build", "--source", "synth", "--windows", "60", "--out", tmp / "s",
                   "--test-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    (tmp / "small.yaml").write_text(SMALL)
    proc = run_cli("train", "--workers", "0", "--data", tmp / "s", "--out", tmp / "run",
                   "--config", tmp / "small.yaml", "--epochs", "1", "--batch-size", "16",
                   timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    evaluate_run(str(tmp / "run"), bootstrap=0)  # RUN/eval/test.json, for the card
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(run):
    out = run.parent / "exported"
    code, text = _main("export", run, "--out", out)
    assert code == 0, text
    return out, text, json.loads((out / "model.json").read_text())


@pytest.fixture(scope="module")
def eager(run):
    return open_run(str(run)).net


def _inputs(batch: int, n_features: int) -> torch.Tensor:
    return torch.randn(batch, 105, n_features, generator=torch.Generator().manual_seed(batch))


def _compare(run_exported, net, label: str) -> None:
    for batch in BATCHES:
        x = _inputs(batch, net.cfg.n_features)
        with torch.no_grad():
            want = {k: v.numpy() for k, v in net(x).items()}
        got = run_exported(x)
        assert sorted(got) == sorted(want) == sorted(HEADS)
        diffs = {}
        for head in HEADS:
            assert got[head].shape == want[head].shape, (head, batch)
            np.testing.assert_allclose(got[head], want[head], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{label} {head} at batch {batch}")
            diffs[head] = float(np.abs(got[head] - want[head]).max())
        print(f"{label} batch {batch}: max |diff| {diffs}")


def test_onnx_in_onnxruntime_matches_eager_at_batch_1_7_1024(exported, eager):
    out, _, _ = exported
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert session.get_inputs()[0].shape == ["batch", 105, eager.cfg.n_features]
    names = [o.name for o in session.get_outputs()]
    assert names == list(HEADS)
    _compare(lambda x: dict(zip(names, session.run(names, {"features": x.numpy()}))), eager, "onnx")


def test_pt2_from_torch_export_load_matches_eager_at_batch_1_7_1024(exported, eager):
    out, _, _ = exported
    module = torch.export.load(str(out / "model.pt2")).module()

    def run_pt2(x):
        with torch.no_grad():
            return {k: v.numpy() for k, v in module(x).items()}
    _compare(run_pt2, eager, "pt2")


def test_the_onnx_graph_has_a_native_lstm_node_not_a_loop(exported):
    out, text, card = exported
    model = onnx.load(str(out / "model.onnx"))

    def op_types(graph):
        for node in graph.node:
            yield node.op_type
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else attr.graphs):
                    yield from op_types(sub)

    found = sorted(set(op_types(model.graph)))
    assert "LSTM" in found and "Loop" not in found and "Scan" not in found, found
    assert card["onnx"]["op_types"] == found and card["onnx"]["recurrence"] == "LSTM"
    assert "recurrence: LSTM" in text


def test_the_card_says_how_to_use_the_model(run, exported):
    out, text, card = exported
    trained = open_run(str(run))
    manifest = json.loads((run / "manifest.json").read_text())
    # run, checkpoint, data
    assert card["run"]["checkpoint"] == trained.checkpoint and card["run"]["is_best"]
    assert card["run"]["run_id"] == trained.config.run_id
    # the hash the checkpoint recorded (the training loop's manifest hash; not imported here,
    # its module pulls in Ray): sha256 of the manifest without `created`, 16 hex digits
    body = json.dumps({k: v for k, v in manifest.items() if k != "created"}, sort_keys=True,
                      default=str)
    assert card["data"]["manifest_hash"] == trained.state["manifest_hash"] == \
        hashlib.sha256(body.encode()).hexdigest()[:16]
    assert card["data"]["feature_set"] == "relativity12"
    assert card["data"]["features"] == manifest["features"] and card["data"]["window"] == 105
    # input layout
    assert card["input"]["shape"] == ["batch", 105, 12] and card["input"]["dtype"] == "float32"
    assert [f["name"] for f in card["input"]["features"]] == manifest["features"]
    assert all(f["meaning"] and len(f["range"]) == 2 for f in card["input"]["features"])
    # outputs: the ONNX model's names and shapes, with meanings
    assert list(card["outputs"]) == list(HEADS)
    assert card["onnx"]["outputs"] == {k: v["shape"] for k, v in card["outputs"].items()}
    assert card["outputs"]["type_logits"]["classes"][:2] == ["consolidation", "retracement"]
    assert "/ 105" in card["outputs"]["pointers"]["meaning"]
    assert card["outputs"]["countdown"]["scale"] == "unit"
    assert card["outputs"]["countdown"]["to_bars"] == "c = value * 40 - 20"
    # threshold, evaluate figures, files
    assert card["span_threshold"]["value"] == trained.span_threshold()[0]
    test_eval = json.loads((run / "eval" / "test.json").read_text())
    assert card["evaluation"]["test"]["same_checkpoint"]
    assert card["evaluation"]["test"]["metrics"]["type.accuracy"]["value"] == \
        test_eval["metrics"]["type.accuracy"]["value"]
    for fmt, name in (("pt2", "model.pt2"), ("onnx", "model.onnx")):
        assert card["files"][fmt]["file"] == name
        assert card["files"][fmt]["bytes"] == (out / name).stat().st_size
        assert max(card["parity"][fmt]["batch_7"].values()) < 1e-5
    assert sorted(os.listdir(out)) == ["model.json", "model.onnx", "model.pt2"]
    assert sorted(os.listdir(out.parent)) == sorted(["run", "exported", "s", "small.yaml"])
    assert "written:" in text and "span threshold" in text


# ------------------------------------------------------------------------- bad input

def _nothing_written(folder) -> None:
    assert not any(name.startswith((".out", "out")) for name in os.listdir(folder)), \
        os.listdir(folder)


def test_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    code, text = _main("export", tmp_path / "empty", "--out", tmp_path / "out")
    _assert_user_error(code, text, "not a run directory", "config.yaml")
    _nothing_written(tmp_path)


def test_a_run_without_a_checkpoint(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "manifest.json"):
        (bare / name).write_bytes((run / name).read_bytes())
    code, text = _main("export", bare, "--out", tmp_path / "out")
    _assert_user_error(code, text, "no best checkpoint", "--checkpoint latest")
    code, text = _main("export", bare, "--checkpoint", "latest", "--out", tmp_path / "out")
    _assert_user_error(code, text, "no whole checkpoint")
    code, text = _main("export", run, "--checkpoint", "checkpoint_e0009_s00000001",
                       "--out", tmp_path / "out")
    _assert_user_error(code, text, "has no whole checkpoint checkpoint_e0009_s00000001")
    _nothing_written(tmp_path)


def test_an_unknown_format(run, tmp_path):
    code, text = _main("export", run, "--format", "tflite", "--out", tmp_path / "out")
    _assert_user_error(code, text, "--format tflite", "pt2, onnx or all")
    _nothing_written(tmp_path)


def test_onnx_without_the_export_extra(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` -> ImportError
    code, text = _main("export", run, "--format", "onnx", "--out", tmp_path / "out")
    _assert_user_error(code, text, "needs onnxscript", "moola-pipeline[export]", "--format pt2")
    _nothing_written(tmp_path)


def test_an_out_folder_that_holds_files(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, text = _main("export", run, "--out", tmp_path / "out")
    _assert_user_error(code, text, "already exists and is not an empty folder")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_a_failure_mid_export_leaves_nothing(run, tmp_path, monkeypatch):
    from pipeline.export import programs

    def half_written(program, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk gone")

    monkeypatch.setattr(programs, "capture", lambda net, example: None)
    monkeypatch.setattr(programs, "save_pt2", half_written)
    from pipeline.export import export_run
    with pytest.raises(RuntimeError, match="disk gone"):
        export_run(str(run), str(tmp_path / "out"), formats=["pt2"])
    assert os.listdir(tmp_path) == []


def test_pt2_alone_needs_no_onnx_packages(run, exported, tmp_path, monkeypatch):
    """--format pt2 without the export extra: the card says no ONNX. The capture is the
    module's (reloaded from its model.pt2) so this does not pay for a second one."""
    from pipeline.export import programs
    first = torch.export.load(str(exported[0] / "model.pt2"))
    monkeypatch.setattr(programs, "capture", lambda net, example: first)
    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)
    code, text = _main("export", run, "--format", "pt2", "--out", tmp_path / "pt2")
    assert code == 0, text
    card = json.loads((tmp_path / "pt2" / "model.json").read_text())
    assert list(card["files"]) == ["pt2"] and card["onnx"] is None and "onnx" not in card["parity"]
    assert sorted(os.listdir(tmp_path / "pt2")) == ["model.json", "model.pt2"]
    assert "ONNX" not in text and "pt2" in text
