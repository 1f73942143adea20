"""`moola-pipeline predict`: the run's own val windows reproduce its recorded val predictions,
bars as CSV and as shards agree, the local and Ray engines agree, MC dropout, staged writes that
publish nothing when killed or failing, several instruments, and every bad input is one clear
error that writes nothing.

One small trained run (synth, `train --workers 0`, 1 epoch, hidden 16) serves the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.errors import UserError
from pipeline.evaluate.windows import decode_runs
from pipeline.predict import Options, predict, read_predictions
from pipeline.predict.job import prepare
from pipeline.predict.model import WindowPredictor
from pipeline.predict.table import decode_batch, fixed_column
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.ray_cluster import _get_head

torch.set_num_threads(1)  # two shared cores: more threads only contend
SMALL = "model:\n  hidden: 16\n  head_width: 16\n"
OUTPUTS = ("type_prob", "span_prob", "countdown_bars", "pointer_center_bars",
           "pointer_length_bars")


def cli(*args) -> tuple[int, str]:
    """`moola-pipeline ARGS` in this process (the console script's `main`): (exit code,
    stderr + stdout). Fast enough to run every bad input through the real command."""
    import contextlib
    import io
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli_main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue() + out.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request, _ray_heads):
    """(root, run, shards, bars.csv): a 1-epoch run on 120 synthetic windows and their bars.
    When this module's Ray test is selected, the session's Ray cluster starts meanwhile (both
    spend most of their time waiting on process start-up)."""
    import threading
    wants_ray = any(item.get_closest_marker("ray") is not None and item.module is request.module
                    for item in request.session.items)
    head = threading.Thread(target=_get_head, args=(_ray_heads, "plain"), daemon=True)
    if wants_ray:
        head.start()
    root = tmp_path_factory.mktemp("predict")
    assert cli("data", "synth", "--out", root / "w", "--windows", "120",
               "--bars-out", root / "bars.csv")[0] == 0
    assert cli("data", "shard", "--in", root / "w", "--out", root / "s")[0] == 0
    (root / "small.yaml").write_text(SMALL)
    proc = run_cli("train", "--workers", "0", "--data", root / "s", "--out", root / "run",
                   "--config", root / "small.yaml", "--epochs", "1", "--batch-size", "16",
                   timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    if wants_ray:
        head.join()
    return root, root / "run", root / "s", root / "bars.csv"


@pytest.fixture(scope="module")
def csv_lines(trained):
    return (trained[3]).read_text().splitlines()


def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def by_window(table: pa.Table) -> pa.Table:
    return table.sort_by([("instrument", "ascending"), ("bar_index", "ascending")])


def assert_same_outputs(a: pa.Table, b: pa.Table, atol=1e-6) -> None:
    assert a.column("bar_index").to_pylist() == b.column("bar_index").to_pylist()
    for name in OUTPUTS:
        width = {"type_prob": 3, "span_prob": 105, "countdown_bars": 105}.get(name)
        x = fixed_column(a, name, width) if width else a.column(name).to_numpy()
        y = fixed_column(b, name, width) if width else b.column(name).to_numpy()
        np.testing.assert_allclose(x, y, rtol=0, atol=atol * (40 if "countdown" in name else 1),
                                   err_msg=name)


# --- the numbers --------------------------------------------------------------------------------

def test_val_shards_reproduce_the_recorded_best_epoch_val_predictions(trained, tmp_path):
    root, run, shards, _ = trained
    manifest = predict(str(run), str(shards), str(tmp_path / "p"))
    windows = read_predictions(str(tmp_path / "p"))
    val = windows.filter(pc.equal(windows["split"], "val")).sort_by("index")
    recorded = np.load(run / "best_val_predictions.npz")
    assert val.column("index").to_pylist() == recorded["index"].tolist()  # the same windows
    np.testing.assert_allclose(fixed_column(val, "span_prob", 105), recorded["span_prob"], atol=1e-6)
    np.testing.assert_allclose(fixed_column(val, "type_prob", 3), recorded["type_prob"], atol=1e-6)
    pointers = np.stack([val["pointer_center_bars"].to_numpy(),
                         val["pointer_length_bars"].to_numpy()], axis=1) / 105
    np.testing.assert_allclose(pointers, recorded["pointers"], atol=1e-6)
    countdown = (fixed_column(val, "countdown_bars", 105) + 20) / 40  # the unit scale it trained on
    np.testing.assert_allclose(countdown, recorded["countdown"], atol=1e-6)
    assert (fixed_column(val, "valid", 105) == recorded["valid"].astype(bool)).all()
    assert manifest["span_threshold"] == pytest.approx(
        json.loads((run / "threshold.json").read_text())["span_threshold"])
    assert manifest["rows"]["windows"] == windows.num_rows == 120


def test_the_same_bars_as_csv_and_as_shards_give_the_same_predictions(trained, tmp_path):
    root, run, _, bars = trained
    code, text = cli("data", "build", "--source", "bars", "--in", bars, "--stride", "13",
                     "--out", tmp_path / "s13")
    assert code == 0, text
    predict(str(run), str(bars), str(tmp_path / "csv"), options=Options(stride=13))
    predict(str(run), str(tmp_path / "s13"), str(tmp_path / "shards"))
    from_csv = by_window(read_predictions(str(tmp_path / "csv")))
    from_shards = by_window(read_predictions(str(tmp_path / "shards")))
    # the shard set left out its embargo windows; every window it kept is a CSV window
    kept = pc.is_in(from_csv["bar_index"], from_shards["bar_index"])
    assert from_shards.num_rows > 0.8 * from_csv.num_rows
    assert_same_outputs(from_csv.filter(kept), from_shards)
    for column in ("first_ts", "last_ts", "pointer_center_ts", "expansions", "valid"):
        assert from_csv.filter(kept).column(column).equals(from_shards.column(column)), column


def test_the_per_bar_table_is_the_mean_over_the_windows_covering_each_bar(trained, tmp_path):
    _, run, _, bars = trained
    threshold = predict(str(run), str(bars), str(tmp_path / "p"),
                        options=Options(stride=13))["span_threshold"]
    windows = by_window(read_predictions(str(tmp_path / "p")))
    per_bar = read_predictions(str(tmp_path / "p"), "bars")
    start = windows.column("bar_index").to_numpy()
    span = fixed_column(windows, "span_prob", 105)
    assert per_bar.num_rows == int(start[-1]) + 105  # every bar some window covers
    for bar in (0, 104, 500, int(start[-1]) + 104):
        covering = (start <= bar) & (bar < start + 105)
        row = per_bar.filter(pc.equal(per_bar["bar_index"], bar)).to_pylist()[0]
        assert row["windows"] == covering.sum() > 0
        assert row["span_prob"] == pytest.approx(span[covering, bar - start[covering]].mean(), abs=1e-6)
        assert row["in_expansion"] == (row["span_prob"] > threshold)


def test_decoded_expansions_are_the_evaluation_decoder_for_every_window():
    rng = np.random.default_rng(0)
    prob = rng.random((300, 105)) * (rng.random((300, 105)) < 0.4)
    valid = rng.random((300, 105)) < 0.9
    counts, first, last = decode_batch(prob, valid, 0.5)
    runs = np.split(np.stack([first, last], 1), np.cumsum(counts)[:-1])
    for i in range(300):
        assert [tuple(r) for r in runs[i].tolist()] == decode_runs(prob[i], valid[i], 0.5)


def test_windows_are_featurized_as_the_training_data_was():
    """Continuous series: bar_features once per bar (as `data shard` does for bars); a run
    trained on moola's inline windows: window_features on each window alone."""
    from pipeline.data import features as feats
    from pipeline.data.shard_dataset import segment_starts
    from pipeline.predict.chunks import FeatureSpec, series_chunks
    from pipeline.predict.inputs import Series
    sys.path.insert(0, str(REPO / "bench"))
    from features import random_walk_bars
    ohlc = random_walk_bars(3000)
    ts = np.arange(3000, dtype=np.int64) * 60_000_000
    ts[1500:] += 3_600_000_000  # a session break: the state restarts there
    series = Series("X", ts, ohlc, np.arange(3000))
    names = tuple(feats.FEATURE_SETS["relativity13"])
    for continuous in (True, False):
        spec = FeatureSpec("relativity13", names, continuous)
        chunks = list(series_chunks(series, spec, stride=7, chunk_windows=100))
        got = np.concatenate([c.windows(spec)[0] for c in chunks])
        starts = np.arange(0, 3000 - 104, 7)
        if continuous:
            bar_feat, bar_valid = feats.bar_features(ohlc, segment_starts(ts))
            want = feats.windows_from_bars(bar_feat, bar_valid, starts, "relativity13")[0]
        else:
            base, _ = feats.window_features(ohlc[starts[:, None] + np.arange(105)])
            want = feats.with_feature_set(base, "relativity13")
        np.testing.assert_array_equal(got, want)
        assert [c.first_bar for c in chunks] == list(starts[::100])


@pytest.mark.ray
def test_local_and_ray_engines_agree(trained, tmp_path, _ray_heads):
    _, run, _, bars = trained
    cluster = _get_head(_ray_heads, "plain")
    predict(str(run), str(bars), str(tmp_path / "local"), options=Options(stride=13))
    proc = run_cli("predict", "--run", run, "--in", bars, "--out", tmp_path / "ray",
                   "--stride", "13", "--engine", "ray", "--address", cluster.address,
                   "--actors", "2", env=cluster.env(), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on ray" in proc.stdout and "windows:" in proc.stderr  # summary and progress
    # Ray's own lines stay off the console; the one Ray 2.60 cannot be told not to print is
    # its C++ core's note on actor restarts (ray#53727)
    noise = [line for line in proc.stderr.splitlines()
             if not line.startswith("windows:") and "core_worker.cc" not in line]
    assert not noise, proc.stderr
    local, on_ray = (by_window(read_predictions(str(tmp_path / p))) for p in ("local", "ray"))
    assert_same_outputs(local, on_ray)
    assert local.column("expansions").equals(on_ray.column("expansions"))
    bars_local, bars_ray = (read_predictions(str(tmp_path / p), "bars") for p in ("local", "ray"))
    assert bars_ray.sort_by("bar_index").equals(bars_local.sort_by("bar_index"))
    assert sorted(os.listdir(tmp_path / "ray")) == ["bars", "manifest.json", "windows"]


# --- MC dropout ----------------------------------------------------------------------------------

def test_mc_dropout(trained, tmp_path):
    _, run, shards, _ = trained
    plan = prepare(str(run), "best", str(shards), str(tmp_path / "x"), Options())
    x = torch.randn(40, 105, 12).numpy()
    net = plan.run.net
    plain = WindowPredictor(net).predict(x)
    for m in net.modules():  # dropout off: one MC sample is the plain prediction
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    once = WindowPredictor(net, mc_samples=1).predict(x)
    for name in plain:
        np.testing.assert_array_equal(once[name], plain[name], err_msg=name)
        assert not once[f"{name}_std"].any()
    manifest = predict(str(run), str(shards), str(tmp_path / "mc"),
                       options=Options(mc_samples=6, seed=3))
    mc = read_predictions(str(tmp_path / "mc"))
    assert manifest["mc_dropout"]["samples"] == 6
    for name, width in (("span_prob_std", 105), ("type_prob_std", 3), ("countdown_bars_std", 105)):
        assert (fixed_column(mc, name, width) > 0).mean() > 0.9, name
    assert (mc.column("pointer_center_bars_std").to_numpy() > 0).all()
    repeat = predict(str(run), str(shards), str(tmp_path / "mc2"), options=Options(mc_samples=6, seed=3))
    assert repeat["rows"] == manifest["rows"]
    assert by_window(read_predictions(str(tmp_path / "mc2"))).column("span_prob").equals(
        by_window(mc).column("span_prob"))  # seeded: the same masks again


# --- staged writes --------------------------------------------------------------------------------

def test_a_killed_job_leaves_no_visible_output(trained, tmp_path):
    _, run, _, bars = trained
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "predict", "--run", str(run), "--in", str(bars),
         "--out", str(out), "--stride", "1"], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    staged = []
    while time.monotonic() < deadline and proc.poll() is None and not staged:
        staged = [p for p in out.glob("_staging/*/windows/*") if ".tmp" in p.name]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged, "the job ended before it had written anything"
    assert sorted(os.listdir(out)) == ["_staging"]  # no manifest, no windows/, no bars/
    with pytest.raises(UserError, match="no complete prediction"):
        read_predictions(str(out))
    # the next run publishes normally beside the leftover scratch, and points it out
    manifest = predict(str(run), str(bars), str(out), options=Options(stride=52))
    assert read_predictions(str(out)).num_rows == manifest["rows"]["windows"] > 0
    assert any("of stopped jobs" in note for note in manifest["notes"])


def test_a_failure_while_publishing_leaves_no_manifest_and_no_mix(trained, tmp_path, monkeypatch):
    _, run, _, bars = trained
    out = tmp_path / "out"
    first = predict(str(run), str(bars), str(out), options=Options(stride=52))
    from pipeline.predict import output
    real_move, moved = output._move, []

    def move_then_fail(src, dst):
        if moved:
            raise OSError("disk went away")
        moved.append(dst)
        real_move(src, dst)
    monkeypatch.setattr(output, "_move", move_then_fail)
    with pytest.raises(OSError):
        predict(str(run), str(bars), str(out), options=Options(stride=26))
    assert not (out / "manifest.json").exists()      # the old prediction is withdrawn, ...
    assert not (out / "_staging").exists()           # ... the staging prefix is gone,
    with pytest.raises(UserError, match="no complete prediction"):
        read_predictions(str(out))                   # and a reader sees no (mixed) data
    monkeypatch.setattr(output, "_move", real_move)
    second = predict(str(run), str(bars), str(out), options=Options(stride=26))
    assert read_predictions(str(out)).num_rows == second["rows"]["windows"] > first["rows"]["windows"]
    listed = {f["path"].split("/")[1] for f in second["files"]}
    assert set(os.listdir(out / "windows")) | set(os.listdir(out / "bars")) == listed


# --- several instruments ---------------------------------------------------------------------------

def test_several_instruments_in_one_file(trained, csv_lines, tmp_path):
    _, run, _, _ = trained
    head, rows = csv_lines[0], csv_lines[1:]
    a, b = rows[:400], rows[1000:1300]
    mixed = [f"symbol,{head}"]
    for i in range(400):  # interleaved, as a file sorted by time across instruments is
        mixed.append(f"NQ,{a[i]}")
        if i < 300:
            mixed.append(f"ES,{b[i]}")
    path = write_lines(tmp_path / "two.csv", mixed)
    predict(str(run), path, str(tmp_path / "two"), options=Options(stride=10))
    both = read_predictions(str(tmp_path / "two"))
    assert set(both.column("instrument").to_pylist()) == {"NQ", "ES"}
    for name, lines in (("NQ", a), ("ES", b)):
        alone = write_lines(tmp_path / f"{name}.csv", [head, *lines])
        predict(str(run), alone, str(tmp_path / name), options=Options(stride=10))
        single = by_window(read_predictions(str(tmp_path / name)))
        assert_same_outputs(by_window(both.filter(pc.equal(both["instrument"], name))), single)
    # a duplicate inside one instrument is named by its line in the file
    mixed[6] = mixed[4]  # NQ's third bar again, on line 7
    code, text = cli("predict", "--run", run, "--in", write_lines(tmp_path / "dup.csv", mixed),
                     "--out", tmp_path / "dup")
    assert code == 2 and "dup.csv" in text and "duplicate timestamp" in text and "line 7" in text, text
    assert not (tmp_path / "dup").exists()


# --- bad input ----------------------------------------------------------------------------------------

def _bad_csv(lines, case: str) -> list[str]:
    head, rows = lines[0], list(lines[1:301])
    if case == "missing-column":
        return [head.replace(",close", "")] + [r.rsplit(",", 1)[0] for r in rows]
    if case == "nan":
        rows[9] = rows[9].rsplit(",", 1)[0] + ",nan"
    if case == "inf":
        rows[9] = rows[9].rsplit(",", 1)[0] + ",inf"
    if case == "non-positive":
        ts, *prices = rows[9].split(",")
        rows[9] = ",".join([ts, "0", *prices[1:]])
    if case == "out-of-order":
        rows[9], rows[10] = rows[10], rows[9]
    if case == "duplicate":
        rows[10] = rows[9]
    if case == "short":
        rows = rows[:100]
    if case == "five-minute":
        rows = list(lines[1:2001:5])
    return [head, *rows]


BAD_BARS = {  # case: needles in the one error line (line 11 = data row 9, the header is line 1)
    "missing-column": ["bad.csv", "missing column close", "found: timestamp, open, high, low"],
    "nan": ["bad.csv", "NaN or inf price", "line 11 (data row 9)"],
    "inf": ["bad.csv", "NaN or inf price", "line 11 (data row 9)"],
    "non-positive": ["bad.csv", "non-positive price", "line 11 (data row 9)"],
    "out-of-order": ["bad.csv", "earlier than the previous row", "line 12 (data row 10)"],
    "duplicate": ["bad.csv", "duplicate timestamp", "line 12 (data row 10)"],
    "short": ["bad.csv", "100 bars, fewer than one 105-bar window"],
    "five-minute": ["bad.csv", "5 min apart", "trained on 1 min bars", "--allow-frequency-change",
                    "line 2 to line 3"],
}


@pytest.mark.parametrize("case", list(BAD_BARS))
def test_bad_bars_are_one_clear_error_and_write_nothing(case, trained, csv_lines, tmp_path):
    _, run, _, _ = trained
    path = write_lines(tmp_path / "bad.csv", _bad_csv(csv_lines, case))
    code, text = cli("predict", "--run", run, "--in", path, "--out", tmp_path / "out",
                     "--stride", "1")
    assert code == 2, text
    assert "Traceback" not in text and len([l for l in text.splitlines() if l.startswith("error:")]) == 1
    for needle in BAD_BARS[case]:
        assert needle in text, f"{needle!r} not in {text}"
    assert not (tmp_path / "out").exists()


def test_another_frequency_is_allowed_when_asked_and_said(trained, csv_lines, tmp_path):
    _, run, _, _ = trained
    path = write_lines(tmp_path / "m5.csv", _bad_csv(csv_lines, "five-minute"))
    code, text = cli("predict", "--run", run, "--in", path, "--out", tmp_path / "out",
                     "--allow-frequency-change")
    assert code == 0, text
    assert "note:" in text and "5 min apart" in text and "--allow-frequency-change" in text
    assert read_predictions(str(tmp_path / "out")).num_rows == 6


def test_a_run_without_a_checkpoint_and_unknown_features_are_clear_errors(trained, tmp_path):
    root, run, shards, bars = trained
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("checkpoint_*"))
    for checkpoint, needle in (("best", "no whole checkpoint checkpoint_e0001"),
                               ("latest", "no whole checkpoint (train it first")):
        code, text = cli("predict", "--run", bare, "--checkpoint", checkpoint, "--in", bars,
                         "--out", tmp_path / "out")
        assert code == 2 and needle in text and str(bare) in text and "Traceback" not in text, text
    code, text = cli("data", "build", "--source", "bars", "--in", bars, "--features",
                     "relativity13", "--out", tmp_path / "s13")
    assert code == 0, text
    code, text = cli("predict", "--run", run, "--in", tmp_path / "s13", "--out", tmp_path / "out")
    assert code == 2 and "are not the features the run was trained on" in text, text
    assert "s13/manifest.json" in text and "position" in text
    code, text = cli("predict", "--run", run, "--in", tmp_path / "nowhere.csv", "--out",
                     tmp_path / "out")
    assert code == 2 and "nowhere.csv: not found" in text, text
    code, text = cli("predict", "--run", run, "--in", bars, "--out", tmp_path / "out",
                     "--stride", "0")
    assert code == 2 and "--stride 0: must be at least 1" in text, text
    code, text = cli("predict", "--run", run, "--in", shards, "--out", run)
    assert code == 2 and "that is the run directory" in text, text
    assert not (tmp_path / "out").exists()
