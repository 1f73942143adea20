"""Featurisation speed: bars/s of bar_features and windows/s of window_features, one core.

    .venv/bin/python bench/features.py [--bars 1800000] [--windows 30000] [--repeat 3]

Prints the best of --repeat runs beside two same-run baselines on the same bars, so the figure
can be compared across machines: a plain numpy pass (one elementwise feature) and a plain Python
loop (a running maximum over the closes, the cheapest sequential scan). Goal (issue 2): at least
1,000,000 bars/s per core, i.e. 1.8M bars in under 2 s.
"""

from __future__ import annotations

import os

# one core: keep any threaded numpy backend to a single thread
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from pipeline.data.features import WINDOW, bar_features, window_features, windows_from_bars  # noqa: E402


def random_walk_bars(n: int, seed: int = 0) -> np.ndarray:
    """1-minute-futures-like OHLC [n,4]: random-walk closes, wicks, a 0.25 tick grid."""
    rng = np.random.default_rng(seed)
    close = 15000 + np.cumsum(rng.normal(0, 1.5, n))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) + np.abs(rng.normal(0, 0.8, n))
    low = np.minimum(open_, close) - np.abs(rng.normal(0, 0.8, n))
    return np.round(np.stack([open_, high, low, close], axis=1) * 4) / 4


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def numpy_baseline(bars: np.ndarray) -> None:
    o, h, l, c = bars.T
    np.clip((c - l) / np.maximum(h - l, 1e-6), 0, 1).astype(np.float32)


def python_baseline(bars: np.ndarray) -> None:
    running_max = -np.inf
    for close in bars[:, 3].tolist():
        if close > running_max:
            running_max = close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_800_000)
    parser.add_argument("--windows", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    bars = random_walk_bars(args.bars)
    # a session break every 1,380 bars (23 h of 1-minute bars), as in real futures data
    breaks = np.arange(args.bars) % 1380 == 0
    windows = random_walk_bars(args.windows * WINDOW, seed=1).reshape(args.windows, WINDOW, 4)

    t_bars = best_time(lambda: bar_features(bars, breaks), args.repeat)
    feat, valid = bar_features(bars, breaks)
    t_cut = best_time(lambda: windows_from_bars(feat, valid, np.arange(len(bars) - WINDOW + 1)), args.repeat)
    t_windows = best_time(lambda: window_features(windows), args.repeat)
    t_numpy = best_time(lambda: numpy_baseline(bars), args.repeat)
    t_python = best_time(lambda: python_baseline(bars), args.repeat)

    n = args.bars
    print(f"bars: {n:,} random-walk 1-minute bars, best of {args.repeat}, one core")
    print(f"bar_features        {n / t_bars:>14,.0f} bars/s   ({t_bars:.3f} s; goal >= 1,000,000 bars/s, < 2 s)")
    print(f"windows_from_bars   {(n - WINDOW + 1) / t_cut:>14,.0f} windows/s (stride-1 views, {t_cut * 1e3:.2f} ms)")
    print(f"window_features     {args.windows / t_windows:>14,.0f} windows/s "
          f"({args.windows:,} windows, {args.windows * WINDOW / t_windows:,.0f} bars/s)")
    print(f"baseline numpy pass {n / t_numpy:>14,.0f} bars/s   (one elementwise feature, same bars)")
    print(f"baseline python loop{n / t_python:>14,.0f} bars/s   (running max of closes, same bars)")
    print(f"bar_features / numpy pass = {t_bars / t_numpy:.1f}x the time; "
          f"/ python loop = {t_bars / t_python:.1f}x")


if __name__ == "__main__":
    main()
