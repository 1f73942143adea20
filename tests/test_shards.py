"""`data shard/validate/inspect/build` end to end on local paths, and the shard writer's promises."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import features as feats
from pipeline.data import schema
from pipeline.data.loader import ShardLoader
from pipeline.data.manifest import load_manifest
from pipeline.data.shard_dataset import read_windows, segment_starts, shard_dataset
from pipeline.data.shards import random_chunks, write_shard_set
from pipeline.data.synth import synthesize
from pipeline.errors import UserError
from tests.fixtures.cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def synth50(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "w")
    proc = run_cli("data", "synth", "--out", out, "--windows", "50", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    return out


def test_synth_50_then_shard_gives_40_10_and_validates(synth50, tmp_path):
    out = str(tmp_path / "s")
    proc = run_cli("data", "shard", "--in", synth50, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "train 40, val 10" in proc.stdout
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["splits"] == {"train": 40, "val": 10}
    assert manifest["features"] == feats.FEATURE_SETS["relativity12"]
    assert manifest["window"] == 105 and manifest["schema_version"] == 1
    assert manifest["split_policy"]["policy"] == "time"
    assert manifest["seed"] == 0 and manifest["source"]["uri"] == synth50
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}
    assert sorted(os.listdir(out)) == ["manifest.json", "train-00000.parquet", "val-00000.parquet"]

    proc = run_cli("data", "validate", out)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "sha256 verified" in proc.stdout

    proc = run_cli("data", "inspect", out)
    assert proc.returncode == 0, proc.stderr
    for needle in ("train", "val", "40", "10", "in-span", "open_norm", "consol_proxy",
                   "train-00000.parquet", manifest["shards"][0]["sha256"][:16]):
        assert needle in proc.stdout, needle


def test_shards_hold_the_features_of_the_continuous_bar_series(synth50, tmp_path):
    out = str(tmp_path / "s")
    shard_dataset(synth50, out)
    ws = schema.read_dataset(synth50)
    # features run once over the bar series, restarting at session breaks (60-minute gaps)
    ts = ws.bars.column("timestamp").cast(pa.int64()).to_numpy()
    sessions = segment_starts(ts)
    assert sessions.sum() == 1 + (np.diff(ts) > 10 * 60_000_000).sum() > 1
    bar_feat, bar_valid = feats.bar_features(ws.bar_ohlc(), sessions)
    table = pq.read_table(os.path.join(out, "train-00000.parquet"))
    meta = json.loads(table.schema.metadata[b"moola.shard"])
    assert meta["features"] == feats.FEATURE_SETS["relativity12"] and meta["dtype"] == "float32"
    assert table.schema.field("features").type == pa.binary(105 * 12 * 4)
    ids = table.column("window_id").to_pylist()
    rows = [ws.windows.column("window_id").to_pylist().index(i) for i in ids]
    starts = ws.column("bar_index")[rows]
    want, want_valid = feats.windows_from_bars(bar_feat, bar_valid, starts)
    got = np.frombuffer(table.column("features").combine_chunks().buffers()[1], np.float32)
    np.testing.assert_array_equal(got.reshape(-1, 105, 12), want)
    valid = np.frombuffer(table.column("valid").combine_chunks().buffers()[1], np.uint8)
    np.testing.assert_array_equal(valid.reshape(-1, 105).astype(bool), want_valid)
    assert table.column("index").to_pylist() == list(range(40))
    np.testing.assert_array_equal(table.column("label").to_numpy(), ws.column("label")[rows])
    ohlc = np.frombuffer(table.column("ohlc").combine_chunks().buffers()[1], np.float32)
    np.testing.assert_allclose(ohlc.reshape(-1, 105, 4),
                               ws.bar_ohlc()[starts[:, None] + np.arange(105)], rtol=1e-6)


def test_inline_windows_use_window_features_and_relativity13(tmp_path):
    syn = synthesize(30, seed=3)
    ohlc = syn.windows.ohlc()
    ids = [f"w{i}" for i in range(30)]
    table = schema.windows_table(ids, [f"g{i // 3}" for i in range(30)], ohlc=ohlc,
                                 label=syn.labels, expansion_start=syn.expansion[:, 0],
                                 expansion_end=syn.expansion[:, 1])
    schema.write_dataset(str(tmp_path / "w"), schema.WindowSet(table, None, {}), source={"t": 1})
    manifest = shard_dataset(str(tmp_path / "w"), str(tmp_path / "s"), feature_set="relativity13")
    assert manifest["split_policy"]["policy"] == "group"  # no times: whole groups per split
    assert len(manifest["features"]) == 13 and manifest["features"][-1] == "position"
    loader = ShardLoader(str(tmp_path / "s"), "train", batch_size=64, verify=True)
    batch = next(iter(loader))
    base, valid = feats.window_features(ohlc)
    train_ids = pq.read_table(str(tmp_path / "s" / "train-00000.parquet"),
                              columns=["window_id", "index"]).to_pydict()
    by_index = dict(zip(train_ids["index"], train_ids["window_id"]))
    for k, idx in enumerate(batch["index"].tolist()):
        row = ids.index(by_index[idx])
        np.testing.assert_array_equal(batch["features"][k, :, :12].numpy(), base[row])
        np.testing.assert_array_equal(batch["valid"][k].numpy(), valid[row])
    np.testing.assert_allclose(batch["features"][0, :, 12].numpy(), np.arange(105) / 104)


def test_many_small_shards_and_row_groups(synth50, tmp_path):
    out = str(tmp_path / "s")
    proc = run_cli("data", "shard", "--in", synth50, "--out", out, "--rows-per-shard", "7",
                   "--val-fraction", "0.2", "--test-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    assert manifest["splits"]["test"] == 10 and manifest["splits"]["val"] + manifest["splits"]["train"] < 40 + 1
    assert all(s["rows"] <= 7 for s in manifest["shards"])
    for split, n in manifest["splits"].items():
        loader = ShardLoader(out, split, batch_size=4)
        seen = np.concatenate([b["index"].numpy() for b in loader])
        assert sorted(seen.tolist()) == list(range(n))
    assert run_cli("data", "validate", out).returncode == 0


def test_build_chains_synth_and_shard(tmp_path):
    out = str(tmp_path / "s")
    proc = run_cli("data", "build", "--out", out, "--windows", "30", "--seed", "1",
                   "--features", "relativity13")
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    assert manifest["splits"] == {"train": 24, "val": 6} and len(manifest["features"]) == 13
    assert os.path.exists(os.path.join(out, "windows", "windows.parquet"))
    assert run_cli("data", "validate", out).returncode == 0


def test_a_failed_write_publishes_nothing(tmp_path):
    out = str(tmp_path / "s")
    write_shard_set(out, ["a", "b"], random_chunks(100, 2, "train"), rows_per_shard=40,
                    row_group_rows=8)
    first = load_manifest(out)

    def crashing():
        yield from random_chunks(100, 2, "train", chunk_rows=30, seed=5)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_shard_set(out, ["a", "b"], crashing(), rows_per_shard=40, row_group_rows=8)
    # the old manifest was withdrawn before any shard was replaced; no temporaries remain
    assert "manifest.json" not in os.listdir(out)
    assert [n for n in os.listdir(out) if ".tmp-" in n] == []
    proc = run_cli("data", "validate", out)
    assert proc.returncode != 0 and "manifest.json" in proc.stderr
    # a complete rewrite with fewer shards removes the stale ones
    write_shard_set(out, ["a", "b"], random_chunks(50, 2, "train"), rows_per_shard=40,
                    row_group_rows=8)
    assert sorted(os.listdir(out)) == ["manifest.json", "train-00000.parquet", "train-00001.parquet"]
    assert load_manifest(out)["splits"] == {"train": 50} != first["splits"]


def test_validate_reports_every_problem_of_every_shard_at_once(tmp_path):
    """NaN features, out-of-range labels and a group in two splits: all named in one error."""
    def chunks():
        for split, cols in random_chunks(20, 3, "train", seed=1):
            cols["features"][3, 5, 1] = np.nan
            cols["features"][7, 0, 0] = np.inf
            cols["label"][4] = 5
            cols["expansion_start"][6], cols["expansion_end"][6] = 50, 40
            yield split, cols
        for split, cols in random_chunks(10, 3, "val", seed=2):
            cols["window_id"] = [f"v{i}" for i in range(10)]
            cols["group_id"][0] = "g0"  # train's first group
            yield split, cols

    out = str(tmp_path / "s")
    write_shard_set(out, ["a", "b", "c"], chunks(), rows_per_shard=8, row_group_rows=4)
    proc = run_cli("data", "validate", out)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    for needle in ("train-00000.parquet row group 0: 1 row (index 3) with NaN/inf features",
                   "train-00000.parquet row group 1: 1 row (index 7) with NaN/inf features",
                   "train-00000.parquet row group 1: 1 row (index 4) with label other than",
                   "train-00000.parquet row group 1: 1 row (index 6) with expansion_start > expansion_end",
                   "split 'train' has 2 NaN/inf feature values"):
        assert needle in proc.stderr, (needle, proc.stderr)

    # the same set without the row problems: only the leak remains, and it is named
    def leaky():
        yield from random_chunks(20, 3, "train", seed=1)
        for split, cols in random_chunks(10, 3, "val", seed=2):
            cols["window_id"] = [f"v{i}" for i in range(10)]
            cols["group_id"] = ["g0"] + [f"val-group-{i}" for i in range(1, 10)]
            yield split, cols

    write_shard_set(out, ["a", "b", "c"], leaky(), rows_per_shard=8, row_group_rows=4)
    proc = run_cli("data", "validate", out)
    assert proc.returncode != 0 and "leakage between splits" in proc.stderr
    assert "'g0'" in proc.stderr and "is in more than one split" in proc.stderr
    assert "'g1'" not in proc.stderr


def test_read_windows_matches_the_schema_reader_without_reading_ohlc(synth50, tmp_path):
    ws, reference = read_windows(synth50), schema.read_dataset(synth50)
    assert ws.windows.column_names == reference.windows.column_names
    assert ws.windows.to_pylist() == reference.windows.to_pylist()
    assert ws.bars.equals(reference.bars) and ws.meta == reference.meta
    # a broken windows file is still refused whole, naming the file and the rows
    table = reference.windows.set_column(
        reference.windows.schema.get_field_index("bar_index"), "bar_index",
        pa.array([10**9] + [0] * 49, pa.int64()))
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table, bad / "windows.parquet")
    pq.write_table(reference.bars, bad / "bars.parquet")
    with pytest.raises(UserError, match=r"windows.parquet: .*bar_index outside .*row 0"):
        read_windows(str(bad))


def test_build_from_a_bar_series_and_labels(tmp_path):
    bars = str(tmp_path / "raw" / "bars.parquet")
    assert run_cli("data", "synth", "--out", str(tmp_path / "w0"), "--windows", "20",
                   "--bars-out", bars).returncode == 0
    out = str(tmp_path / "s")
    proc = run_cli("data", "build", "--source", "bars", "--in", bars, "--labels",
                   str(tmp_path / "raw" / "labels.csv"), "--out", out)
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    assert manifest["splits"] == {"train": 16, "val": 4}
    assert manifest["source"]["format"] == "bars" and manifest["split_policy"]["key"] == "bar_index"
    # the same windows as sharding the synthetic set directly: bars+labels ingest loses nothing
    direct = shard_dataset(str(tmp_path / "w0"), str(tmp_path / "direct"))
    a = ShardLoader(out, "train", batch_size=16, shuffle=False)
    b = ShardLoader(str(tmp_path / "direct"), "train", batch_size=16, shuffle=False)
    assert direct["splits"] == manifest["splits"]
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key].numpy(), y[key].numpy())
    assert_user_error(run_cli("data", "build", "--source", "bars", "--out", out), "--in")
