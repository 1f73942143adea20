"""`predict` speed: windows/s per core from raw bars to written predictions, beside a plain loop.

    .venv/bin/python bench/predict.py [--windows 20000] [--strides 1,52] [--actors 1,2]
                                      [--batch 1024] [--repeat 2] [--run RUN] [--skip-ray]

1. Local engine, one core (torch, numpy, Arrow on one thread), end to end: `predict()` on a
   Parquet bar file of random-walk 1-minute bars (read and checked as ingest does, features once
   per bar, windows cut as views, the model, Parquet written to staging and published), at each
   stride with --windows windows; beside the same-run baseline, a plain `torch.no_grad()`
   forward loop over the same windows' feature tensors (already contiguous, batch --batch).
   Goal: end to end >= 0.8 of the plain loop. Rates are on this process's CPU time (the
   machine's other work does not count against either) and, in brackets, on wall time.
2. Ray engine on a local Ray, 1 then 2 actors (one CPU each): wall time (Ray start, actor start,
   the job, publish) and the steady rate (windows from the first finished chunk to the last).

The model is a real run's (default size: hidden 96, all four heads): --run RUN, or a 1-epoch
run trained here first on 50 synthetic windows (`train --workers 0`, about a minute).
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

WINDOW = 105


def one_core() -> None:
    import pyarrow as pa
    import torch
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)


def train_run(root: str) -> str:
    """A real (1-epoch, default-size) run to take the model from."""
    cli = [sys.executable, "-m", "pipeline.cli"]
    subprocess.run([*cli, "data", "build", "--out", f"{root}/shards", "--windows", "50"],
                   check=True, capture_output=True)
    subprocess.run([*cli, "train", "--workers", "0", "--data", f"{root}/shards", "--out",
                    f"{root}/run", "--epochs", "1"], check=True, capture_output=True)
    return f"{root}/run"


def bar_file(path: str, n_bars: int, seed: int = 0) -> str:
    """Random-walk 1-minute bars (bench/features.py's) as a Parquet bar file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sys.path.insert(0, os.path.dirname(__file__))
    from features import random_walk_bars
    ohlc = random_walk_bars(n_bars, seed)
    ts = np.datetime64("2024-01-02T00:00", "us") + np.arange(n_bars) * np.timedelta64(60, "s")
    pq.write_table(pa.table({"timestamp": pa.array(ts).cast(pa.timestamp("us", tz="UTC")),
                             **{c: ohlc[:, i] for i, c in enumerate(["open", "high", "low", "close"])}}),
                   path)
    return path


def plain_loop(run: str, path: str, stride: int, batch: int) -> tuple[int, float]:
    """(windows, seconds) of a bare forward loop over the same windows' features."""
    import torch

    from pipeline.data import ingest
    from pipeline.data.features import bar_features, windows_from_bars
    from pipeline.data.shard_dataset import segment_starts
    from pipeline.trained_run import open_run
    net = open_run(run).net.eval()
    ts, ohlc, _, _ = ingest.read_bars(path)
    feat, valid = bar_features(ohlc, segment_starts(ts))
    starts = np.arange(0, len(ts) - WINDOW + 1, stride)
    x, _ = windows_from_bars(feat, valid, starts)
    batches = [torch.from_numpy(np.ascontiguousarray(x[a:a + batch]))
               for a in range(0, len(x), batch)]
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in batches:
            net(b)
    return len(starts), time.perf_counter() - start, time.process_time() - cpu


def end_to_end(run: str, path: str, out: str, stride: int, batch: int, engine: str = "local",
               actors: int | None = None) -> tuple[int, float, float, float | None]:
    """(windows, wall s, this process's CPU s, steady windows/s between the first and the last
    progress report)."""
    from pipeline.predict import Options, predict
    seen: list[tuple[float, int]] = []
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    manifest = predict(run, path, out, options=Options(stride=stride, batch_size=batch),
                       engine=engine, ray_options={"actors": actors},
                       progress=lambda step, done, total: seen.append((time.perf_counter(), done)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    moving = [(t, d) for t, d in seen if d > 0]
    steady = None
    if len(moving) > 1 and moving[-1][1] > moving[0][1]:
        steady = (moving[-1][1] - moving[0][1]) / (moving[-1][0] - moving[0][0])
    return manifest["rows"]["windows"], wall, cpu, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20_000)
    parser.add_argument("--strides", default="1,52")
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--run", default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    one_core()
    root = tempfile.mkdtemp(prefix="bench-predict-")
    try:
        run = args.run or train_run(root)
        print(f"model: {run} (hidden {_hidden(run)}); {args.windows:,} windows per stride; "
              f"batch {args.batch}; one core; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print("windows/s per core: on CPU time (this process, one thread), and on wall time in "
              "brackets; best of --repeat, plain and end to end interleaved")
        print(f"{'stride':>6} {'bars':>10} {'plain loop':>18} {'end to end':>18} {'ratio':>6}")
        files = {}
        for stride in map(int, args.strides.split(",")):
            n_bars = (args.windows - 1) * stride + WINDOW
            files[stride] = bar_file(f"{root}/bars-{stride}.parquet", n_bars)
            plain, e2e = [], []
            for _ in range(args.repeat):
                plain.append(plain_loop(run, files[stride], stride, args.batch))
                e2e.append(end_to_end(run, files[stride], f"{root}/out", stride, args.batch))
            n = plain[0][0]
            assert all(r[0] == n for r in e2e)
            p_cpu, p_wall = min(r[2] for r in plain), min(r[1] for r in plain)
            e_cpu, e_wall = min(r[2] for r in e2e), min(r[1] for r in e2e)
            print(f"{stride:>6} {n_bars:>10,} {n / p_cpu:>8,.0f} ({n / p_wall:>6,.0f}) "
                  f"{n / e_cpu:>8,.0f} ({n / e_wall:>6,.0f}) {p_cpu / e_cpu:>6.2f}")
        if args.skip_ray:
            return
        stride = min(files)
        print(f"ray engine (local Ray), stride {stride}, {args.windows:,} windows, one CPU per actor")
        print(f"{'actors':>6} {'wall s':>8} {'w/s (wall)':>11} {'steady w/s':>11} {'per actor':>10}")
        for actors in map(int, args.actors.split(",")):
            n, wall, _, steady = end_to_end(run, files[stride], f"{root}/out", stride, args.batch,
                                         "ray", actors)
            per = f"{steady / actors:,.0f}" if steady else "-"
            print(f"{actors:>6} {wall:>8.1f} {n / wall:>11,.0f} "
                  f"{(f'{steady:,.0f}' if steady else '-'):>11} {per:>10}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _hidden(run: str) -> int:
    from pipeline.trained_run import open_run
    return open_run(run).net.cfg.hidden


if __name__ == "__main__":
    main()
