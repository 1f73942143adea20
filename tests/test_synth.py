"""`data synth`: a deterministic, realistic and learnable synthetic data set."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import schema, splits, synth
from tests.fixtures.cli import run_cli


@pytest.fixture(scope="module")
def big():
    """Enough windows for the label statistics to be stable (library call: fast)."""
    return synth.synthesize(3000, seed=7)


def test_synth_writes_a_valid_data_set(tmp_path):
    out = tmp_path / "w"
    proc = run_cli("data", "synth", "--out", out, "--windows", "50", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 50 windows" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["bars.parquet", "windows.parquet"]
    ws = schema.read_dataset(str(out))       # validates every contract of the canonical set
    assert len(ws) == 50
    assert ws.windows.schema.remove_metadata().equals(schema.WINDOWS_SCHEMA)
    assert ws.meta["seed"] == 0 and ws.meta["version"] == schema.SCHEMA_VERSION
    labels = ws.column("label")
    assert set(labels.tolist()) == {0, 1}
    # windows are cut from the series: t0 is the timestamp of bar `bar_index`
    bar_time = ws.bars.column("timestamp").to_numpy()
    np.testing.assert_array_equal(ws.windows.column("t0").to_numpy(), bar_time[ws.bar_index()])
    assert ws.windows.column("ohlc").null_count == 50


def test_prices_look_like_nq(big):
    ohlc = big.ohlc
    assert 14_000 < ohlc.min() and ohlc.max() < 21_000
    np.testing.assert_array_equal(ohlc / synth.TICK, np.round(ohlc / synth.TICK))  # on the tick grid
    o, h, lo, c = ohlc.T
    assert (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all()
    assert (h > lo).mean() > 0.9                                  # bars have ranges
    step = np.diff(big.timestamps).astype("timedelta64[m]").astype(int)
    assert set(np.unique(step)) == {1, 61}                        # 1-minute bars, session breaks
    per_bar = np.abs(np.diff(np.log(ohlc[:, 3])))
    assert 0.0001 < np.median(per_bar) < 0.001                    # NQ-like 1-minute moves


def test_label_statistics_match_the_real_labels(big):
    start, end = big.expansion.T
    length = end - start + 1
    assert 6.0 < length.mean() < 8.5                              # real: mean 7.1
    assert 4 <= np.median(length) <= 6                            # real: median 5
    assert length.min() == 1 and 25 <= length.max() <= 40
    in_span = length.sum() / (len(length) * schema.WINDOW)
    assert 0.055 < in_span < 0.085                                # real: 7.1%
    assert start.min() == 0 and start.max() == 101 and end.max() <= 104
    assert 0.40 < big.labels.mean() < 0.50                        # ~55/45 consolidation/retracement


def test_the_labels_are_learnable(big):
    """The signal a BiLSTM needs is there: expansions are fast directional moves, consolidations
    are quieter than retracements, and retracements drift against the coming expansion."""
    close = big.ohlc[:, 3]
    ret = np.diff(np.log(close), prepend=np.log(close[0]))
    bars = big.starts[:, None] + np.arange(schema.WINDOW)
    window_ret = ret[bars]                                        # [n, 105]
    pos = np.arange(schema.WINDOW)
    start, end = big.expansion[:, :1], big.expansion[:, 1:]
    in_span = (pos >= start) & (pos <= end)
    before = pos < start
    assert np.abs(window_ret[in_span]).mean() > 2.5 * np.abs(window_ret[~in_span]).mean()
    direction = np.sign([window_ret[i][in_span[i]].sum() for i in range(len(start))])
    pre_vol = np.array([window_ret[i][before[i]].std() if before[i].sum() > 5 else np.nan
                        for i in range(len(start))])
    pre_drift = np.array([(window_ret[i][before[i]] * direction[i]).mean() if before[i].sum() > 5
                          else np.nan for i in range(len(start))])
    cons, retr = big.labels == 0, big.labels == 1
    assert np.nanmedian(pre_vol[cons]) < 0.7 * np.nanmedian(pre_vol[retr])
    assert np.nanmean(pre_drift[retr]) < 0 < np.nanmean(pre_drift[cons]) + 1e-4


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = synth.synthesize(40, 3), synth.synthesize(40, 3), synth.synthesize(40, 4)
    assert a.windows.windows.equals(b.windows.windows) and a.windows.bars.equals(b.windows.bars)
    assert not np.array_equal(a.ohlc[:1000], c.ohlc[:1000])
    assert not np.array_equal(a.expansion, c.expansion)


def test_windows_never_share_bars_so_50_split_exactly_40_10():
    syn = synth.synthesize(50, 0)
    assert (np.diff(syn.starts) >= schema.WINDOW).all()
    split, report = splits.assign_splits(syn.timestamps[syn.starts], syn.windows.windows
                                         .column("group_id").to_pylist(), bar_index=syn.starts)
    assert report.counts == {"train": 40, "val": 10, "test": 0, "embargo": 0}
    assert splits.check_leakage(split, np.arange(50), bar_index=syn.starts).ok


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_bars_out_round_trips_through_bars_ingest(tmp_path, suffix):
    bars = tmp_path / "raw" / f"bars.{suffix}"
    proc = run_cli("data", "synth", "--out", tmp_path / "w", "--windows", "12", "--seed", "5",
                   "--bars-out", bars)
    assert proc.returncode == 0, proc.stderr
    labels = tmp_path / "raw" / "labels.csv"
    assert labels.exists() and labels.read_text().startswith(
        "window_id,start,label,expansion_start,expansion_end\n")
    proc = run_cli("data", "ingest", "--format", "bars", "--in", bars, "--labels", labels,
                   "--out", tmp_path / "w2")
    assert proc.returncode == 0, proc.stderr
    a, b = schema.read_dataset(str(tmp_path / "w")), schema.read_dataset(str(tmp_path / "w2"))
    assert a.windows.equals(b.windows)             # same ids, t0, bar_index, labels, spans
    assert a.bars.equals(b.bars)
    if suffix == "parquet":
        assert pq.read_schema(bars).names == ["timestamp", "open", "high", "low", "close"]


def test_bad_synth_flags_are_user_errors(tmp_path):
    from tests.fixtures.cli import assert_user_error

    proc = run_cli("data", "synth", "--out", tmp_path / "w", "--bars-out", tmp_path / "bars.txt")
    assert_user_error(proc, "--bars-out", ".csv or .parquet")
    assert not (tmp_path / "w").exists()
    proc = run_cli("data", "synth", "--out", tmp_path / "w", "--windows", "0")
    assert proc.returncode != 0 and "--windows" in proc.stderr and "Traceback" not in proc.stderr
