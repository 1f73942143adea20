"""The bad-input catalog for `data ingest`: one test per case.

Each case: a non-zero exit, one error naming the file and the row/column, no traceback, and
nothing written to --out. A CSV's rows are named by file line, then data row from 0
(`line 9 (data row 7)`); a Parquet file's rows count from 0.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.fixtures.cli import assert_user_error, run_cli
from tests.test_ingest import bars_columns, moola_rows, write_csv, write_moola


def ingest_bars(tmp_path, bars: dict, labels: dict | None = None):
    out = tmp_path / "out"
    args = ["data", "ingest", "--format", "bars", "--in", write_csv(tmp_path / "bars.csv", bars),
            "--out", out]
    if labels is not None:
        args += ["--labels", write_csv(tmp_path / "labels.csv", labels)]
    return run_cli(*args), out


def ingest_moola(tmp_path, columns: dict):
    out = tmp_path / "out"
    src = write_moola(tmp_path / "moola.parquet", columns)
    return run_cli("data", "ingest", "--format", "moola", "--in", src, "--out", out), out


def refused(result, *needles):
    proc, out = result
    assert_user_error(proc, *needles)
    assert not out.exists(), f"something was written to {out}: {list(out.iterdir())}"
    assert proc.stderr.count("error:") == 1


def test_missing_column(tmp_path):
    bars, _ = bars_columns(2)
    del bars["close"]
    refused(ingest_bars(tmp_path, bars), "bars.csv", "missing column close")


def test_misnamed_column(tmp_path):
    cols = moola_rows(3)
    cols["Label"] = cols.pop("label")
    refused(ingest_moola(tmp_path, cols), "moola.parquet", "missing column label",
            "unexpected columns: Label")


def test_window_that_is_not_105_bars(tmp_path):
    cols = moola_rows(4)
    cols["features"][2] = cols["features"][2][:104]
    refused(ingest_moola(tmp_path, cols), "moola.parquet",
            "1 row with a window that is not 105 bars: row 2 (104 bars)")


def test_flat_window_of_the_wrong_length(tmp_path):
    cols = moola_rows(3)
    cols["features"] = [[v for bar in w for v in bar] for w in cols["features"]]
    cols["features"][1] = cols["features"][1][:416]
    refused(ingest_moola(tmp_path, cols), "moola.parquet", "row 1 (416 values")


def test_nan_price(tmp_path):
    bars, _ = bars_columns(2)
    bars["close"][7] = "nan"
    refused(ingest_bars(tmp_path, bars), "bars.csv", "1 row with NaN or inf price: line 9 (data row 7)")


def test_inf_price_inside_a_window(tmp_path):
    cols = moola_rows(3)
    cols["features"][1][30][1] = float("inf")
    refused(ingest_moola(tmp_path, cols), "moola.parquet", "NaN or inf price: row 1 (bar 30)")


def test_high_below_low_lists_every_row_with_a_count(tmp_path):
    bars, _ = bars_columns(2)
    for r in (4, 17, 90):
        bars["high"][r], bars["low"][r] = bars["low"][r], bars["high"][r] + 1
    refused(ingest_bars(tmp_path, bars), "bars.csv", "3 rows with high < low: line 6 (data row 4), line 19 (data row 17), "
            "line 92 (data row 90)")


def test_open_or_close_outside_the_bar_range(tmp_path):
    cols = moola_rows(3)
    bar = cols["features"][0][5]
    bar[0] = bar[1] + 10                                   # open above high
    refused(ingest_moola(tmp_path, cols), "moola.parquet",
            "open or close outside [low, high]: row 0 (bar 5)")


def test_non_positive_price(tmp_path):
    bars, _ = bars_columns(2)
    bars["low"][3] = -1.0
    for c in ("open", "high", "low", "close"):
        bars[c][5] = 0.0
    refused(ingest_bars(tmp_path, bars), "bars.csv", "2 rows with non-positive price: line 5 (data row 3), line 7 (data row 5)")


def test_expansion_start_after_end(tmp_path):
    bars, labels = bars_columns(3)
    labels["expansion_start"][1], labels["expansion_end"][1] = 50, 40
    refused(ingest_bars(tmp_path, bars, labels), "labels.csv",
            "expansion_start > expansion_end: line 3 (data row 1: 50..40)")


def test_expansion_outside_the_window(tmp_path):
    cols = moola_rows(4)
    cols["expansion_end"][2] = 105
    cols["expansion_start"][3] = -1
    refused(ingest_moola(tmp_path, cols), "moola.parquet",
            "2 rows with expansion_start or expansion_end outside 0..104: rows 2 (12..105), 3 (-1..18)")


def test_unknown_label(tmp_path):
    bars, labels = bars_columns(3)
    labels["label"][2] = "bullish"
    refused(ingest_bars(tmp_path, bars, labels), "labels.csv",
            "unknown label (expected consolidation or retracement): line 4 (data row 2: 'bullish')")


def test_duplicate_window_ids(tmp_path):
    cols = moola_rows(4)
    cols["window_id"][3] = cols["window_id"][1]
    refused(ingest_moola(tmp_path, cols), "moola.parquet",
            "duplicate or empty window_id: row 3 ('1_exp_1' also on row 1)")


def test_bars_out_of_time_order(tmp_path):
    bars, _ = bars_columns(2)
    for c in bars:
        bars[c][10], bars[c][11] = bars[c][11], bars[c][10]
    refused(ingest_bars(tmp_path, bars), "bars.csv", "bars out of time order): line 13 (data row 11)")


def test_duplicate_timestamps(tmp_path):
    bars, _ = bars_columns(2)
    bars["timestamp"][20] = bars["timestamp"][19]
    refused(ingest_bars(tmp_path, bars), "bars.csv", "duplicate timestamp", "line 22 (data row 20)")


def test_labels_start_not_in_the_bar_series(tmp_path):
    bars, labels = bars_columns(3)
    labels["start"][0] = "2030-01-01T00:00:00Z"
    labels["start"][2] = "99999999"
    refused(ingest_bars(tmp_path, bars, labels), "labels.csv",
            "2 rows with a start that is not in the bar series", "line 2 (data row 0: '2030-01-01T00:00:00Z'), line 4 (data row 2: '99999999')")


def test_labels_window_running_past_the_last_bar(tmp_path):
    bars, labels = bars_columns(3)
    labels["start"][1] = str(len(bars["timestamp"]) - 50)
    refused(ingest_bars(tmp_path, bars, labels), "labels.csv", "runs past the last bar", "line 3 (data row 1")


def test_unreadable_values_are_named_not_guessed(tmp_path):
    bars, _ = bars_columns(2)
    bars["open"][2] = "12,5"  # a decimal comma would split the CSV field; use a word instead
    bars["open"][2] = "abc"
    bars["timestamp"][6] = "yesterday"
    refused(ingest_bars(tmp_path, bars), "bars.csv", "non-numeric open: line 4 (data row 2: 'abc')",
            "unreadable timestamp", "line 8 (data row 6: 'yesterday')")


def test_every_problem_of_a_file_at_once(tmp_path):
    bars, _ = bars_columns(2)
    for r in (4, 17, 90):
        bars["high"][r], bars["low"][r] = bars["low"][r], bars["high"][r] + 1
    bars["close"][5] = "inf"
    bars["timestamp"][30] = bars["timestamp"][29]
    refused(ingest_bars(tmp_path, bars), "bars.csv", "3 problems",
            "3 rows with high < low: line 6 (data row 4), line 19 (data row 17), "
            "line 92 (data row 90)", "1 row with NaN or inf price: line 7 (data row 5)",
            "duplicate timestamp (same as the previous row): line 32 (data row 30)")


def test_labels_file_with_a_header_only(tmp_path):
    bars, labels = bars_columns(2)
    refused(ingest_bars(tmp_path, bars, {k: [] for k in labels}), "labels.csv",
            "no labeled windows")


def test_truncated_parquet(tmp_path):
    src = write_moola(tmp_path / "moola.parquet", moola_rows(3))
    data = (tmp_path / "moola.parquet").read_bytes()
    (tmp_path / "moola.parquet").write_bytes(data[: len(data) // 2])
    proc = run_cli("data", "ingest", "--format", "moola", "--in", src, "--out", tmp_path / "out")
    refused((proc, tmp_path / "out"), "moola.parquet", "not a readable Parquet file")


def test_a_refused_input_leaves_an_existing_data_set_untouched(tmp_path):
    out = tmp_path / "out"
    assert run_cli("data", "synth", "--out", out, "--windows", "5").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bars, _ = bars_columns(2)
    bars["close"][1] = "nan"
    proc = run_cli("data", "ingest", "--format", "bars", "--in", write_csv(tmp_path / "b.csv", bars),
                   "--out", out)
    assert_user_error(proc, "b.csv", "line 3 (data row 1)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_moola_wrong_features_type(tmp_path):
    cols = moola_rows(2)
    cols["features"] = ["not", "lists"]
    refused(ingest_moola(tmp_path, cols), "moola.parquet", "column features has type string")


def test_moola_bar_with_three_numbers(tmp_path):
    cols = moola_rows(3)
    cols["features"][2][40] = cols["features"][2][40][:3]
    refused(ingest_moola(tmp_path, cols), "moola.parquet",
            "a bar that is not 4 numbers [open, high, low, close]: row 2")


def test_timestamps_of_a_parquet_bar_file_must_be_times(tmp_path):
    bars, _ = bars_columns(2)
    table = pa.table({"timestamp": np.arange(len(bars["timestamp"])),
                      **{c: np.asarray(bars[c], dtype=float) for c in ("open", "high", "low", "close")}})
    pq.write_table(table, tmp_path / "bars.parquet")
    proc = run_cli("data", "ingest", "--format", "bars", "--in", tmp_path / "bars.parquet",
                   "--out", tmp_path / "out")
    refused((proc, tmp_path / "out"), "bars.parquet", "column timestamp has type int64")
