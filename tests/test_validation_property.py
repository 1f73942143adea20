"""Property: a window file with any mix of defects is refused with one UserError that names every
defective row; it is never accepted and never fails with another exception (a traceback)."""

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.data import ingest
from pipeline.errors import UserError
from tests.test_ingest import bars_columns, moola_rows, write_csv, write_moola

N_ROWS = 5
MOOLA_DEFECTS = ["nan", "inf", "non_positive", "high_below_low", "open_above_high",
                 "close_below_low", "short_window", "long_window", "bar_of_three",
                 "start_out_of_range", "end_out_of_range", "start_after_end", "unknown_label",
                 "duplicate_id", "missing_end"]
VALUE_DEFECTS = {"nan", "inf", "non_positive", "high_below_low", "open_above_high",
                 "close_below_low"}
BARS_DEFECTS = ["nan", "word", "empty", "non_positive", "high_below_low", "close_above_high",
                "duplicate_time", "time_goes_back", "bad_time"]


def named_rows(message: str) -> set[int]:
    """Row numbers listed in a problems message ("... : rows 4 (bar 3), 17; ..." for Parquet,
    "... : line 6 (data row 4), line 19 (data row 17: 'n/a'); ..." for a CSV)."""
    rows = {int(r) for r in re.findall(r"\(data row (\d+)", message)}
    for part in message.split("; "):
        m = re.match(r"rows? (.*)$", part.rsplit(": ", 1)[-1])
        if not m:
            continue
        for item in re.sub(r"\([^)]*\)", "", m.group(1)).split(","):
            lead = re.match(r"\s*(\d+)", item)
            if lead:
                rows.add(int(lead.group(1)))
    return rows


def corrupt_moola(cols: dict, defect: str, row: int, bar: int, text: str) -> int:
    """Apply one defect to `row`; returns the row that must be named."""
    window = cols["features"][row]
    b = window[bar] if bar < len(window) else window[-1]
    if len(b) < 4 and defect in VALUE_DEFECTS:
        return row                                       # this bar is already broken
    if defect == "nan":
        b[bar % 4] = float("nan")
    elif defect == "inf":
        b[bar % 4] = float("inf") if bar % 2 else float("-inf")
    elif defect == "non_positive":
        b[:] = [0.0, 0.0, -1.0 * (bar % 3), 0.0]
    elif defect == "high_below_low":
        b[1] = b[2] - 0.25
    elif defect == "open_above_high":
        b[0] = b[1] + 0.25
    elif defect == "close_below_low":
        b[3] = b[2] - 0.25
    elif defect == "short_window":
        del window[bar % 104 + 1:]                       # 1..104 bars
    elif defect == "long_window":
        while len(window) < 106 + bar % 5:               # 106..110 bars
            window.append(list(window[-1]))
    elif defect == "bar_of_three":
        del b[-1]
    elif defect == "start_out_of_range":
        cols["expansion_start"][row] = -1 - bar
    elif defect == "end_out_of_range":
        cols["expansion_end"][row] = 105 + bar
    elif defect == "start_after_end":
        cols["expansion_start"][row], cols["expansion_end"][row] = 60, 60 - bar % 60 - 1
    elif defect == "unknown_label":
        cols["label"][row] = text if text not in ("consolidation", "retracement") else text + "x"
    elif defect == "duplicate_id":
        if row == 0:
            row = 1
        cols["window_id"][row] = cols["window_id"][bar % row]
    elif defect == "missing_end":
        cols["expansion_end"][row] = None
    return row


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(defects=st.lists(st.tuples(st.sampled_from(MOOLA_DEFECTS), st.integers(0, N_ROWS - 1),
                                  st.integers(0, 104),
                                  st.text("abcdefghijklmnopqrstuvwxyz", min_size=0, max_size=8)),
                        min_size=1, max_size=3))
def test_malformed_moola_windows_are_always_refused_naming_the_rows(defects):
    cols = moola_rows(N_ROWS, seed=1)
    expected = {corrupt_moola(cols, *d) for d in defects if d[0] != "duplicate_id"}
    for d in defects:
        if d[0] == "duplicate_id":
            corrupt_moola(cols, *d)
    ids = cols["window_id"]                  # a later copy can undo an earlier one: judge the end
    expected |= {r for r in range(len(ids)) if ids[r] in ids[:r]}
    with tempfile.TemporaryDirectory() as tmp:
        src = write_moola(Path(tmp) / "moola.parquet", cols)
        with pytest.raises(UserError) as info:
            ingest.ingest_moola(src)
    message = info.value.format_message()
    assert message.startswith(src) and "nothing was written" in message
    assert expected <= named_rows(message), (defects, message)


@pytest.fixture(scope="module")
def clean_bars():
    return bars_columns(1, seed=3)[0]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(defects=st.lists(st.tuples(st.sampled_from(BARS_DEFECTS), st.integers(2, 150)),
                        min_size=1, max_size=4))
def test_malformed_bar_series_is_always_refused_naming_the_rows(clean_bars, defects):
    bars = {k: list(v) for k, v in clean_bars.items()}
    expected = set()
    for defect, row in defects:
        if defect == "nan":
            bars["low"][row] = "NaN"
        elif defect == "word":
            bars["high"][row] = "n/a"
        elif defect == "empty":
            bars["open"][row] = None
        elif defect == "non_positive":
            for c in ("open", "high", "low", "close"):
                bars[c][row] = -5.0
            bars["high"][row] = -4.0
        elif defect == "high_below_low":
            bars["high"][row] = float(bars["low"][row]) - 1 if bars["low"][row] not in ("NaN",) \
                else 1.0
        elif defect == "close_above_high":
            bars["close"][row] = 99_999.0
        elif defect == "duplicate_time":
            bars["timestamp"][row] = bars["timestamp"][row - 1]
        elif defect == "time_goes_back":
            bars["timestamp"][row] = bars["timestamp"][row - 2]
        elif defect == "bad_time":
            bars["timestamp"][row] = "2024-13-45 99:00"      # looks like a time, is none
        if defect in ("duplicate_time", "time_goes_back"):
            continue                                         # judged on the final series below
        expected.add(row)
    # time defects interact (a later edit can repair an earlier one): the oracle is the final
    # series itself, where ISO text of one format sorts like time
    ts = bars["timestamp"]
    unreadable = {r for r, t in enumerate(ts) if t.startswith("2024-13")}
    expected |= unreadable
    expected |= {r for r in range(1, len(ts)) if r not in unreadable and r - 1 not in unreadable
                 and ts[r] <= ts[r - 1]}
    with tempfile.TemporaryDirectory() as tmp:
        src = write_csv(Path(tmp) / "bars.csv", bars)
        with pytest.raises(UserError) as info:
            ingest.read_bars(src)
    message = info.value.format_message()
    assert message.startswith(src)
    assert expected <= named_rows(message), (defects, message)
