"""A synthetic, learnable data set that looks like moola's labeled NQ windows.

One continuous series of 1-minute bars (UTC, NQ-like prices around 15,000-20,000 on a 0.25 tick)
is built episode by episode. Each episode is:

    lead-in trend | pre-expansion state | expansion [start, end] | continuation
                   ^ window bar 0 lies somewhere in here            (window ends at bar 104)

- consolidation (label 0): a low-volatility range that mean-reverts around a level;
- retracement (label 1): a counter-trend drift against the coming expansion's direction;
- expansion: a high-volatility directional move of 1..40 bars (lognormal length, median 5,
  mean about 7, so about 7% of bars are in-span, as in moola-domain.md 1.4);
- continuation: normal volatility with a mild drift the expansion's way.

The expansion start is uniform in 0..101 (as in the real labels) and about 45% of windows are
retracements (1.5). Windows never share bars: a gap of GAP_MIN..GAP_MAX bars of continuation lies
between consecutive windows, so a time split with a 105-bar embargo loses no window (50 windows
give exactly 40/10). The pre-expansion state starts up to LEAD_MAX bars before bar 0, so a window
whose expansion starts at bar 0 still follows a real pre-state, as in the data. A 60-minute
session break is put in a gap (never inside a window) about once a trading day.

Everything is drawn from numpy's PCG64 seeded with `seed`: the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data import schema
from pipeline.errors import UserError

TICK = 0.25
BASE_VOL = 0.00035          # log-return sd per 1-minute bar in normal trading
CENTER_PRICE = 17_500.0     # prices drift around this level
MEAN_REVERSION = 0.004      # per-episode pull of the log price toward the center
P_RETRACEMENT = 0.45
LEAD_MIN, LEAD_MAX = 8, 30  # pre-state bars before window bar 0
GAP_MIN, GAP_MAX = 36, 90   # bars between the last bar of a window and the next window's bar 0
SESSION_BARS = 1380         # 23 trading hours, then a 60-minute break
START_TIME = np.datetime64("2024-01-02T00:00", "us")
MINUTE = np.timedelta64(60_000_000, "us")


@dataclass
class Synthetic:
    """A synthetic data set: the canonical windows plus what `--bars-out` writes."""

    windows: schema.WindowSet
    timestamps: np.ndarray      # datetime64[us] per bar
    ohlc: np.ndarray            # float64 [N, 4]
    starts: np.ndarray          # first bar of each window
    labels: np.ndarray          # 0/1 per window
    expansion: np.ndarray       # int [n, 2] start, end inside the window


EXPANSION_MEDIAN = 5.3     # bars: about 7% of bars in span, as in moola's labels


def expansion_lengths(rng: np.random.Generator, n: int, median: float = EXPANSION_MEDIAN) -> np.ndarray:
    """Lengths 1..40: lognormal with median 5 and mean about 7 (moola-domain.md 1.4) by
    default; a smaller `median` gives the short expansions of other markets (median 2: ~3%)."""
    return np.clip(np.round(rng.lognormal(np.log(median), 0.85, size=n)), 1, 40).astype(np.int64)


def _range_path(rng, m: int, vol: float) -> np.ndarray:
    """Log-price offsets of a mean-reverting range: smoothed noise around 0 (never trends)."""
    z = rng.normal(0.0, 1.0, size=m + 2)
    level = (z[:-2] + z[1:-1] + z[2:]) / 3.0 * vol * 2.0
    return level - level[0]


def synthesize(n_windows: int, seed: int, retracement_fraction: float = P_RETRACEMENT,
               expansion_median: float = EXPANSION_MEDIAN) -> Synthetic:
    """`retracement_fraction` (0.45 as in moola; real markets may be far more imbalanced, e.g.
    0.15) and `expansion_median` (bars; 5.3 gives ~7% of bars in span, 2 gives ~3%) make the
    realistic imbalanced sets the defaults must also work on. The defaults draw the same bytes
    as before these options existed."""
    if not 0.0 <= retracement_fraction <= 1.0:
        raise UserError(f"--retracement-fraction {retracement_fraction}: must be in [0, 1]")
    if not 1.0 <= expansion_median <= 40.0:
        raise UserError(f"--expansion-median {expansion_median}: must be in [1, 40] bars")
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_windows) < retracement_fraction).astype(np.int64)
    exp_start = rng.integers(0, 102, size=n_windows)
    exp_len = np.minimum(expansion_lengths(rng, n_windows, expansion_median),
                         schema.WINDOW - exp_start)
    exp_end = exp_start + exp_len - 1
    direction = np.where(rng.random(n_windows) < 0.5, -1.0, 1.0)

    returns, vols, starts, breaks = [], [], [], []
    n_bars = 0
    since_break = 0
    start_price = rng.uniform(15_500.0, 19_500.0)
    log_p = np.log(start_price)
    for i in range(n_windows):
        d, s, e = direction[i], int(exp_start[i]), int(exp_end[i])
        vol = BASE_VOL * rng.uniform(0.8, 1.25)          # this episode's volatility regime
        gap = int(rng.integers(GAP_MIN, GAP_MAX + 1))
        lead = int(rng.integers(LEAD_MIN, LEAD_MAX + 1))
        if since_break + gap + schema.WINDOW > SESSION_BARS:
            breaks.append(n_bars)                          # session break at this gap's first bar
            since_break = 0
        pull = -MEAN_REVERSION * (log_p - np.log(CENTER_PRICE))
        # lead-in: continuation of the market, trending the way the expansion will go
        m_in = gap - lead
        r_in = rng.normal(0.25 * d * vol, vol, size=m_in)
        v_in = np.full(m_in, vol)
        # pre-expansion state: `lead` bars before the window plus window bars 0..s-1
        m_pre = lead + s
        if labels[i] == 0:
            r_pre = np.diff(_range_path(rng, m_pre, 0.45 * vol), prepend=0.0)
            v_pre = np.full(m_pre, 0.4 * vol)
        else:
            r_pre = rng.normal(-0.55 * d * vol, 0.8 * vol, size=m_pre)
            v_pre = np.full(m_pre, 0.8 * vol)
        # expansion: window bars s..e, fast and one-directional
        m_exp = e - s + 1
        r_exp = rng.normal(2.6 * d * vol, 1.6 * vol, size=m_exp)
        v_exp = np.full(m_exp, 2.0 * vol)
        # continuation: window bars e+1..104
        m_post = schema.WINDOW - 1 - e
        r_post = rng.normal(0.2 * d * vol, 1.1 * vol, size=m_post)
        v_post = np.full(m_post, 1.1 * vol)
        r = np.concatenate([r_in, r_pre, r_exp, r_post]) + pull
        returns.append(r)
        vols.append(np.concatenate([v_in, v_pre, v_exp, v_post]))
        starts.append(n_bars + gap)
        n_bars += gap + schema.WINDOW
        since_break += gap + schema.WINDOW
        log_p += r.sum()
    tail = 20                                              # a little market after the last window
    returns.append(rng.normal(0.0, BASE_VOL, size=tail))
    vols.append(np.full(tail, BASE_VOL))
    n_bars += tail

    r = np.concatenate(returns)
    v = np.concatenate(vols)
    ohlc = _bars_from_returns(rng, r, v, start_price)
    timestamps = _timestamps(n_bars, np.asarray(breaks, dtype=np.int64))
    starts = np.asarray(starts, dtype=np.int64)
    ids = [f"synth-{seed}-{i:06d}" for i in range(n_windows)]
    windows = schema.windows_table(
        ids, ids, t0=timestamps[starts], bar_index=starts, label=labels,
        expansion_start=exp_start, expansion_end=exp_end)
    ws = schema.WindowSet(windows, schema.bars_table(timestamps.astype(np.int64), ohlc), {})
    return Synthetic(ws, timestamps, ohlc, starts, labels, np.stack([exp_start, exp_end], axis=1))


def _bars_from_returns(rng, r: np.ndarray, vol: np.ndarray, start_price: float) -> np.ndarray:
    """Close path from log returns, open = previous close, wicks scaled by the bar's volatility,
    everything on the 0.25 tick grid with low <= open, close <= high."""
    close = np.round(start_price * np.exp(np.cumsum(r)) / TICK) * TICK
    open_ = np.concatenate([[np.round(start_price / TICK) * TICK], close[:-1]])
    wick = close * vol * 0.6
    up = np.round(np.abs(rng.normal(size=len(r))) * wick / TICK) * TICK
    down = np.round(np.abs(rng.normal(size=len(r))) * wick / TICK) * TICK
    high = np.maximum(open_, close) + up
    low = np.minimum(open_, close) - down
    return np.stack([open_, high, low, close], axis=1)


def _timestamps(n_bars: int, breaks: np.ndarray) -> np.ndarray:
    """1-minute bars from START_TIME; each session break adds 60 minutes before its bar."""
    minutes = np.arange(n_bars, dtype=np.int64)
    shift = np.zeros(n_bars, dtype=np.int64)
    if breaks.size:
        np.add.at(shift, breaks[breaks > 0], 60)
        shift = np.cumsum(shift)
    return START_TIME + (minutes + shift) * MINUTE


def labels_rows(syn: Synthetic) -> dict[str, list]:
    """The labels CSV columns for the bars+labels ingest path (start as an ISO timestamp)."""
    t0 = syn.timestamps[syn.starts]
    return {
        "window_id": syn.windows.windows.column("window_id").to_pylist(),
        "start": [str(t.astype("datetime64[s]")) + "Z" for t in t0],
        "label": [schema.LABELS[c] for c in syn.labels],
        "expansion_start": syn.expansion[:, 0].tolist(),
        "expansion_end": syn.expansion[:, 1].tolist(),
    }
