"""`data ingest`: moola's labeled Parquet and bar series (+ labels CSV) into canonical windows."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import schema, synth
from tests.fixtures.cli import run_cli


# --- builders shared with the bad-input tests ------------------------------------------------

def valid_ohlc(n: int, seed: int = 0) -> np.ndarray:
    """n windows of valid OHLC [n,105,4] cut from a synthetic series."""
    syn = synth.synthesize(n, seed)
    return syn.ohlc[syn.starts[:, None] + np.arange(schema.WINDOW)]


def moola_rows(n: int = 4, seed: int = 0) -> dict:
    """Columns of a valid moola labeled file (features as 105 [o,h,l,c] lists)."""
    ohlc = valid_ohlc(n, seed)
    return {
        "window_id": [f"{i}_exp_1" for i in range(n)],
        "features": [[list(bar) for bar in w] for w in ohlc],
        "label": ["consolidation" if i % 2 == 0 else "retracement" for i in range(n)],
        "expansion_start": [10 + i for i in range(n)],
        "expansion_end": [15 + i for i in range(n)],
    }


def write_moola(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def bars_columns(n_windows: int = 6, seed: int = 0):
    """(bar columns with ISO timestamps, labels columns) from synth, both as text like a CSV."""
    syn = synth.synthesize(n_windows, seed)
    stamps = [str(t.astype("datetime64[s]")) + "Z" for t in syn.timestamps]
    bars = {"timestamp": stamps}
    bars.update({c: syn.ohlc[:, i].tolist() for i, c in enumerate(schema.OHLC_COLUMNS)})
    return bars, synth.labels_rows(syn)


def write_csv(path, columns: dict) -> str:
    lines = [",".join(columns)]
    lines += [",".join("" if v is None else str(v) for v in row) for row in zip(*columns.values())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --- moola -------------------------------------------------------------------------------------

def test_moola_nested_lists_with_overlap_copies(tmp_path):
    cols = moola_rows(5)
    cols["window_id"] = ["7_exp_1_offset0", "7_exp_1_offset+52", "7_exp_1_offset-52", "9_exp_2", "x"]
    cols["base_window_id"] = [None, None, None, "9_exp_2", "base-x"]
    cols["start_ts"] = pa.array((np.datetime64("2024-03-01T14:30") + np.arange(5) * np.timedelta64(1, "D")).astype("datetime64[us]"))
    cols["quality"] = ["A", "B", "auto", "auto", "C"]
    src = write_moola(tmp_path / "moola.parquet", cols)
    proc = run_cli("data", "ingest", "--format", "moola", "--in", src, "--out", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 5 windows" in proc.stdout and "ignored columns: quality" in proc.stdout
    ws = schema.read_dataset(str(tmp_path / "w"))
    assert ws.bars is None and not (tmp_path / "w" / "bars.parquet").exists()
    # overlap copies of one annotation share a group: they can never straddle a split
    assert ws.windows.column("group_id").to_pylist() == ["7_exp_1"] * 3 + ["9_exp_2", "base-x"]
    np.testing.assert_array_equal(ws.ohlc(), valid_ohlc(5))
    assert ws.column("label").tolist() == [0, 1, 0, 1, 0]
    assert ws.column("expansion_start").tolist() == [10, 11, 12, 13, 14]
    assert ws.column("expansion_end").tolist() == [15, 16, 17, 18, 19]
    t0 = ws.windows.column("t0")
    assert t0.type == schema.TIMESTAMP and str(t0[0].as_py()) == "2024-03-01 14:30:00+00:00"


def test_moola_flat_420_floats(tmp_path):
    cols = moola_rows(3)
    cols["features"] = [list(w.reshape(-1)) for w in valid_ohlc(3)]
    src = write_moola(tmp_path / "flat.parquet", cols)
    proc = run_cli("data", "ingest", "--format", "moola", "--in", src, "--out", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    ws = schema.read_dataset(str(tmp_path / "w"))
    np.testing.assert_array_equal(ws.ohlc(), valid_ohlc(3))
    assert ws.windows.column("group_id").to_pylist() == cols["window_id"]
    assert ws.windows.column("t0").null_count == 3


def test_moola_unlabeled_rows_stay_unlabeled(tmp_path):
    cols = moola_rows(2)
    cols["label"] = ["retracement", None]
    cols["expansion_start"] = [3, None]
    cols["expansion_end"] = [9, None]
    src = write_moola(tmp_path / "m.parquet", cols)
    assert run_cli("data", "ingest", "--format", "moola", "--in", src, "--out", tmp_path / "w").returncode == 0
    ws = schema.read_dataset(str(tmp_path / "w"))
    assert ws.windows.column("label").to_pylist() == [1, None]
    assert ws.windows.column("expansion_end").to_pylist() == [9, None]


# --- bars --------------------------------------------------------------------------------------

def test_bars_without_labels_cut_unlabeled_windows_every_stride(tmp_path):
    bars, _ = bars_columns(4)
    src = write_csv(tmp_path / "bars.csv", bars)
    n = len(bars["timestamp"])
    for stride, expected in ((None, (n - 105) // 52 + 1), ("30", (n - 105) // 30 + 1)):
        out = tmp_path / f"w{stride}"
        args = ["data", "ingest", "--format", "bars", "--in", src, "--out", out]
        proc = run_cli(*args, *(["--stride", stride] if stride else []))
        assert proc.returncode == 0, proc.stderr
        ws = schema.read_dataset(str(out))
        assert len(ws) == expected
        step = int(stride or 52)
        np.testing.assert_array_equal(ws.bar_index(), np.arange(expected) * step)
        assert ws.windows.column("label").null_count == expected
        assert ws.bars.num_rows == n


def test_bars_parquet_naive_times_are_utc_volume_ignored_integer_starts(tmp_path):
    syn = synth.synthesize(5, 2)
    naive = syn.timestamps.astype("datetime64[us]")           # tz-naive: read as UTC wall time
    table = pa.table({"timestamp": naive, **{c: syn.ohlc[:, i] for i, c in
                                             enumerate(schema.OHLC_COLUMNS)},
                      "volume": np.arange(len(naive))})
    pq.write_table(table, tmp_path / "bars.parquet")
    labels = synth.labels_rows(syn)
    labels["start"] = syn.starts.tolist()                      # integer bar indices
    labels["group_id"] = ["g1", "g1", "g2", "g3", "g3"]
    write_csv(tmp_path / "labels.csv", labels)
    proc = run_cli("data", "ingest", "--format", "bars", "--in", tmp_path / "bars.parquet",
                   "--labels", tmp_path / "labels.csv", "--out", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    assert "ignored" not in proc.stdout                         # volume is optional, not "extra"
    ws = schema.read_dataset(str(tmp_path / "w"))
    assert ws.windows.column("group_id").to_pylist() == ["g1", "g1", "g2", "g3", "g3"]
    np.testing.assert_array_equal(ws.bar_index(), syn.starts)
    assert ws.windows.column("t0").to_pylist() == syn.windows.windows.column("t0").to_pylist()


def test_bar_timestamps_with_offsets_become_utc(tmp_path):
    bars, labels = bars_columns(2)
    # the same instants written in New York time (UTC-5 in January)
    bars["timestamp"] = [str((np.datetime64(t[:-1]) - np.timedelta64(5, "h"))) + "-05:00"
                         for t in bars["timestamp"]]
    write_csv(tmp_path / "bars.csv", bars)
    write_csv(tmp_path / "labels.csv", labels)                  # starts given in UTC ("Z")
    proc = run_cli("data", "ingest", "--format", "bars", "--in", tmp_path / "bars.csv",
                   "--labels", tmp_path / "labels.csv", "--out", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    ws = schema.read_dataset(str(tmp_path / "w"))
    ref = synth.synthesize(2, 0)
    assert ws.bars.column("timestamp").equals(ref.windows.bars.column("timestamp"))
    np.testing.assert_array_equal(ws.bar_index(), ref.starts)


def test_extra_columns_are_named_as_ignored(tmp_path):
    bars, _ = bars_columns(2)
    bars["symbol"] = ["NQ"] * len(bars["timestamp"])
    src = write_csv(tmp_path / "bars.csv", bars)
    proc = run_cli("data", "ingest", "--format", "bars", "--in", src, "--out", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    assert "ignored columns: symbol" in proc.stdout


def test_flags_that_do_not_fit_the_format_are_refused(tmp_path):
    from tests.fixtures.cli import assert_user_error

    src = write_moola(tmp_path / "m.parquet", moola_rows(2))
    proc = run_cli("data", "ingest", "--format", "moola", "--in", src, "--out", tmp_path / "w",
                   "--stride", "10")
    assert_user_error(proc, "--stride")
    proc = run_cli("data", "ingest", "--format", "moola", "--in", tmp_path / "nope.parquet",
                   "--out", tmp_path / "w")
    assert_user_error(proc, "nope.parquet", "not found")
    assert not (tmp_path / "w").exists()


@pytest.mark.s3
def test_synth_and_ingest_read_and_write_s3(tmp_path, s3_bucket, monkeypatch):
    env = s3_bucket.env
    bars_uri = f"{s3_bucket.uri}/raw/bars.csv"
    proc = run_cli("data", "synth", "--out", f"{s3_bucket.uri}/synth", "--windows", "8",
                   "--seed", "1", "--bars-out", bars_uri, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("data", "ingest", "--format", "bars", "--in", bars_uri, "--labels",
                   f"{s3_bucket.uri}/raw/labels.csv", "--out", f"{s3_bucket.uri}/ingested", env=env)
    assert proc.returncode == 0, proc.stderr
    assert s3_bucket.keys() == ["ingested/bars.parquet", "ingested/windows.parquet",
                                "raw/bars.csv", "raw/labels.csv",
                                "synth/bars.parquet", "synth/windows.parquet"]
    src = write_moola(tmp_path / "m.parquet", moola_rows(3))
    proc = run_cli("data", "ingest", "--format", "moola", "--in", src,
                   "--out", f"{s3_bucket.uri}/moola", env=env)
    assert proc.returncode == 0, proc.stderr
    s3_bucket.use(monkeypatch)
    a = schema.read_dataset(f"{s3_bucket.uri}/synth")
    b = schema.read_dataset(f"{s3_bucket.uri}/ingested")
    assert a.windows.equals(b.windows) and len(a) == 8
    assert len(schema.read_dataset(f"{s3_bucket.uri}/moola")) == 3


def test_replacing_a_data_set_leaves_no_stale_bar_series(tmp_path):
    out = tmp_path / "w"
    assert run_cli("data", "synth", "--out", out, "--windows", "3").returncode == 0
    src = write_moola(tmp_path / "m.parquet", moola_rows(2))
    proc = run_cli("data", "ingest", "--format", "moola", "--in", src, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["windows.parquet"]
    assert len(schema.read_dataset(str(out))) == 2


def test_reading_a_damaged_canonical_data_set_names_the_rows(tmp_path):
    """`data shard` reads through read_dataset: a hand-edited windows.parquet is refused whole."""
    from pipeline.errors import UserError

    syn = synth.synthesize(6, 0)
    t = syn.windows.windows
    label = pa.array([0, 1, 3, 0, None, 1], pa.int8())
    bar_index = pa.array(syn.starts.tolist()[:5] + [10**6], pa.int64())
    t = t.set_column(t.schema.get_field_index("label"), "label", label)
    t = t.set_column(t.schema.get_field_index("bar_index"), "bar_index", bar_index)
    bad = schema.WindowSet(t, syn.windows.bars, {})
    with pytest.raises(UserError) as info:
        schema.validate(bad, "w/windows.parquet")
    msg = info.value.format_message()
    assert msg.startswith("w/windows.parquet: 3 problems")
    assert "label other than 0 or 1: row 2" in msg
    assert "expansion_start/expansion_end but no label: row 4" in msg
    assert "bar_index outside" in msg and "row 5" in msg


def test_raw_nq_parquet_with_a_pandas_datetime_index(tmp_path):
    """moola's raw NQ file: pandas DatetimeIndex (tz-naive UTC) plus columns we do not use."""
    import pandas as pd  # pandas (a Ray dependency) writes the file; the pipeline needs none
    syn = synth.synthesize(3, 4)
    frame = pd.DataFrame({"rtype": 33, "open": syn.ohlc[:, 0], "high": syn.ohlc[:, 1],
                          "low": syn.ohlc[:, 2], "close": syn.ohlc[:, 3], "volume": 7,
                          "symbol": "NQ.v.0"},
                         index=pd.DatetimeIndex(syn.timestamps, name="ts_event"))
    frame.to_parquet(tmp_path / "nq.parquet")
    proc = run_cli("data", "ingest", "--format", "bars", "--in", tmp_path / "nq.parquet",
                   "--out", tmp_path / "w", "--stride", "105")
    assert proc.returncode == 0, proc.stderr
    assert "ignored columns: rtype, symbol" in proc.stdout
    assert "timestamp from the pandas index 'ts_event'" in proc.stdout
    ws = schema.read_dataset(str(tmp_path / "w"))
    assert ws.bars.equals(syn.windows.bars)
