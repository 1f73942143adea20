"""Train/val/test assignment that cannot leak, and the check that proves it.

Two policies (moola-domain.md section 8, item 10: shifted copies of one annotation leaked across a
random split because they share half their bars):

- time: windows are ordered by their first bar (`bar_index` when a bar series exists, else `t0`)
  and cut into contiguous blocks, oldest first: train, then val, then test. Sizes are exact:
  n_val = round(n * val_fraction), n_test = round(n * test_fraction), train gets the rest.
  Embargo: a window of an earlier block whose first bar lies less than `embargo_bars` bars before
  the first bar of the next block's first window would share bars with it (or sit inside the
  look-back gap), so it goes to neither split: it is marked "embargo" and counted in the report.
  With embargo_bars = 105 (the window length) no bar belongs to two splits; a larger value also
  keeps (embargo_bars - 105) bars free between the blocks. The embargo takes windows from the end of
  the earlier block, so the last block keeps its exact size (val without a test block; train
  shrinks first, val too at a val/test boundary). Windows that
  do not overlap (synth spaces its windows apart) lose nothing: 50 windows give exactly 40/10.
  A window whose group_id also appears in a later split is embargoed too (copies of one
  annotation can lie further apart than a window), so no group straddles under time either.
  Positions: a bar series gives exact bar ordinals (`bar_index`). From `t0` alone a position is
  minutes since the first window, which is not a bar count: a window over a session halt or a
  weekend, or of bars of another frequency, covers more (or fewer) minutes than bars, so two
  windows >= 105 minutes apart can still share bars. With `t0` alone the windows' own bars decide
  instead (`shared_bars`): a window of an earlier block that shares a bar (same OHLC run at the
  seam) with a window of a later split is embargoed, whatever the minutes between them. The
  manifest's split policy says which guarantee a data set has (`guarantee`).
- group: whole groups (`group_id`) go to one split, chosen by a seeded shuffle of the groups;
  no group straddles two splits.

"auto" is time when every window has a position (bar_index or t0), group otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.errors import UserError

WINDOW = 105
SPLITS = ("train", "val", "test")
EMBARGO = "embargo"          # the split value of a window that belongs to no split
MINUTE_US = 60_000_000       # t0 positions are counted in minutes (ordering, extra embargo)
GUARANTEES = {
    "bar_index": "exact: bar ordinals of the bar series; no bar is in two splits and "
                 "embargo_bars count bars",
    "t0": "by content: no window shares a bar (the same OHLC rows) with a window of another "
          "split; ordered by t0, and embargo_bars beyond 105 count minutes, not bars",
    "group_id": "by group: no group_id is in two splits; windows of different groups may "
                "share bars",
}


@dataclass
class SplitReport:
    policy: str                      # "time" or "group"
    key: str                         # "bar_index", "t0" or "group_id"
    counts: dict[str, int]           # per split, "embargo" included
    embargoed: int = 0
    embargo_bars: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    guarantee: str = ""              # GUARANTEES[key]: what "no leak" means for this data set

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{s} {self.counts.get(s, 0)}" for s in (*SPLITS, EMBARGO) if self.counts.get(s)]
        text = f"split by {self.policy} ({self.key}): " + ", ".join(parts)
        if self.embargoed:
            text += (f" ({self.embargoed} window{'s' if self.embargoed > 1 else ''} excluded: "
                     f"within {self.embargo_bars} bars of, or in a group with, a later split)")
        return text


def positions(t0, bar_index) -> tuple[np.ndarray | None, str]:
    """Each window's first bar on a common axis (bars, or minutes from t0) and its key
    ("bar_index" or "t0"), or (None, "") when some window has none. Minutes are floored from
    the epoch before the first window is subtracted, so the difference between two windows does
    not depend on which other windows are passed (folds and `data validate` see subsets)."""
    if bar_index is not None:
        pos = np.asarray(bar_index, dtype=np.int64)
        if len(pos) and (pos >= 0).all():
            return pos, "bar_index"
    if t0 is not None:
        t = np.asarray(t0)
        if t.dtype.kind == "M":
            t = t.astype("datetime64[us]").astype(np.int64)
            valid = t != np.iinfo(np.int64).min
        else:
            t = np.asarray(t, dtype=np.int64)
            valid = t != np.iinfo(np.int64).min
        if len(t) and valid.all():
            # minutes since the first window; integer division keeps equal times equal
            minutes = t // MINUTE_US
            return minutes - minutes.min(), "t0"
    return None, ""


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: each "
                        f"must be in [0, 1) and together below 1")
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return n - n_val - n_test, n_val, n_test


def assign_splits(t0, group_id, policy: str = "auto", val_fraction: float = 0.2,
                  test_fraction: float = 0.0, seed: int = 0, embargo_bars: int = WINDOW,
                  bar_index=None, ohlc=None) -> tuple[np.ndarray, SplitReport]:
    """Split names per window ("train"/"val"/"test", or "embargo" for excluded windows) and a report.

    `t0`: datetime64 or int64 microseconds per window (NaT/int64-min for none) or None;
    `bar_index`: first bar per window in the bar series (-1 for none) or None;
    `ohlc`: every window's bars [n, 105, 4], needed for a time split by t0 alone (the bars show
    which windows overlap). Deterministic in its inputs and `seed`.
    """
    group_id = np.asarray(group_id, dtype=object)
    n = len(group_id)
    n_train, n_val, n_test = split_sizes(n, val_fraction, test_fraction)
    pos, key = positions(t0, bar_index)
    if policy == "auto":
        policy = "time" if pos is not None else "group"
    if policy == "time":
        if pos is None:
            raise UserError("--split time needs a position for every window (t0 or bar_index); "
                            "this data set has windows without one: use --split group")
        if embargo_bars < WINDOW:
            raise UserError(f"embargo of {embargo_bars} bars: must be at least {WINDOW} (the "
                            f"window length) so that no bar belongs to two splits")
        if key == "t0" and ohlc is None:
            raise ValueError("a time split by t0 needs the windows' ohlc to find shared bars")
        split = _time_split(pos, np.asarray(group_id, dtype=str), (n_train, n_val, n_test),
                            embargo_bars)
        if key == "t0":  # minutes are not bars: the bars themselves say which windows overlap
            _embargo_shared_bars(split, ohlc)
    elif policy == "group":
        key, embargo_bars = "group_id", 0
        split = _group_split(group_id, (n_train, n_val, n_test), seed)
    else:
        raise UserError(f"--split {policy!r}: use time, group or auto")
    counts = {s: int((split == s).sum()) for s in (*SPLITS, EMBARGO)}
    report = SplitReport(policy=policy, key=key, counts=counts, embargoed=counts[EMBARGO],
                         embargo_bars=embargo_bars, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, guarantee=GUARANTEES[key])
    if policy == "group":
        sizes = (n_train, n_val, n_test)
        got = (counts["train"], counts["val"], counts["test"])
        if got != sizes:
            report.notes.append(f"whole groups cannot fill the exact sizes {sizes}; got {got}")
    return split, report


def time_order(pos: np.ndarray, groups, window_id=None) -> np.ndarray:
    """Row order by first bar, ties by group_id (then window_id when given): the one order the
    time split, the folds and the fold-ordered shards share. Deterministic in the values alone
    when window_id is given (ids are unique), whatever order the rows arrive in."""
    keys = [np.asarray(groups, dtype=str), np.asarray(pos)]
    if window_id is not None:
        keys.insert(0, np.asarray(window_id, dtype=str))
    return np.lexsort(keys)


def _time_split(pos: np.ndarray, groups: np.ndarray, sizes, embargo_bars: int) -> np.ndarray:
    order = time_order(pos, groups)
    names = np.repeat(np.array(SPLITS, dtype=object), sizes)
    split = np.empty(len(pos), dtype=object)
    split[order] = names
    # Embargo at each boundary: windows of the earlier block starting fewer than embargo_bars
    # before the later block's first window leave the earlier block.
    sorted_pos = pos[order]
    edge = 0
    for size in sizes[:-1]:
        edge += size
        if edge == 0 or edge >= len(pos) or size == 0:
            continue
        later = np.flatnonzero(names[edge:] != names[edge - 1])
        if later.size == 0:
            continue
        first_later = sorted_pos[edge + later[0]]
        block = np.flatnonzero(names == names[edge - 1])
        too_close = block[sorted_pos[block] > first_later - embargo_bars]
        split[order[too_close]] = EMBARGO
    # Copies of one annotation (one group_id) may lie further apart than a window: a window whose
    # group also appears in a later split leaves its own split too, so no group straddles.
    for i, name in enumerate(SPLITS[:-1]):
        later_groups = groups[np.isin(split.astype(str), SPLITS[i + 1:])]
        split[(split == name) & np.isin(groups, later_groups)] = EMBARGO
    return split


def _embargo_shared_bars(split: np.ndarray, ohlc) -> None:
    """Embargo, in place, each window that shares bars with a window of a later split (the
    earlier one of the pair leaves, as the block embargo does)."""
    rank = {name: i for i, name in enumerate(SPLITS)}
    for a, b, _ in shared_bars(ohlc, split):
        if split[a] in rank and split[b] in rank and split[a] != split[b]:
            earlier = a if rank[split[a]] < rank[split[b]] else b
            split[earlier] = EMBARGO


def _bar_hashes(ohlc) -> np.ndarray:
    """One uint64 per bar from its four prices' bytes [n, 105] (equal bars, equal hashes)."""
    bits = np.ascontiguousarray(ohlc).view(np.uint64 if ohlc.dtype.itemsize == 8 else np.uint32)
    bits = bits.astype(np.uint64)
    h = np.zeros(bits.shape[:2], np.uint64)
    with np.errstate(over="ignore"):
        for k in range(bits.shape[2]):
            h = (h ^ bits[:, :, k]) * np.uint64(0x100000001B3) + np.uint64(k + 1)
    return h


def shared_bars(ohlc, split) -> list[tuple[int, int, int]]:
    """(a, b, bars) for every pair of windows of different splits (embargo and other non-split
    values are ignored) where window b's first bars are window a's last ones: b[:105-k] equals
    a[k:] for some k, i.e. they share 105 - k bars. Found from the bars' content, so it needs no
    time axis: exact for windows cut from one series (a coincidence of identical OHLC rows can
    only add a pair, never hide one, so an embargo built on it is conservative)."""
    split = np.asarray(split, dtype=object).astype(str)
    in_split = np.flatnonzero(np.isin(split, SPLITS))
    if in_split.size < 2:
        return []
    return [(int(in_split[a]), int(in_split[b]), n)
            for a, b, n in overlapping_pairs(np.asarray(ohlc)[in_split], split[in_split])]


def overlapping_pairs(ohlc, labels=None) -> list[tuple[int, int, int]]:
    """(a, b, bars) for every pair of windows where b's first bars are a's last ones (b[:105-k]
    equals a[k:]), found from the bars' content: the rule `shared_bars` applies across splits
    and the folds apply between a fold's train and test windows. With `labels`, only pairs of
    different labels are compared (windows of one split may overlap freely)."""
    if len(ohlc) < 2:
        return []
    h = _bar_hashes(np.asarray(ohlc))
    heads: dict[int, list[int]] = {}
    for j, first in enumerate(h[:, 0].tolist()):
        heads.setdefault(first, []).append(j)
    out = []
    hits = np.argwhere(np.isin(h, np.fromiter(heads, np.uint64, len(heads))))
    for i, k in hits.tolist():
        for j in heads[int(h[i, k])]:
            if j == i or (labels is not None and labels[i] == labels[j]):
                continue
            if np.array_equal(h[i, k:], h[j, :WINDOW - k]):
                out.append((int(i), int(j), WINDOW - k))
    return out


def _group_split(group_id: np.ndarray, sizes, seed: int) -> np.ndarray:
    groups, inverse, counts = np.unique(group_id.astype(str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(groups))
    group_split = np.full(len(groups), "train", dtype=object)
    targets = {"val": sizes[1], "test": sizes[2]}
    filled = {"val": 0, "test": 0}
    for g in order:                               # greedy: fill val, then test, in shuffled order
        for name in ("val", "test"):
            if filled[name] + counts[g] <= targets[name] and filled[name] < targets[name]:
                group_split[g] = name
                filled[name] += counts[g]
                break
    return group_split[inverse]


@dataclass
class LeakageReport:
    ok: bool
    shared_groups: list[str]         # group ids found in more than one split
    shared_bar_pairs: int            # adjacent window pairs of different splits sharing bars
    examples: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def check_leakage(split, group_id, bar_index=None, t0=None, window: int = WINDOW,
                  ohlc=None) -> LeakageReport:
    """Prove a split clean: no group in two splits, no bar in windows of two splits.

    Embargoed windows belong to no split and are ignored. With bar ordinals, windows all have
    `window` bars, so two windows of different splits share a bar only if some pair adjacent in
    bar order does. With t0 alone (minutes, not bars) the windows' bars are compared instead
    (`shared_bars`, given `ohlc`), and the minute order is checked as well.
    """
    split = np.asarray(split, dtype=object)
    in_split = np.isin(split.astype(str), SPLITS)
    groups = np.asarray(group_id, dtype=object).astype(str)
    shared = []
    seen: dict[str, str] = {}
    for g, s in zip(groups[in_split], split[in_split]):
        if seen.setdefault(g, s) != s:
            shared.append(g)
    shared = sorted({str(g) for g in shared})  # plain str: messages show 'g0', not np.str_
    examples = [f"group {g!r} is in more than one split" for g in shared[:5]]
    pairs = 0
    pos, _ = positions(t0, bar_index)
    if pos is not None:
        idx = np.flatnonzero(in_split)
        idx = idx[np.argsort(pos[idx], kind="stable")]
        p, s = pos[idx], split[idx]
        clash = np.flatnonzero((s[1:] != s[:-1]) & (p[1:] - p[:-1] < window))
        pairs = int(clash.size)
        for k in clash[:5]:
            examples.append(f"windows at bar {p[k]} ({s[k]}) and bar {p[k + 1]} ({s[k + 1]}) "
                            f"share {window - (p[k + 1] - p[k])} bars")
    if ohlc is not None and (bar_index is None or not (np.asarray(bar_index) >= 0).all()):
        for a, b, n in shared_bars(ohlc, split):
            pairs += 1
            if len(examples) < 10:
                examples.append(f"windows at rows {a} ({split[a]}) and {b} ({split[b]}) share "
                                f"{n} bars (the same OHLC rows)")
    return LeakageReport(ok=not shared and pairs == 0, shared_groups=shared,
                         shared_bar_pairs=pairs, examples=examples)
