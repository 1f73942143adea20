"""Split assignment: time blocks with an embargo, whole groups, and the leakage check."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.data import splits
from pipeline.errors import UserError

W = 105


def test_non_overlapping_windows_split_exactly_40_10():
    starts = np.arange(50) * 150
    split, report = splits.assign_splits(None, [f"w{i}" for i in range(50)], bar_index=starts)
    assert report.policy == "time" and report.key == "bar_index"
    assert report.counts == {"train": 40, "val": 10, "test": 0, "embargo": 0}
    assert (split[:40] == "train").all() and (split[40:] == "val").all()   # oldest first
    assert splits.check_leakage(split, np.arange(50), bar_index=starts).ok


def test_time_blocks_follow_time_not_row_order():
    starts = np.random.default_rng(0).permutation(np.arange(20) * 200)
    split, _ = splits.assign_splits(None, np.arange(20), val_fraction=0.25, bar_index=starts)
    assert starts[split == "train"].max() < starts[split == "val"].min()


def test_overlapping_windows_are_embargoed_and_counted_never_shared():
    starts = np.arange(100) * 52                      # stride-52 pretraining windows overlap
    split, report = splits.assign_splits(None, np.arange(100), val_fraction=0.2,
                                         test_fraction=0.1, bar_index=starts)
    assert report.counts["test"] == 10                # the last block keeps its exact size
    assert report.embargoed == 4 and report.counts[splits.EMBARGO] == 4   # 2 per boundary
    assert report.counts["train"] == 70 - 2 and report.counts["val"] == 20 - 2
    assert "4 windows excluded" in report.summary()
    assert splits.check_leakage(split, np.arange(100), bar_index=starts).ok
    # and without the embargo those windows would have shared bars across splits
    naive = np.repeat(np.array(["train", "val", "test"], dtype=object), [70, 20, 10])
    assert splits.check_leakage(naive, np.arange(100), bar_index=starts).shared_bar_pairs == 2


def test_time_split_keeps_far_apart_copies_of_one_annotation_out_of_two_splits():
    starts = np.arange(20) * 200
    groups = np.array([f"g{i}" for i in range(20)], dtype=object)
    groups[19] = "g2"                                  # a copy of window 2, far away in time
    split, report = splits.assign_splits(None, groups, bar_index=starts)
    assert split[2] == splits.EMBARGO and split[19] == "val"
    assert report.counts == {"train": 15, "val": 4, "test": 0, "embargo": 1}
    assert splits.check_leakage(split, groups, bar_index=starts).ok


def test_a_wider_embargo_keeps_a_gap_of_free_bars():
    starts = np.arange(40) * 150
    split, report = splits.assign_splits(None, np.arange(40), embargo_bars=400, bar_index=starts)
    gap = starts[split == "val"].min() - starts[split == "train"].max()
    assert gap >= 400 and report.embargoed == 2


def test_t0_positions_in_minutes_when_there_is_no_bar_series():
    t0 = np.datetime64("2024-01-02T00:00", "us") + np.arange(30) * np.timedelta64(60, "m")
    t0[5] += np.timedelta64(10, "m")                  # 70 minutes after its predecessor
    ohlc = np.random.default_rng(0).normal(size=(30, 105, 4))  # no two windows share a bar
    split, report = splits.assign_splits(t0, np.arange(30), val_fraction=0.2, ohlc=ohlc)
    assert report.policy == "time" and report.key == "t0"
    assert report.counts == {"train": 24 - 1, "val": 6, "test": 0, "embargo": 1}  # 60 < 105 min
    assert splits.check_leakage(split, np.arange(30), t0=t0, ohlc=ohlc).ok
    assert "by content" in report.guarantee


def test_auto_uses_groups_when_some_window_has_no_time():
    t0 = np.array(["2024-01-02T00:00", "NaT", "2024-01-03T00:00"], dtype="datetime64[us]")
    _, report = splits.assign_splits(t0, ["a", "b", "c"], val_fraction=0.34)
    assert report.policy == "group"
    with pytest.raises(UserError, match="--split time"):
        splits.assign_splits(t0, ["a", "b", "c"], policy="time")


def test_group_split_keeps_overlap_copies_together_and_is_seeded():
    # 30 annotations, each with 1-3 shifted copies sharing the group id (moola overlaps_v2)
    rng = np.random.default_rng(1)
    groups = np.repeat([f"g{i}" for i in range(30)], rng.integers(1, 4, size=30))
    split, report = splits.assign_splits(None, groups, policy="group", seed=3)
    assert report.policy == "group" and report.key == "group_id"
    leak = splits.check_leakage(split, groups)
    assert leak.ok and leak.shared_groups == []
    assert abs(report.counts["val"] - round(0.2 * len(groups))) <= 2
    again, _ = splits.assign_splits(None, groups, policy="group", seed=3)
    other, _ = splits.assign_splits(None, groups, policy="group", seed=4)
    assert (again == split).all() and not (other == split).all()


def test_singleton_groups_give_exact_sizes():
    split, report = splits.assign_splits(None, np.arange(50).astype(str), policy="group")
    assert report.counts == {"train": 40, "val": 10, "test": 0, "embargo": 0}
    assert report.notes == []


def test_check_leakage_finds_planted_leaks():
    split = np.array(["train", "train", "val", "val"], dtype=object)
    leak = splits.check_leakage(split, ["a", "b", "b", "c"], bar_index=[0, 200, 250, 600])
    assert not leak.ok
    assert leak.shared_groups == ["b"] and leak.shared_bar_pairs == 1
    assert any("share 55 bars" in e for e in leak.examples)


def test_refuses_bad_fractions_policies_and_short_embargo():
    with pytest.raises(UserError, match="--val-fraction"):
        splits.assign_splits(None, ["a"], val_fraction=0.7, test_fraction=0.4)
    with pytest.raises(UserError, match="--split"):
        splits.assign_splits(None, ["a"], policy="random")
    with pytest.raises(UserError, match="embargo"):
        splits.assign_splits(None, ["a", "b"], bar_index=[0, 300], embargo_bars=50)


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.integers(0, 300), min_size=2, max_size=60),
       val=st.floats(0.05, 0.5), test=st.floats(0.0, 0.3), seed=st.integers(0, 5),
       n_groups=st.integers(1, 80))
def test_time_split_never_shares_a_bar_or_a_group(gaps, val, test, seed, n_groups):
    starts = np.cumsum(gaps)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(starts))                  # rows in any order
    ids = [f"g{g}" for g in rng.integers(0, n_groups, size=len(starts))]   # some shared groups
    split, report = splits.assign_splits(None, ids, val_fraction=val, test_fraction=test,
                                         bar_index=starts[order])
    assert splits.check_leakage(split, ids, bar_index=starts[order]).ok
    assert sum(report.counts.values()) == len(starts)     # every window accounted for
    _, n_val, n_test = splits.split_sizes(len(starts), val, test)
    last = "test" if n_test else "val"
    assert report.counts[last] == (n_test if n_test else n_val)
