"""The relativity features: 12 bounded, scale-free channels per bar (+ an optional position).

Two entry points compute the same features:
- `bar_features(ohlc, segment_start)`: once per bar on a continuous series, so the range EMA,
  the ATR and the zigzag carry their state from one window into the next (the old code restarted
  them in every labeled window). State resets where `segment_start` is true (a session gap).
- `window_features(ohlc)`: windows without a bar series; each window on its own (state restarts
  at its bar 0), vectorised across windows.
For a window whose series starts at its bar 0 both give identical results (tests check it).
`windows_from_bars` then cuts 105-bar windows as views of the per-bar arrays.

Formulas (moola-domain.md 2.1; eps = 1e-6, rng = max(H-L, eps)), with the choices the brief
leaves open made explicit:
 1 open_norm      (O-L)/rng                  [0,1]
 2 close_norm     (C-L)/rng                  [0,1]
 3 body_pct       (C-O)/rng                  [-1,1]
 4 upper_wick_pct (H-max(O,C))/rng           [0,1]
 5 lower_wick_pct (min(O,C)-L)/rng           [0,1]
 6 range_z        (H-L)/max(EMA_range, eps)  [0,3]  EMA alpha 2/21, seeded with the segment's
                  first range, and it includes the current bar: ema_i = a*r_i + (1-a)*ema_{i-1}.
 7 dist_to_prev_SH (SH_price - C)/ATR        [-3,3]  0 until a swing high is confirmed
 8 dist_to_prev_SL (C - SL_price)/ATR        [-3,3]  0 until a swing low is confirmed
 9 bars_since_SH_norm (i - SH_idx)/105       [0,3]   SH_idx is the bar of the extreme; 0 before
10 bars_since_SL_norm (i - SL_idx)/105       [0,3]
11 expansion_proxy range_z*leg_dir*body_pct  [-2,2]  leg_dir +1 up leg, -1 down leg, 0 before
                  the zigzag starts; range_z and body_pct are the clipped values above
12 consol_proxy   (1-range_z/3)(1-|body_pct|)(bars_since_SH+bars_since_SL)/2   [0,3]
13 position       t/104 within the window (relativity13 only)
ATR: mean of the last 10 true ranges TR = max(H-L, |H-C_prev|, |L-C_prev|); the first bar of a
segment has no TR (its ATR is 0), then an expanding mean until 10 TRs exist. The divisions by
ATR use max(ATR, eps). The swing state (SH/SL, leg) is the zigzag's after processing bar i
(`zigzag.py`; a swing confirmed on bar i already counts at bar i: it is known at its close).

All features use price differences and ratios only, so they are invariant to scaling and to
offsetting prices (up to float rounding and the absolute eps on near-zero ranges).

Valid bars: the first `WARMUP_BARS` bars of every segment (every window, for window_features)
are not valid: the ATR needs 11 bars for its 10 true ranges, the range EMA still weighs its seed
by (19/21)^20 = 13% after 20 bars, and the zigzag needs a first swing or two.
"""

from __future__ import annotations

from itertools import accumulate

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.data import zigzag
from pipeline.errors import UserError

WINDOW = 105
WARMUP_BARS = 20
EPS = 1e-6
EMA_ALPHA = 2.0 / (20 + 1)  # ema_range_period 20
ATR_PERIOD = 10
BARS_NORM = 105.0  # bars_since_* are in units of one window
_CHUNK = 1 << 15  # bars per elementwise chunk (temporaries stay in cache)
_WINDOW_CHUNK = 4096  # windows per window_features chunk

BASE_FEATURES = [
    "open_norm", "close_norm", "body_pct", "upper_wick_pct", "lower_wick_pct", "range_z",
    "dist_to_prev_SH", "dist_to_prev_SL", "bars_since_SH_norm", "bars_since_SL_norm",
    "expansion_proxy", "consol_proxy",
]
FEATURE_SETS = {
    "relativity12": list(BASE_FEATURES),
    "relativity13": [*BASE_FEATURES, "position"],
}

# (low, high) clip of each base feature, in BASE_FEATURES order
BOUNDS = np.array([
    (0, 1), (0, 1), (-1, 1), (0, 1), (0, 1), (0, 3),
    (-3, 3), (-3, 3), (0, 3), (0, 3), (-2, 2), (0, 3),
], dtype=np.float64)


def feature_names(feature_set: str) -> list[str]:
    """Names of a feature set; an unknown name is the user's `--features` choice."""
    if feature_set not in FEATURE_SETS:
        raise UserError(f"unknown feature set {feature_set!r} (--features): "
                        f"choose one of {', '.join(FEATURE_SETS)}")
    return list(FEATURE_SETS[feature_set])


# ---------------------------------------------------------------------------------------------
# Public API


def bar_features(ohlc, segment_start=None) -> tuple[np.ndarray, np.ndarray]:
    """Features of every bar of a continuous series: (float32 [N,12], valid bool [N]).

    `segment_start` (bool [N]) marks bars after a session gap, where all state restarts; bar 0
    always starts a segment.
    """
    ohlc = _check_ohlc(ohlc, ndim=2)
    n = len(ohlc)
    starts = np.zeros(n, dtype=bool)
    if segment_start is not None:
        segment_start = np.asarray(segment_start)
        if segment_start.shape != (n,) or segment_start.dtype != np.bool_:
            raise ValueError(f"segment_start must be bool [{n}], got {segment_start.dtype} {segment_start.shape}")
        starts |= segment_start
    if n == 0:
        return np.zeros((0, len(BASE_FEATURES)), np.float32), np.zeros(0, bool)
    starts[0] = True
    index = np.arange(n)
    begin_of_bar = np.maximum.accumulate(np.where(starts, index, 0))
    pos = index - begin_of_bar
    seg_begin = np.flatnonzero(starts)
    seg_end = np.append(seg_begin[1:], n)

    o, h, l, c = ohlc.T
    atr = _atr(h, l, c, pos)
    ema = _ema_series(h - l, seg_begin, seg_end)
    events = zigzag.series_events(h, l, c, atr, seg_begin, seg_end)
    swings = zigzag.series_states(events, begin_of_bar)
    feats = _assemble(o, h, l, c, ema, atr, index, swings)
    return feats, pos >= WARMUP_BARS


def window_features(ohlc) -> tuple[np.ndarray, np.ndarray]:
    """Features of independent windows: (float32 [n,105,12], valid bool [n,105]).

    Each window starts fresh at its bar 0. The sequential parts (range EMA, zigzag) loop over
    the 105 time steps with numpy ops across all windows; the rest runs on the flattened bars.
    """
    ohlc = _check_ohlc(ohlc, ndim=3)
    feats = np.empty((len(ohlc), WINDOW, len(BASE_FEATURES)), dtype=np.float32)
    for a in range(0, len(ohlc), _WINDOW_CHUNK):  # bounded memory on large inputs
        feats[a:a + _WINDOW_CHUNK] = _window_chunk(ohlc[a:a + _WINDOW_CHUNK])
    valid = np.broadcast_to(np.arange(WINDOW) >= WARMUP_BARS, (len(ohlc), WINDOW)).copy()
    return feats, valid


def windows_from_bars(bar_feat, bar_valid, starts, feature_set: str = "relativity12"):
    """Windows [n,105,F] and their valid mask [n,105] starting at bars `starts`.

    When the starts are evenly spaced (a stride cut, or a single window) the result is a
    strided, read-only view of `bar_feat` (no copy); arbitrary starts need a gather, which
    copies. The relativity13 position channel is appended, which copies too.
    """
    names = feature_names(feature_set)
    bar_feat = np.asarray(bar_feat)
    bar_valid = np.asarray(bar_valid)
    if bar_feat.ndim != 2 or bar_feat.shape[1] != len(BASE_FEATURES):
        raise ValueError(f"bar_feat must be [N,{len(BASE_FEATURES)}], got {bar_feat.shape}")
    if bar_valid.shape != bar_feat.shape[:1]:
        raise ValueError(f"bar_valid must be [{len(bar_feat)}], got {bar_valid.shape}")
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    last_start = len(bar_feat) - WINDOW
    if len(starts) and (starts.min() < 0 or starts.max() > last_start):
        raise ValueError(f"window starts must lie in [0, {last_start}] for {len(bar_feat)} bars")
    if len(starts) == 0:
        return (np.zeros((0, WINDOW, len(names)), bar_feat.dtype), np.zeros((0, WINDOW), bar_valid.dtype))
    # [N-104, 105, 12] and [N-104, 105]: row s is the window starting at bar s (views)
    feat_windows = sliding_window_view(bar_feat, WINDOW, axis=0).transpose(0, 2, 1)
    valid_windows = sliding_window_view(bar_valid, WINDOW)
    step = int(starts[1] - starts[0]) if len(starts) > 1 else 1
    if step > 0 and np.array_equal(starts, starts[0] + step * np.arange(len(starts))):
        rows = slice(int(starts[0]), int(starts[-1]) + 1, step)
    else:
        rows = starts
    return with_feature_set(feat_windows[rows], feature_set), valid_windows[rows]


def with_feature_set(windows: np.ndarray, feature_set: str) -> np.ndarray:
    """[n,105,12] base features -> the named set (relativity13 appends position = t/104)."""
    names = feature_names(feature_set)
    if len(names) == len(BASE_FEATURES):
        return windows
    n, steps, _ = windows.shape
    out = np.empty((n, steps, len(names)), dtype=windows.dtype)
    out[..., : len(BASE_FEATURES)] = windows
    out[..., len(BASE_FEATURES)] = np.arange(steps) / (steps - 1)
    return out


# ---------------------------------------------------------------------------------------------
# The parts both entry points share (so they agree bit for bit)


def _check_ohlc(ohlc, ndim: int) -> np.ndarray:
    ohlc = np.asarray(ohlc)
    shape = "[N,4]" if ndim == 2 else f"[n,{WINDOW},4]"
    if ohlc.ndim != ndim or ohlc.shape[-1] != 4 or (ndim == 3 and ohlc.shape[1] != WINDOW):
        raise ValueError(f"ohlc must be {shape}, got shape {ohlc.shape}")
    if not np.issubdtype(ohlc.dtype, np.floating):
        raise ValueError(f"ohlc must be floating point, got {ohlc.dtype}")
    ohlc = np.ascontiguousarray(ohlc, dtype=np.float64)
    if not np.isfinite(ohlc).all():
        bad = np.argwhere(~np.isfinite(ohlc))[0]
        raise ValueError(f"ohlc has a non-finite value at index {tuple(bad.tolist())}")
    return ohlc


def _window_chunk(ohlc: np.ndarray) -> np.ndarray:
    """window_features of up to _WINDOW_CHUNK windows; per-bar parts run on the flat bars."""
    n, steps = ohlc.shape[:2]
    flat = ohlc.reshape(n * steps, 4)
    pos = np.tile(np.arange(steps), n)
    o, h, l, c = flat.T
    atr = _atr(h, l, c, pos)
    ema = _ema_windows((h - l).reshape(n, steps)).reshape(-1)
    shaped = [x.reshape(n, steps) for x in (h, l, c, atr)]
    swings = zigzag.window_states(*shaped)
    swings = zigzag.SwingState(**{k: v.reshape(-1) for k, v in vars(swings).items()})
    return _assemble(o, h, l, c, ema, atr, pos, swings).reshape(n, steps, -1)


def _atr(h, l, c, pos) -> np.ndarray:
    """Mean of the last ATR_PERIOD true ranges of the bar's segment; 0 on a segment's first bar.

    Summed lag by lag (adding exact zeros outside the segment), so the result for a bar depends
    only on its segment, never on where the series started: bar and window paths agree exactly.
    """
    prev_close = np.empty_like(c)
    prev_close[0] = c[0]
    prev_close[1:] = c[:-1]
    tr = np.maximum(h - l, np.maximum(np.abs(h - prev_close), np.abs(l - prev_close)))
    tr[pos == 0] = 0.0  # a segment's first bar has no previous close, so no TR
    total = tr.copy()
    for lag in range(1, ATR_PERIOD):
        total[lag:] += np.where(pos[lag:] > lag, tr[:-lag], 0.0)
    count = np.minimum(pos, ATR_PERIOD)
    return total / np.maximum(count, 1)


def _ema_series(r, seg_begin, seg_end) -> np.ndarray:
    """Range EMA per segment, seeded with the segment's first range (sequential by nature)."""
    a, b = EMA_ALPHA, 1.0 - EMA_ALPHA
    out = np.empty_like(r)
    for begin, end in zip(seg_begin.tolist(), seg_end.tolist()):
        out[begin:end] = list(accumulate(r[begin:end].tolist(), lambda e, x: a * x + b * e))
    return out


def _ema_windows(r) -> np.ndarray:
    """The same EMA on each row of r [n,T], one time step at a time across rows."""
    a, b = EMA_ALPHA, 1.0 - EMA_ALPHA
    r = np.ascontiguousarray(r.T)  # time-major: each step is a contiguous row
    out = np.empty_like(r)
    out[0] = r[0]
    for t in range(1, len(r)):
        out[t] = a * r[t] + b * out[t - 1]
    return np.ascontiguousarray(out.T)


def _assemble(o, h, l, c, ema, atr, index, swings: zigzag.SwingState) -> np.ndarray:
    """The 12 base features from per-bar prices and state (all [N]); float32 [N,12].

    Elementwise, so it runs in cache-sized chunks: whole-series temporaries are ~3x slower.
    """
    out = np.empty((len(c), len(BASE_FEATURES)), dtype=np.float32)
    for a in range(0, len(c), _CHUNK):
        part = slice(a, a + _CHUNK)
        chunk_swings = zigzag.SwingState(**{k: v[part] for k, v in vars(swings).items()})
        out[part] = _assemble_chunk(o[part], h[part], l[part], c[part], ema[part], atr[part],
                                    index[part], chunk_swings)
    return out


def _assemble_chunk(o, h, l, c, ema, atr, index, swings: zigzag.SwingState) -> np.ndarray:
    rng = np.maximum(h - l, EPS)
    body = np.clip((c - o) / rng, -1, 1)
    range_z = np.clip((h - l) / np.maximum(ema, EPS), 0, 3)
    safe_atr = np.maximum(atr, EPS)
    dist_sh = np.where(swings.has_sh, (swings.sh_price - c) / safe_atr, 0.0)
    dist_sl = np.where(swings.has_sl, (c - swings.sl_price) / safe_atr, 0.0)
    since_sh = np.where(swings.has_sh, (index - swings.sh_idx) / BARS_NORM, 0.0)
    since_sl = np.where(swings.has_sl, (index - swings.sl_idx) / BARS_NORM, 0.0)
    since_sh, since_sl = np.clip(since_sh, 0, 3), np.clip(since_sl, 0, 3)
    columns = [
        (o - l) / rng,
        (c - l) / rng,
        body,
        (h - np.maximum(o, c)) / rng,
        (np.minimum(o, c) - l) / rng,
        range_z,
        dist_sh,
        dist_sl,
        since_sh,
        since_sl,
        range_z * swings.leg_dir * body,
        (1 - range_z / 3) * (1 - np.abs(body)) * (since_sh + since_sl) / 2,
    ]
    # clip feature by feature into contiguous float32 rows (writing strided columns is ~8x slower)
    rows = np.empty((len(BASE_FEATURES), len(c)), dtype=np.float32)
    for k, column in enumerate(columns):
        np.clip(column, BOUNDS[k, 0], BOUNDS[k, 1], out=rows[k], casting="same_kind")
    return rows.T
