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
  Positions from `t0` alone count 1-minute bars (moola's NQ data); a bar series gives exact rows.
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
MINUTE_US = 60_000_000       # t0 positions are counted in 1-minute bars


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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{s} {self.counts.get(s, 0)}" for s in (*SPLITS, EMBARGO) if self.counts.get(s)]
        text = f"split by {self.policy} ({self.key}): " + ", ".join(parts)
        if self.embargoed:
            text += (f" ({self.embargoed} window{'s' if self.embargoed > 1 else ''} excluded: "
                     f"within {self.embargo_bars} bars of, or in a group with, a later split)")
        return text


def _positions(t0, bar_index) -> tuple[np.ndarray | None, str]:
    """Each window's first bar on a common axis (bars), or None when some window has none."""
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
            return (t - t.min()) // MINUTE_US, "t0"
    return None, ""


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: each "
                        f"must be in [0, 1) and together below 1")
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return n - n_val - n_test, n_val, n_test


def assign_splits(t0, group_id, policy: str = "auto", val_fraction: float = 0.2,
                  test_fraction: float = 0.0, seed: int = 0, embargo_bars: int = WINDOW,
                  bar_index=None) -> tuple[np.ndarray, SplitReport]:
    """Split names per window ("train"/"val"/"test", or "embargo" for excluded windows) and a report.

    `t0`: datetime64 or int64 microseconds per window (NaT/int64-min for none) or None;
    `bar_index`: first bar per window in the bar series (-1 for none) or None.
    Deterministic in its inputs and `seed`.
    """
    group_id = np.asarray(group_id, dtype=object)
    n = len(group_id)
    n_train, n_val, n_test = split_sizes(n, val_fraction, test_fraction)
    pos, key = _positions(t0, bar_index)
    if policy == "auto":
        policy = "time" if pos is not None else "group"
    if policy == "time":
        if pos is None:
            raise UserError("--split time needs a position for every window (t0 or bar_index); "
                            "this data set has windows without one: use --split group")
        if embargo_bars < WINDOW:
            raise UserError(f"embargo of {embargo_bars} bars: must be at least {WINDOW} (the "
                            f"window length) so that no bar belongs to two splits")
        split = _time_split(pos, np.asarray(group_id, dtype=str), (n_train, n_val, n_test),
                            embargo_bars)
    elif policy == "group":
        key, embargo_bars = "group_id", 0
        split = _group_split(group_id, (n_train, n_val, n_test), seed)
    else:
        raise UserError(f"--split {policy!r}: use time, group or auto")
    counts = {s: int((split == s).sum()) for s in (*SPLITS, EMBARGO)}
    report = SplitReport(policy=policy, key=key, counts=counts, embargoed=counts[EMBARGO],
                         embargo_bars=embargo_bars, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed)
    if policy == "group":
        sizes = (n_train, n_val, n_test)
        got = (counts["train"], counts["val"], counts["test"])
        if got != sizes:
            report.notes.append(f"whole groups cannot fill the exact sizes {sizes}; got {got}")
    return split, report


def _time_split(pos: np.ndarray, groups: np.ndarray, sizes, embargo_bars: int) -> np.ndarray:
    order = np.lexsort((groups, pos))            # by first bar, ties by group_id: deterministic
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


def check_leakage(split, group_id, bar_index=None, t0=None, window: int = WINDOW) -> LeakageReport:
    """Prove a split clean: no group in two splits, no bar in windows of two splits.

    Embargoed windows belong to no split and are ignored. Windows all have `window` bars, so two
    windows of different splits share a bar only if some pair adjacent in time order does.
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
    pos, _ = _positions(t0, bar_index)
    if pos is not None:
        idx = np.flatnonzero(in_split)
        idx = idx[np.argsort(pos[idx], kind="stable")]
        p, s = pos[idx], split[idx]
        clash = np.flatnonzero((s[1:] != s[:-1]) & (p[1:] - p[:-1] < window))
        pairs = int(clash.size)
        for k in clash[:5]:
            examples.append(f"windows at bar {p[k]} ({s[k]}) and bar {p[k + 1]} ({s[k + 1]}) "
                            f"share {window - (p[k + 1] - p[k])} bars")
    return LeakageReport(ok=not shared and pairs == 0, shared_groups=shared,
                         shared_bar_pairs=pairs, examples=examples)
