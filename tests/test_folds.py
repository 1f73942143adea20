"""Cross-validation folds (issue 13 item 1): the policies' promises as properties, the manifest
round trip through `data shard / inspect / validate`, ShardLoader on a fold, `train --fold`."""

from __future__ import annotations

import itertools
import json
import os
from math import comb

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.data import folds, schema, splits
from pipeline.data.folds import EMBARGOED, PURGED, TEST, TRAIN, UNUSED
from pipeline.data.loader import ShardLoader
from pipeline.data.manifest import load_manifest
from pipeline.data.shard_check import validate_shard_set
from pipeline.data.shard_dataset import shard_dataset
from pipeline.data.synth import synthesize
from pipeline.errors import UserError
from tests.fixtures.cli import assert_user_error, run_cli

W = 105


# ---- data sets ----------------------------------------------------------------------------------

def overlapping_windows(out: str, stride: int = 60, inline: bool = False) -> str:
    """Windows every `stride` bars over a synthetic 1-minute series (neighbours share 45 bars),
    rows in shuffled order, and two annotations whose copies lie far apart (shared group_id).
    `inline`: OHLC in the windows and t0 only (no bar series), so positions are minutes."""
    syn = synthesize(40, seed=1)
    starts = np.arange(0, len(syn.ohlc) - W + 1, stride)
    m = len(starts)
    rng = np.random.default_rng(1)
    ids = [f"w{i:04d}" for i in range(m)]
    groups = list(ids)
    groups[m // 2], groups[m // 2 + 20] = groups[10], groups[30]
    s = rng.integers(0, 90, m)
    cols = dict(t0=syn.timestamps[starts], label=rng.integers(0, 2, m), expansion_start=s,
                expansion_end=s + rng.integers(0, 14, m))
    if inline:
        table = schema.windows_table(ids, groups, ohlc=np.stack([syn.ohlc[a:a + W] for a in starts]),
                                     **cols)
        bars = None
    else:
        table = schema.windows_table(ids, groups, bar_index=starts, **cols)
        bars = schema.bars_table(syn.timestamps.astype(np.int64), syn.ohlc)
    table = table.take(rng.permutation(m))                     # source order is not time order
    schema.write_dataset(out, schema.WindowSet(table, bars, {}), source={"kind": "test"})
    return out


@pytest.fixture(scope="module")
def overlap(tmp_path_factory):
    return overlapping_windows(str(tmp_path_factory.mktemp("overlap") / "w"))


@pytest.fixture(scope="module")
def synth60(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "w")
    assert run_cli("data", "synth", "--out", out, "--windows", "60").returncode == 0
    return out


@pytest.fixture(scope="module")
def kfold_shards(synth60, tmp_path_factory):
    """`data shard --folds 4` through the console script, as a user runs it."""
    out = str(tmp_path_factory.mktemp("kfold") / "s")
    proc = run_cli("data", "shard", "--in", synth60, "--out", out, "--folds", "4",
                   "--fold-scheme", "purged-kfold", "--test-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def run_main(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up) for a command that must fail."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


def rows_by_position(uri: str, manifest: dict) -> np.ndarray:
    """window_id at each position of the folds' row space (split by split, index order)."""
    ids = []
    for split in manifest[folds.FOLDS_KEY]["splits"]:
        for shard in (s for s in manifest["shards"] if s["split"] == split):
            ids += pq.read_table(os.path.join(uri, shard["path"]),
                                 columns=["window_id"]).column(0).to_pylist()
    return np.array(ids, dtype=object)


# ---- the policies: properties ---------------------------------------------------------------------

def brute_force_status(spec, plan, pos, groups, fold):
    """What a fold must be, pair by pair (no searchsorted): candidates of its train groups
    sharing a bar (first bars < 105 apart) or a group with a test window are purged, the rest
    starting within 105 + embargo bars of a test group's last window are embargoed."""
    test_groups, train_groups = spec.fold_groups()[fold]
    test = np.isin(plan.group, test_groups)
    candidate = np.isin(plan.group, train_groups)
    near = (np.abs(pos[:, None] - pos[test][None, :]) < W).any(axis=1)
    purged = candidate & (near | np.isin(groups, groups[test]))
    zone = np.zeros(len(pos), bool)
    for g in test_groups:
        last = pos[plan.group == g].max()
        zone |= (pos > last) & (pos < last + W + spec.embargo_bars)
    status = np.full(len(pos), UNUSED)
    status[candidate] = TRAIN
    status[test] = TEST
    status[purged] = PURGED
    status[candidate & ~purged & zone] = EMBARGOED
    return status


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.integers(0, 300), min_size=8, max_size=50),
       scheme=st.sampled_from(folds.SCHEMES), k=st.integers(2, 5), test_groups=st.integers(1, 3),
       embargo=st.integers(0, 300), n_groups=st.integers(2, 60), seed=st.integers(0, 9))
def test_no_fold_trains_on_a_bar_or_group_of_its_test_block_and_the_embargo_is_counted(
        gaps, scheme, k, test_groups, embargo, n_groups, seed):
    rng = np.random.default_rng(seed)
    pos = np.cumsum(gaps)[rng.permutation(len(gaps))]          # any row order, ties included
    groups = np.array([f"g{g}" for g in rng.integers(0, n_groups, len(pos))])
    ids = np.array([f"w{i}" for i in range(len(pos))])
    assume(scheme == "cpcv" or test_groups == 1)
    assume(test_groups < k)
    spec = folds.fold_spec(k, scheme, None if scheme == "walk-forward" else embargo,
                           test_groups if scheme == "cpcv" else None)
    try:
        plan = folds.plan_folds(spec, pos, groups, ids, "bar_index")
    except UserError as exc:                                    # too few windows, or no train
        assert "--folds" in exc.message
        return
    # groups are contiguous in time and near-equal
    first = [pos[plan.group == g].min() for g in range(spec.n_groups)]
    last = [pos[plan.group == g].max() for g in range(spec.n_groups)]
    assert all(a <= b for a, b in zip(last[:-1], first[1:]))
    sizes = np.bincount(plan.group)
    assert sizes.max() - sizes.min() <= 1
    for f in range(spec.n_folds):
        status = plan.status[f]
        train, test = status == TRAIN, status == TEST
        assert (np.abs(pos[train][:, None] - pos[test][None, :]) >= W).all()   # no shared bar
        assert not set(groups[train]) & set(groups[test])                      # no shared group
        assert np.array_equal(status, brute_force_status(spec, plan, pos, groups, f))
        counts = plan.counts(f)
        assert sum(counts.values()) == len(pos) and counts["train"] > 0        # all accounted
        assert counts["embargoed"] == int((status == EMBARGOED).sum())
    # the manifest layout says the same, and `data validate`'s recomputation agrees
    rows = [("train", len(pos))]
    layout = folds.build_layout(plan, rows)
    assert folds.check_folds(layout, rows, pos, "bar_index", groups, ids) == []


@settings(max_examples=40, deadline=None)
@given(gaps=st.lists(st.integers(0, 250), min_size=6, max_size=40), k=st.integers(2, 5),
       seed=st.integers(0, 9))
def test_walk_forward_trains_only_on_the_past(gaps, k, seed):
    rng = np.random.default_rng(seed)
    pos = np.cumsum(gaps)[rng.permutation(len(gaps))]
    groups = np.array([f"g{g}" for g in rng.integers(0, 8, len(pos))])
    spec = folds.fold_spec(k, "walk-forward")
    try:
        plan = folds.plan_folds(spec, pos, groups, np.arange(len(pos)).astype(str), "bar_index")
    except UserError:
        return
    assert spec.n_groups == k + 1 and spec.embargo_bars == 0
    for f in range(k):
        status = plan.status[f]
        train, test = status == TRAIN, status == TEST
        assert set(plan.group[test]) == {f + 1}
        assert pos[train].max() + W <= pos[test].min()            # its bars end before the test
        assert (plan.group[status == UNUSED] > f + 1).all()        # the future is unused
        assert plan.counts(f)["unused"] == int((plan.group > f + 1).sum())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 9), data=st.data())
def test_cpcv_fold_and_path_counts(n, data):
    k = data.draw(st.integers(1, n - 1))
    spec = folds.fold_spec(n, "cpcv", test_groups=k)
    fold_groups = spec.fold_groups()
    assert spec.n_folds == len(fold_groups) == comb(n, k)
    assert {t for t, _ in fold_groups} == set(itertools.combinations(range(n), k))
    paths = spec.paths()
    assert len(paths) == k * comb(n, k) // n                    # phi = k/N * C(N, k)
    used = set()
    for path in paths:
        assert len(path) == n
        for g, f in enumerate(path):                            # each group once per path,
            assert g in fold_groups[f][0]                       # by a fold that tests it
            used.add((f, g))
    assert len(used) == len(paths) * n == sum(len(t) for t, _ in fold_groups)  # each pair once


def test_t0_folds_purge_windows_that_share_bars_across_a_halt():
    """1-minute bars with a 60-minute halt, windows every 55 bars: across the halt two windows
    115 minutes apart share 50 bars. The bars' content finds them; the truth is bar ordinals."""
    rng = np.random.default_rng(0)
    n_bars = 1200
    minutes = np.arange(n_bars)
    minutes[600:] += 60
    close = 17_000 + np.cumsum(rng.normal(0, 2, n_bars))
    bars = np.stack([close - 0.5, close + 1.0, close - 1.0, close], axis=1)
    starts = np.arange(0, n_bars - W + 1, 55)
    t0_us = (minutes[starts] * 60_000_000).astype(np.int64)
    ohlc = np.stack([bars[s:s + W] for s in starts]).astype(np.float32)
    pos, key = splits.positions(t0_us, None)
    ids = np.array([f"w{i}" for i in range(len(starts))])
    spec = folds.fold_spec(4, "purged-kfold", embargo=0)
    plan = folds.plan_folds(spec, pos, ids, ids, key, ohlc)
    assert key == "t0"
    for f in range(spec.n_folds):
        train, test = plan.status[f] == TRAIN, plan.status[f] == TEST
        assert (np.abs(starts[train][:, None] - starts[test][None, :]) >= W).all()
    rows = [("train", len(starts))]
    assert folds.check_folds(folds.build_layout(plan, rows), rows, pos, key, ids, ids, ohlc) == []


def test_check_folds_finds_planted_leaks():
    pos = np.arange(40) * 60                                   # neighbours share 45 bars
    ids = np.array([f"w{i}" for i in range(40)])
    plan = folds.plan_folds(folds.fold_spec(4, embargo=200), pos, ids, ids, "bar_index")
    rows = [("train", 40)]
    layout = folds.build_layout(plan, rows)
    a = layout["assignments"][1]
    # fold 1 tests windows 10..19 (last at bar 1140): 9 and 20 share 45 bars; 21..24 start
    # within 105 + 200 bars of bar 1140
    assert a["counts"]["purged"] == 2 and a["counts"]["embargoed"] == 4
    leaky = json.loads(json.dumps(layout))
    b = leaky["assignments"][1]
    b["purged"], b["embargoed"] = {}, {}
    b["counts"]["train"] += 6
    b["counts"]["purged"] = b["counts"]["embargoed"] = 0
    problems = " ".join(folds.check_folds(leaky, rows, pos, "bar_index", ids, ids))
    assert "fold 1: 2 train windows share bars" in problems
    assert "start within the 200-bar embargo" in problems
    assert "differ from a recomputation" in problems


# ---- data shard / inspect / validate -------------------------------------------------------------

def test_shard_inspect_validate_round_trip_with_folds(kfold_shards, tmp_path):
    out, proc = kfold_shards
    assert "4 folds (purged-kfold, 4 groups, embargo 105 bars) over 48 windows" in proc.stdout
    manifest = load_manifest(out)
    layout = manifest[folds.FOLDS_KEY]
    assert layout["splits"] == ["train", "val"] and manifest["splits"]["test"] == 12
    assert layout["windows"] == manifest["splits"]["train"] + manifest["splits"]["val"] == 48
    rows = folds.split_rows(manifest)
    for f, a in enumerate(layout["assignments"]):
        status = folds.listed_status(layout, rows, f)
        assert {n: int((status == c).sum()) for c, n in enumerate(folds.STATUS)} == a["counts"]
        assert a["counts"]["test"] == 12 and a["counts"]["purged"] == 0   # synth: no overlap
        assert a["label_counts"]["val"]["windows"] == a["counts"]["test"]
    # what a run on fold 1 counts (preflight, auto loss weights): its train and test block
    view = folds.fold_view(manifest, 1, out)
    a = layout["assignments"][1]
    assert view["splits"] == {"train": a["counts"]["train"], "val": 12, "test": 12}
    assert view["label_counts"]["train"]["windows"] == a["counts"]["train"]
    # the folds together test every window outside the test split exactly once
    tested = sum((folds.listed_status(layout, rows, f) == TEST).astype(int) for f in range(4))
    assert (tested == 1).all()
    # fold-bearing shards are written in time order
    t0 = pq.read_table(os.path.join(out, "train-00000.parquet"), columns=["t0"]).column(0)
    assert t0.to_pylist() == sorted(t0.to_pylist())

    inspect = run_cli("data", "inspect", out)
    assert inspect.returncode == 0, inspect.stderr
    for needle in ("folds (purged-kfold", "test groups", "purged", "embargoed", "unused"):
        assert needle in inspect.stdout, needle
    validate = run_cli("data", "validate", out)
    assert validate.returncode == 0, validate.stderr
    assert "4 purged-kfold folds checked" in validate.stdout


def test_cpcv_on_overlapping_windows_purges_lists_paths_and_validates(overlap, tmp_path, capsys):
    out = str(tmp_path / "s")
    manifest = shard_dataset(overlap, out, test_fraction=0.2,
                             folds=folds.fold_spec(5, "cpcv", test_groups=2))
    layout = manifest[folds.FOLDS_KEY]
    assert layout["n_folds"] == 10 and len(layout["paths"]) == 4
    counts = [a["counts"] for a in layout["assignments"]]
    assert all(c["purged"] >= 2 for c in counts)               # neighbours share 45 bars
    assert any(c["purged"] > 3 for c in counts)                 # and a far copy of a test window
    for a in layout["assignments"]:       # an embargo after each test block a train group follows
        tests = a["test_groups"]
        followed = any(g + 1 < layout["n_groups"] and g + 1 not in tests for g in tests)
        assert (a["counts"]["embargoed"] > 0) == followed, a
    _, _, problems = validate_shard_set(out)
    assert problems == []
    main(["data", "inspect", out])
    text = capsys.readouterr().out
    assert "path 3: folds" in text and "10 folds (cpcv, 5 groups, 2 test groups" in text


def test_validate_refuses_a_hand_edited_leaking_manifest(overlap, tmp_path):
    out = str(tmp_path / "s")
    shard_dataset(overlap, out, test_fraction=0.2, folds=folds.fold_spec(4))
    path = os.path.join(out, "manifest.json")
    original = json.loads(open(path).read())

    def edit(key):
        manifest = json.loads(json.dumps(original))
        a = manifest[folds.FOLDS_KEY]["assignments"][1]
        n = a["counts"][key]
        assert n > 0
        a[key] = {}                                     # those windows now train: a leak
        a["counts"][key], a["counts"]["train"] = 0, a["counts"]["train"] + n
        with open(path, "w") as f:
            json.dump(manifest, f)

    edit("purged")
    assert_user_error(run_cli("data", "validate", out), "folds: fold 1:", "share bars with its "
                      "test block", "differ from a recomputation")
    edit("embargoed")
    _, _, problems = validate_shard_set(out)
    assert any("105-bar embargo after a test block" in p for p in problems), problems
    # a manifest whose fold section does not even add up is refused on load (loader included)
    manifest = json.loads(json.dumps(original))
    manifest[folds.FOLDS_KEY]["assignments"][0]["counts"]["test"] += 1
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(UserError, match="folds: fold 0: counts .* do not add up"):
        ShardLoader(out, "train", fold=0)


@pytest.mark.parametrize("flags,needle", [
    (["--folds", "1"], "--folds 1: must be at least 2"),
    (["--folds", "5", "--fold-scheme", "cpcv", "--test-groups", "5"], "--test-groups 5: must be"),
    (["--fold-scheme", "walk-forward"], "--fold-scheme needs --folds K"),
    (["--embargo", "50"], "--embargo needs --folds K"),
    (["--folds", "3", "--fold-scheme", "walk-forward", "--embargo", "10"],
     "--embargo applies to purged-kfold and cpcv"),
    (["--folds", "3", "--test-groups", "2"], "--test-groups applies to --fold-scheme cpcv"),
    (["--folds", "3", "--embargo", "-5"], "--embargo -5: must be >= 0"),
    (["--folds", "20", "--fold-scheme", "cpcv", "--test-groups", "10"], "more than 256"),
    (["--folds", "50", "--test-fraction", "0.2"], "--folds 50: purged-kfold cuts"),
])
def test_bad_fold_flags_are_one_clear_error_and_write_nothing(synth60, tmp_path, capsys, flags,
                                                              needle):
    out = str(tmp_path / "s")
    code, text = run_main(capsys, "data", "shard", "--in", synth60, "--out", out, *flags)
    assert code == 2 and needle in text and text.count("error:") == 1, text
    assert not os.path.exists(out)


# ---- ShardLoader on a fold -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fold_shards(overlap, tmp_path_factory):
    """cpcv over overlapping windows in small row groups and several shards per split."""
    out = str(tmp_path_factory.mktemp("fold_shards") / "s")
    shard_dataset(overlap, out, test_fraction=0.2, rows_per_shard=24, row_group_rows=8,
                  folds=folds.fold_spec(4, "cpcv", test_groups=2))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_loader_on_a_fold_partitions_exactly_its_windows(fold_shards, world):
    manifest = load_manifest(fold_shards)
    layout = manifest[folds.FOLDS_KEY]
    ids = rows_by_position(fold_shards, manifest)
    n_train = manifest["splits"]["train"]
    spans_both = 0
    for f in range(layout["n_folds"]):
        status = folds.listed_status(layout, folds.split_rows(manifest), f)
        for split, code in (("train", TRAIN), ("val", TEST)):
            want = set(ids[status == code])
            loaders = [ShardLoader(fold_shards, split, rank=r, world_size=world, batch_size=5,
                                   seed=2, fold=f, shuffle_row_groups=2) for r in range(world)]
            assert len({len(x) for x in loaders}) == 1           # equal batches on every rank
            seen = np.concatenate([b["index"].numpy() for x in loaders for b in x])
            pad = (-len(want)) % world
            assert len(seen) == len(want) + pad and len(set(seen.tolist())) == len(want)
            assert set(ids[seen]) == want                        # exactly the fold's windows
            spans_both += split == "val" and seen.min() < n_train <= seen.max()
    assert spans_both                                           # a test block over train and val


def test_fold_loader_resumes_exactly_and_refuses_another_fold(fold_shards):
    def loader(fold=1):
        return ShardLoader(fold_shards, "train", batch_size=4, seed=5, fold=fold)

    full = [b["index"].tolist() for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it)["index"].tolist() for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert head + [b["index"].tolist() for b in resumed] == full
    with pytest.raises(UserError, match="loader state has fold=1 but this loader has 2"):
        loader(fold=2).load_state_dict(first.state_dict())


def test_fold_of_a_data_set_without_folds_or_out_of_range_names_fold(fold_shards, synth60,
                                                                     tmp_path):
    plain = str(tmp_path / "plain")
    shard_dataset(synth60, plain)
    with pytest.raises(UserError, match=r"--fold 0: .* has no folds; shard it with"):
        ShardLoader(plain, "train", fold=0)
    with pytest.raises(UserError, match=r"--fold 6: .* has 6 folds \(cpcv\): use --fold 0..5"):
        ShardLoader(fold_shards, "val", fold=6)
    assert ShardLoader(fold_shards, "test", fold=0).num_samples == \
        load_manifest(fold_shards)["splits"]["test"]              # test: outside every fold


# ---- train --fold --------------------------------------------------------------------------------

def test_train_fold_flag_is_checked_before_training(kfold_shards, synth60, tmp_path, capsys):
    plain = str(tmp_path / "plain")
    shard_dataset(synth60, plain)
    for data, fold, needle in ((plain, "0", "--fold 0: "), (kfold_shards[0], "4", "use --fold 0..3"),
                               (kfold_shards[0], "-1", "fold (--fold) must be >= 0")):
        code, text = run_main(capsys, "train", "--workers", "0", "--data", data, "--out",
                              tmp_path / f"run{fold}", "--fold", fold)
        assert code == 2 and needle in text, text
        assert not os.path.exists(tmp_path / f"run{fold}")


def test_train_on_fold_0_uses_its_test_block_as_val(kfold_shards, tmp_path):
    out, _ = kfold_shards
    fold0 = load_manifest(out)[folds.FOLDS_KEY]["assignments"][0]
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  hidden: 8\n  head_width: 8\ntrain:\n  probe: false\n")
    run = tmp_path / "run"
    proc = run_cli("train", "--workers", "0", "--data", out, "--out", run, "--fold", "0",
                   "--epochs", "1", "--batch-size", "8", "--config", config, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "fold: 0" in (run / "config.yaml").read_text()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["elements"]["val"]["type"] == fold0["label_counts"]["val"]["labeled"] \
        == fold0["counts"]["test"]
    assert record["elements"]["train"]["type"] == fold0["counts"]["train"]
    predictions = np.load(run / "best_val_predictions.npz")
    assert len(predictions["index"]) == fold0["counts"]["test"]
    # evaluate works per fold: val is the fold's test block, baselines fit on the fold's train
    proc = run_cli("evaluate", run, "--split", "val", "--bootstrap", "20")
    assert proc.returncode == 0, proc.stderr
    assert "fold 0 val (its test block)" in proc.stdout
    result = json.loads((run / "eval" / "val.json").read_text())
    assert result["fold"] == 0 and result["windows"] == fold0["counts"]["test"]
    assert result["baseline_fit"]["windows"] == fold0["counts"]["train"]
    proc = run_cli("evaluate", run, "--bootstrap", "20")  # the test split: outside every fold
    assert proc.returncode == 0, proc.stderr
    test = json.loads((run / "eval" / "test.json").read_text())
    assert test["windows"] == load_manifest(out)["splits"]["test"]
