"""Cross-validation folds that cannot leak: purged k-fold, walk-forward and combinatorial purged
CV (AFML ch. 7 and 12; next-anchors.md section 2), a split policy over the non-test windows.

Groups. The windows outside the test split are put in time order (`splits.time_order`: first
bar, then group_id, then window_id, so the order depends on the values alone) and cut into N
contiguous groups of near-equal size. A fold tests some groups and trains on others:

- purged-kfold (--folds K): N = K groups; fold i tests group i and trains on the other K - 1.
- walk-forward (--folds K): N = K + 1 groups; fold i tests group i + 1 and trains on groups
  0..i (an expanding window), so it never trains on the future; the later groups are unused.
- cpcv (--folds N --test-groups k): one fold per combination of k test groups, C(N, k) folds,
  each training on the other N - k groups. Its phi = k/N * C(N, k) backtest paths each test
  every group exactly once: path p takes, for each group, the p-th fold that tests it.

Purge and embargo, per fold. A window of a train group is
- purged when it shares a bar or a group_id with a test window. Bars are shared by the rule of
  the time split: first bars less than 105 apart (bar ordinals; minutes when only t0 exists),
  and with t0 also the same OHLC rows (`splits.overlapping_pairs`), so folds have the guarantee
  the manifest's split policy states;
- embargoed when it starts within `embargo_bars` bars after the last bar of a test block (a run
  of test windows in time order): its features, computed over the continuous bar series, would
  carry state built on test bars (EMA ranges, zigzag swings). The default is 105 bars (one
  window); walk-forward has none, no window after its test block trains.
Nothing is dropped silently: per fold, train + test + purged + embargoed + unused is every
window outside the test split, and the manifest lists the purged and embargoed ones.

Manifest (`manifest[FOLDS_KEY]`): rows are named by shard split and index, as index ranges
[lo, hi) per split (`{"train": [[0, 12], [40, 41]], "val": [[0, 3]]}`); `data shard` writes a
fold-bearing set in time order, so a group is one range per split. `group_rows` holds each
group's rows, and each of `assignments` its fold's test and train groups, the purged and
embargoed rows, the counts and the label counts of its train windows and its test block. A
fold's train windows are its train groups minus its purged and embargoed rows; its "val" (what
`ShardLoader(split="val", fold=I)` yields) is its test block.

Pure numpy: no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb

import numpy as np

from pipeline.data import splits
from pipeline.data.label_counts import LabelCounts
from pipeline.errors import UserError

FOLDS_KEY = "folds"                    # the manifest's key for the fold layout
SCHEMES = ("purged-kfold", "walk-forward", "cpcv")
DEFAULT_SCHEME = "purged-kfold"
DEFAULT_TEST_GROUPS = 2                # cpcv's k when --test-groups is not given
MAX_FOLDS = 256                        # one run (or sweep trial) per fold: more is a typo
WINDOW = splits.WINDOW
STATUS = ("unused", "train", "test", "purged", "embargoed")
UNUSED, TRAIN, TEST, PURGED, EMBARGOED = range(len(STATUS))
LAYOUT_KEYS = ("scheme", "n_folds", "n_groups", "n_test_groups", "embargo_bars", "key", "splits",
               "windows", "group_rows", "assignments", "paths")
ASSIGNMENT_KEYS = ("fold", "test_groups", "train_groups", "counts", "purged", "embargoed")
GUARANTEES = {
    "bar_index": "exact: no train window of a fold shares a bar (bar ordinals) or a group_id "
                 "with its test block; embargo_bars count bars",
    "t0": "by content and minutes: no train window of a fold shares a bar (the same OHLC rows, "
          "or first bars under 105 minutes apart) or a group_id with its test block; "
          "embargo_bars count minutes",
}
REBUILD = "rebuild the folds with `moola-pipeline data shard --folds K`"


# ---- the policy -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldSpec:
    scheme: str
    folds: int                   # --folds: K (purged-kfold, walk-forward) or N groups (cpcv)
    n_test_groups: int = 1       # k: test groups per fold
    embargo_bars: int = WINDOW

    @classmethod
    def of_layout(cls, layout: dict) -> "FoldSpec":
        groups = layout["n_groups"]
        return cls(layout["scheme"], groups - 1 if layout["scheme"] == "walk-forward" else groups,
                   layout["n_test_groups"], layout["embargo_bars"])

    @property
    def n_groups(self) -> int:
        return self.folds + 1 if self.scheme == "walk-forward" else self.folds

    @property
    def n_folds(self) -> int:
        """Folds made: K, or C(N, k) for cpcv."""
        return comb(self.folds, self.n_test_groups) if self.scheme == "cpcv" else self.folds

    def fold_groups(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(test groups, train groups) of each fold, in fold order."""
        n = self.n_groups
        if self.scheme == "walk-forward":
            return [((i + 1,), tuple(range(i + 1))) for i in range(self.folds)]
        tests = combinations(range(n), self.n_test_groups) if self.scheme == "cpcv" \
            else [(i,) for i in range(n)]
        return [(t, tuple(g for g in range(n) if g not in t)) for t in tests]

    def paths(self) -> list[list[int | None]]:
        """Backtest paths: path p holds, per group, the p-th fold (in fold order) testing it;
        None where a group is never tested (walk-forward's first group only trains)."""
        folds = self.fold_groups()
        tested_by = [[f for f, (test, _) in enumerate(folds) if g in test]
                     for g in range(self.n_groups)]
        n_paths = max(len(t) for t in tested_by)
        return [[t[p] if p < len(t) else None for t in tested_by] for p in range(n_paths)]


def fold_spec(folds: int | None = None, scheme: str | None = None, embargo: int | None = None,
              test_groups: int | None = None) -> FoldSpec | None:
    """The fold policy of `data shard`'s flags (None without --folds); one UserError naming
    the flag for any combination that makes no sense."""
    if folds is None:
        given = [flag for flag, value in (("--fold-scheme", scheme), ("--embargo", embargo),
                                          ("--test-groups", test_groups)) if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} "
                            f"--folds K (the number of cross-validation folds)")
        return None
    scheme = scheme or DEFAULT_SCHEME
    if scheme not in SCHEMES:
        raise UserError(f"--fold-scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if folds < 2:
        raise UserError(f"--folds {folds}: must be at least 2 (one fold is a single split: "
                        f"use --val-fraction instead)")
    k = 1
    if scheme == "cpcv":
        k = DEFAULT_TEST_GROUPS if test_groups is None else test_groups
        if not 1 <= k < folds:
            raise UserError(f"--test-groups {k}: must be at least 1 and less than --folds "
                            f"{folds} (cpcv tests k of the N groups and trains on the rest)")
    elif test_groups is not None:
        raise UserError(f"--test-groups applies to --fold-scheme cpcv; {scheme} tests one "
                        f"group per fold")
    n_folds = comb(folds, k) if scheme == "cpcv" else folds
    if n_folds > MAX_FOLDS:
        raise UserError(f"--folds {folds}" + (f" --test-groups {k}" if scheme == "cpcv" else "")
                        + f": {n_folds} folds, more than {MAX_FOLDS}; use fewer")
    if scheme == "walk-forward":
        if embargo is not None:
            raise UserError("--embargo applies to purged-kfold and cpcv: a walk-forward fold "
                            "trains on no window after its test block")
        embargo = 0
    embargo = WINDOW if embargo is None else embargo
    if embargo < 0:
        raise UserError(f"--embargo {embargo}: must be >= 0 bars")
    return FoldSpec(scheme, folds, k, int(embargo))


@dataclass
class FoldPlan:
    """Fold assignment of the windows outside the test split, in the order they were given."""
    spec: FoldSpec
    key: str                     # "bar_index" or "t0": what the positions count
    group: np.ndarray            # int64 [M]: each window's group
    status: np.ndarray           # int8 [n_folds, M]: a STATUS code per fold and window
    pairs: np.ndarray            # int64 [P, 2]: windows sharing OHLC rows (key "t0" only)

    def counts(self, fold: int) -> dict[str, int]:
        found = np.bincount(self.status[fold], minlength=len(STATUS))
        return {name: int(found[code]) for code, name in enumerate(STATUS)}


def plan_folds(spec: FoldSpec, pos, group_id, window_id, key: str, ohlc=None) -> FoldPlan:
    """Assign the M windows (any row order) to groups and, per fold, a status.

    `pos`: first bar per window (bar ordinals, or minutes when key is "t0", from
    `splits.positions`); `ohlc` [M, 105, 4]: the windows' bars, needed with key "t0".
    """
    pos = np.asarray(pos, np.int64)
    group_id = np.asarray(group_id, dtype=object).astype(str)
    m = len(pos)
    if m < spec.n_groups:
        raise UserError(f"--folds {spec.folds}: {spec.scheme} cuts the windows outside the test "
                        f"split into {spec.n_groups} groups, but there are only {m}; use fewer "
                        f"folds or more data")
    if key == "t0" and ohlc is None:
        raise ValueError("folds by t0 need the windows' ohlc to find shared bars")
    order = splits.time_order(pos, group_id, window_id)
    group = np.empty(m, np.int64)
    group[order] = np.repeat(np.arange(spec.n_groups), _group_sizes(m, spec.n_groups))
    pairs = np.array([p[:2] for p in splits.overlapping_pairs(ohlc)], np.int64).reshape(-1, 2) \
        if key == "t0" else np.zeros((0, 2), np.int64)
    status = np.stack([_fold_status(pos, group_id, group, test, train, spec.embargo_bars, pairs)
                       for test, train in spec.fold_groups()])
    plan = FoldPlan(spec, key, group, status, pairs)
    for f in range(spec.n_folds):
        counts = plan.counts(f)
        if not counts["train"]:
            raise UserError(f"--folds {spec.folds} --fold-scheme {spec.scheme}: fold {f} keeps "
                            f"no train window (its {counts['purged']} purged and "
                            f"{counts['embargoed']} embargoed candidates share bars or groups "
                            f"with its test block, or follow it); use fewer folds, a smaller "
                            f"--embargo, or more data")
    return plan


def _group_sizes(m: int, n: int) -> np.ndarray:
    """Near-equal contiguous group sizes, the larger ones first (np.array_split's rule)."""
    return np.full(n, m // n) + (np.arange(n) < m % n)


def _fold_status(pos, group_id, group, test_groups, train_groups, embargo_bars, pairs):
    test = np.isin(group, test_groups)
    candidate = np.isin(group, train_groups)
    touches = shares_bars(pos, test, pairs) | np.isin(group_id, group_id[test])
    purged = candidate & touches
    embargoed = candidate & ~purged & in_embargo(pos, block_ends(pos, test), embargo_bars)
    status = np.full(len(pos), UNUSED, np.int8)
    status[candidate] = TRAIN
    status[test] = TEST
    status[purged] = PURGED
    status[embargoed] = EMBARGOED
    return status


def shares_bars(pos: np.ndarray, test: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """bool per window: it shares a bar with a test window (first bars < 105 apart, or a pair of
    `splits.overlapping_pairs`: the same OHLC rows)."""
    tp = np.sort(pos[test])
    near = np.zeros(len(pos), bool)
    if tp.size:
        i = np.searchsorted(tp, pos)
        after = tp[np.minimum(i, tp.size - 1)] - pos         # nearest test start at or after
        before = pos - tp[np.maximum(i - 1, 0)]              # nearest test start before
        near = ((i < tp.size) & (after < WINDOW)) | ((i > 0) & (before < WINDOW))
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        near[a[test[b]]] = True
        near[b[test[a]]] = True
    return near


def block_ends(pos: np.ndarray, test: np.ndarray) -> np.ndarray:
    """First bar of the last window of each test block (a run of test windows in time order;
    the block's last bar is 104 bars later)."""
    order = np.argsort(pos, kind="stable")
    t = test[order]
    return pos[order][t & ~np.append(t[1:], False)]


def in_embargo(pos: np.ndarray, ends: np.ndarray, embargo_bars: int) -> np.ndarray:
    """bool per window: it starts after a test block's last window but no more than
    `embargo_bars` bars after that window's last bar (0 < pos - end < 105 + embargo_bars)."""
    ends = np.sort(ends)
    i = np.searchsorted(ends, pos, side="left") - 1          # the latest end before pos
    gap = pos - ends[np.maximum(i, 0)]
    return (i >= 0) & (gap > 0) & (gap < WINDOW + embargo_bars)


# ---- the manifest layout ----------------------------------------------------------------------

def to_ranges(mask: np.ndarray, split_rows: list[tuple[str, int]]) -> dict[str, list[list[int]]]:
    """Rows of a mask over the row space (the splits' rows concatenated, index order) as
    [lo, hi) index ranges per split."""
    out, offset = {}, 0
    for split, n in split_rows:
        sub = np.asarray(mask[offset:offset + n], np.int8)
        offset += n
        edges = np.flatnonzero(np.diff(np.concatenate([[0], sub, [0]])))
        if edges.size:
            out[split] = edges.reshape(-1, 2).tolist()
    return out


def from_ranges(ranges: dict, split_rows: list[tuple[str, int]]) -> np.ndarray:
    mask = np.zeros(sum(n for _, n in split_rows), bool)
    offsets = _offsets(split_rows)
    for split, pairs in ranges.items():
        for lo, hi in pairs:
            mask[offsets[split] + lo:offsets[split] + hi] = True
    return mask


def _offsets(split_rows) -> dict[str, int]:
    starts = np.concatenate([[0], np.cumsum([n for _, n in split_rows])])
    return {split: int(s) for (split, _), s in zip(split_rows, starts)}


def build_layout(plan: FoldPlan, split_rows: list[tuple[str, int]]) -> dict:
    """The manifest's fold section for a plan over the row space of `split_rows`."""
    spec = plan.spec
    assignments = []
    for f, (test, train) in enumerate(spec.fold_groups()):
        assignments.append({
            "fold": f, "test_groups": list(test), "train_groups": list(train),
            "counts": plan.counts(f),
            "purged": to_ranges(plan.status[f] == PURGED, split_rows),
            "embargoed": to_ranges(plan.status[f] == EMBARGOED, split_rows),
        })
    layout = {
        "scheme": spec.scheme, "n_folds": spec.n_folds, "n_groups": spec.n_groups,
        "n_test_groups": spec.n_test_groups, "embargo_bars": spec.embargo_bars,
        "key": plan.key, "guarantee": GUARANTEES[plan.key],
        "splits": [s for s, _ in split_rows], "windows": int(len(plan.group)),
        "group_rows": [to_ranges(plan.group == g, split_rows) for g in range(spec.n_groups)],
        "assignments": assignments, "paths": spec.paths(),
    }
    layout["summary"] = summary(layout)
    return layout


class FoldLabelCounter:
    """Label counts of each fold's train windows and test block, fed as the shard rows stream
    (the same `LabelCounts` the splits get), so a run on a fold can resolve its auto loss
    weights and refuse an unlabeled fold from the manifest alone."""

    def __init__(self, plan: FoldPlan, split_rows: list[tuple[str, int]]):
        self.plan, self.offsets = plan, _offsets(split_rows)
        self.counts = [{"train": LabelCounts(), "val": LabelCounts()}
                       for _ in range(plan.spec.n_folds)]

    def add(self, split: str, index: np.ndarray, columns: dict) -> None:
        if split not in self.offsets:
            return
        status = self.plan.status[:, self.offsets[split] + np.asarray(index)]
        for f, counts in enumerate(self.counts):
            for name, code in (("train", TRAIN), ("val", TEST)):
                rows = status[f] == code
                if rows.any():
                    counts[name].add(*(np.asarray(columns[k])[rows] for k in
                                       ("label", "expansion_start", "expansion_end", "valid")))

    def write(self, layout: dict) -> None:
        for assignment, counts in zip(layout["assignments"], self.counts):
            assignment["label_counts"] = {name: c.to_dict() for name, c in counts.items()}


def summary(layout: dict) -> str:
    counts = [a["counts"] for a in layout["assignments"]]

    def span(key):
        lo, hi = min(c[key] for c in counts), max(c[key] for c in counts)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    k = f", {layout['n_test_groups']} test groups" if layout["scheme"] == "cpcv" else ""
    text = (f"{layout['n_folds']} folds ({layout['scheme']}, {layout['n_groups']} groups{k}, "
            f"embargo {layout['embargo_bars']} bars) over {layout['windows']} windows: per fold "
            f"train {span('train')}, test {span('test')}, purged {span('purged')}, embargoed "
            f"{span('embargoed')}")
    if layout["scheme"] == "walk-forward":
        text += f", unused (future) {span('unused')}"
    if layout["scheme"] == "cpcv":
        text += f"; {len(layout['paths'])} backtest paths"
    return text


# ---- reading it back ----------------------------------------------------------------------------

def check_structure(layout, m_uri: str, split_counts: dict) -> None:
    """The fold section's own structure (cheap: every loader checks it): keys, scheme, sizes,
    ranges inside their splits, counts adding up. `data validate` checks it against the rows."""
    def bad(what):
        raise UserError(f"{m_uri}: {FOLDS_KEY}: {what}; {REBUILD}")

    if not isinstance(layout, dict):
        bad("not a JSON object")
    missing = [k for k in LAYOUT_KEYS if k not in layout]
    if missing:
        bad(f"missing keys {missing}")
    if layout["scheme"] not in SCHEMES:
        bad(f"unknown scheme {layout['scheme']!r}")
    rows = {s: split_counts.get(s, 0) for s in layout["splits"]}
    if sum(rows.values()) != layout["windows"]:
        bad(f"{layout['windows']} windows, but splits {layout['splits']} hold "
            f"{sum(rows.values())} rows")
    if len(layout["group_rows"]) != layout["n_groups"]:
        bad(f"{len(layout['group_rows'])} groups listed, n_groups is {layout['n_groups']}")
    if layout["n_folds"] != FoldSpec.of_layout(layout).n_folds:
        bad(f"n_folds {layout['n_folds']} is not what {layout['scheme']} gives for "
            f"{layout['n_groups']} groups")
    if len(layout["assignments"]) != layout["n_folds"]:
        bad(f"{len(layout['assignments'])} folds listed, n_folds is {layout['n_folds']}")
    for f, a in enumerate(layout["assignments"]):
        absent = [k for k in ASSIGNMENT_KEYS if k not in a]
        if absent:
            bad(f"fold {f} lacks {absent}")
        if sorted(a["counts"]) != sorted(STATUS) or sum(a["counts"].values()) != layout["windows"]:
            bad(f"fold {f}: counts {a['counts']} do not add up to {layout['windows']} windows")
        groups = list(a["test_groups"]) + list(a["train_groups"])
        if not all(isinstance(g, int) and 0 <= g < layout["n_groups"] for g in groups):
            bad(f"fold {f}: groups {groups} outside 0..{layout['n_groups'] - 1}")
    for ranges in [*layout["group_rows"], *(a[k] for a in layout["assignments"]
                                            for k in ("purged", "embargoed"))]:
        for split, pairs in ranges.items():
            if split not in rows or not all(0 <= lo < hi <= rows[split] for lo, hi in pairs):
                bad(f"rows {split} {pairs[:3]} outside the splits {rows}")


def check_fold(manifest: dict, fold: int, where: str) -> dict:
    """The assignment of `fold`, or one UserError naming --fold."""
    layout = manifest.get(FOLDS_KEY)
    if layout is None:
        raise UserError(f"--fold {fold}: {where} has no folds; shard it with "
                        f"`moola-pipeline data shard --folds K` (--fold-scheme "
                        f"{'|'.join(SCHEMES)}), or leave --fold out")
    n = layout["n_folds"]
    if not (isinstance(fold, int) and 0 <= fold < n):
        raise UserError(f"--fold {fold}: {where} has {n} folds ({layout['scheme']}): use "
                        f"--fold 0..{n - 1}")
    return layout["assignments"][fold]


def split_rows(manifest: dict) -> list[tuple[str, int]]:
    """(split, rows) of the splits the folds cover, in the layout's order: the row space."""
    return [(s, int(manifest["splits"].get(s, 0))) for s in manifest[FOLDS_KEY]["splits"]]


def listed_status(layout: dict, rows: list[tuple[str, int]], fold: int) -> np.ndarray:
    """int8 STATUS per window of the row space for one fold, from the manifest."""
    a = layout["assignments"][fold]
    groups = [from_ranges(r, rows) for r in layout["group_rows"]]
    status = np.full(sum(n for _, n in rows), UNUSED, np.int8)
    for g in a["train_groups"]:
        status[groups[g]] = TRAIN
    for g in a["test_groups"]:
        status[groups[g]] = TEST
    status[from_ranges(a["purged"], rows)] = PURGED
    status[from_ranges(a["embargoed"], rows)] = EMBARGOED
    return status


def fold_rows(manifest: dict, fold: int | None, split: str,
              where: str) -> tuple[list[str], np.ndarray | None]:
    """What a loader reads: the splits whose shards it walks (their rows concatenated in index
    order) and the positions it takes in that row space (None: all). With a fold, "train" is the
    fold's train windows and "val" its test block; the test split lies outside every fold and
    stays whole."""
    if fold is None:
        return [split], None
    check_fold(manifest, fold, where)
    if split == "test":
        return [split], None
    if split not in ("train", "val"):
        raise UserError(f"split {split!r}: a fold has train and val (its test block)")
    rows = split_rows(manifest)
    status = listed_status(manifest[FOLDS_KEY], rows, fold)
    wanted = TRAIN if split == "train" else TEST
    return [s for s, _ in rows], np.flatnonzero(status == wanted)


def fold_view(manifest: dict, fold: int | None, where: str) -> dict:
    """The manifest as a run on `fold` sees it: `splits` and `label_counts` of "train" are the
    fold's train windows and of "val" its test block (the test split unchanged). For counts and
    checks (batch size, labeled windows, auto loss weights), not for reading shards."""
    if fold is None:
        return manifest
    a = check_fold(manifest, fold, where)
    view = dict(manifest, fold=fold)
    view["splits"] = {**manifest["splits"], "train": a["counts"]["train"],
                      "val": a["counts"]["test"]}
    if "label_counts" in a:
        view["label_counts"] = {**manifest.get("label_counts", {}), **a["label_counts"]}
    return view


# ---- `data validate`: the layout against the rows ---------------------------------------------

def check_folds(layout: dict, rows: list[tuple[str, int]], pos, key: str, group_id, window_id,
                ohlc=None, where: str = "") -> list[str]:
    """Every problem of a fold layout, recomputed from the windows (arrays in row-space order):
    groups partition the windows; per fold, no train window shares a bar or a group_id with the
    test block or starts in the embargo after it, walk-forward trains only on the past, counts
    match the listed rows, and the purged and embargoed rows are those the policy gives."""
    where = f"{where}: folds: " if where else "folds: "
    if pos is None or key != layout["key"]:
        return [f"{where}made by {layout['key']}, but the rows have "
                f"{key or 'no position for every window'}; {REBUILD}"]
    spec = FoldSpec.of_layout(layout)
    group_id = np.asarray(group_id, dtype=object).astype(str)
    out = []
    in_groups = sum(from_ranges(r, rows).astype(np.int64) for r in layout["group_rows"])
    if (np.asarray(in_groups) != 1).any():
        out.append(f"{where}{int((in_groups == 0).sum())} windows in no group and "
                   f"{int((in_groups > 1).sum())} in more than one")
    try:
        plan = plan_folds(spec, pos, group_id, window_id, key, ohlc)
    except UserError as exc:
        return out + [f"{where}{exc.message}"]
    if not out and any(not np.array_equal(from_ranges(r, rows), plan.group == g)
                       for g, r in enumerate(layout["group_rows"])):
        out.append(f"{where}the groups are not the {spec.n_groups} contiguous groups of the "
                   f"windows' time order")
    expected_groups = spec.fold_groups()
    for f, a in enumerate(layout["assignments"]):
        if (tuple(a["test_groups"]), tuple(a["train_groups"])) != expected_groups[f]:
            out.append(f"{where}fold {f} tests groups {a['test_groups']} and trains on "
                       f"{a['train_groups']}; {spec.scheme} gives {list(expected_groups[f][0])} "
                       f"and {list(expected_groups[f][1])}")
            continue
        status = listed_status(layout, rows, f)
        out += _fold_leaks(f"{where}fold {f}", spec, status, pos, group_id, plan.pairs)
        found = {name: int((status == code).sum()) for code, name in enumerate(STATUS)}
        if found != a["counts"]:
            out.append(f"{where}fold {f} counts {a['counts']}, but its rows give {found}")
        differ = int((status != plan.status[f]).sum())
        if differ:
            out.append(f"{where}fold {f}: {differ} windows differ from a recomputation of "
                       f"{spec.scheme} (purged, embargoed or train)")
    if layout["paths"] != spec.paths():
        out.append(f"{where}the backtest paths differ from {spec.scheme}'s")
    return out


def _fold_leaks(where, spec: FoldSpec, status, pos, group_id, pairs) -> list[str]:
    """The promises, checked on the manifest's own train and test rows."""
    train, test = status == TRAIN, status == TEST
    out = []
    shared = sorted(set(group_id[train]) & set(group_id[test]))
    if shared:
        out.append(f"{where}: train and test share group_id {shared[:5]}")
    bars = shares_bars(pos, test, pairs) & train
    if bars.any():
        out.append(f"{where}: {int(bars.sum())} train windows share bars with its test block "
                   f"(first bars {pos[bars][:5].tolist()})")
    late = in_embargo(pos, block_ends(pos, test), spec.embargo_bars) & train & ~bars
    if late.any():
        out.append(f"{where}: {int(late.sum())} train windows start within the "
                   f"{spec.embargo_bars}-bar embargo after a test block (first bars "
                   f"{pos[late][:5].tolist()})")
    if spec.scheme == "walk-forward" and train.any() and test.any() \
            and pos[train].max() >= pos[test].min():
        out.append(f"{where}: walk-forward trains on the future (a train window starts at "
                   f"{int(pos[train].max())}, the test block at {int(pos[test].min())})")
    return out
