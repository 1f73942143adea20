"""ShardLoader speed and memory, one core.

    .venv/bin/python bench/loader.py [--windows 100000] [--big 1000000] [--bars 1800000]
                                     [--strides 52,4] [--epochs 3] [--skip-big] [--skip-shard]

Prints a table:
1. windows/s per core reading local shards into torch tensors (F=12, batch 1024, shuffled),
   beside the same-run baseline of copying the same bytes with numpy (np.take of the same
   shuffled indices from an in-memory array: the gather alone, no Parquet). Goal >= 400,000/s.
2. Peak RSS of one reader streaming a split of --big windows (~5 GB of features) and of a split
   ten times smaller: it must not grow with the split. Goal < 1 GB.
3. Peak RSS and time of `moola-pipeline data shard` on --bars bars, cut with the default ingest
   stride 52 and with stride 4 (13x more windows). Goal < 4 GB.

Every measurement runs in a child process (peak RSS = that child's VmHWM), with pyarrow,
torch and BLAS on one thread. Shards are written to a temporary directory and deleted after;
the big split reuses one random block of rows so generating it costs only the write.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

WINDOW, F, BATCH = 105, 12, 1024
BLOCK_ROWS = 4096


def one_core() -> None:
    import pyarrow as pa
    import torch

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)


def peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM).

    Not getrusage: Linux carries ru_maxrss across fork + exec, so a child would report at least
    the RSS its parent (this bench, after writing a data set) had when it forked.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- data -----------------------------------------------------------------------------------

def fast_chunks(n_rows: int, split: str = "train", seed: int = 0):
    """Shard rows from one reused random block (distinct index and ids per row)."""
    rng = np.random.default_rng(seed)
    block = dict(
        features=rng.standard_normal((BLOCK_ROWS, WINDOW, F), dtype=np.float32),
        valid=rng.random((BLOCK_ROWS, WINDOW)) < 0.95,
        ohlc=(100 + rng.standard_normal((BLOCK_ROWS, WINDOW, 4))).astype(np.float32),
        label=rng.integers(0, 2, BLOCK_ROWS),
        expansion_start=rng.integers(0, 90, BLOCK_ROWS),
    )
    block["expansion_end"] = block["expansion_start"] + rng.integers(0, 14, BLOCK_ROWS)
    for lo in range(0, n_rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, n_rows - lo)
        ids = np.char.add("w", np.arange(lo, lo + n).astype(str))
        yield split, dict(window_id=ids, group_id=ids, t0=None, index=np.arange(lo, lo + n),
                          **{k: v[:n] for k, v in block.items()})


def write_split(out: str, n_rows: int) -> float:
    from pipeline.data.shards import write_shard_set

    start = time.perf_counter()
    write_shard_set(out, [f"f{i}" for i in range(F)], fast_chunks(n_rows))
    return time.perf_counter() - start


def write_bars_dataset(out: str, n_bars: int, stride: int) -> int:
    """A canonical windows data set cut from a random-walk bar series (1-minute bars)."""
    from pipeline.data import schema

    rng = np.random.default_rng(0)
    close = 15000 + np.cumsum(rng.normal(0, 1.5, n_bars))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) + np.abs(rng.normal(0, 0.8, n_bars))
    low = np.minimum(open_, close) - np.abs(rng.normal(0, 0.8, n_bars))
    ohlc = np.round(np.stack([open_, high, low, close], axis=1) * 4) / 4
    ts = np.datetime64("2024-01-02T00:00", "us").astype(np.int64) + np.arange(n_bars) * 60_000_000
    starts = np.arange(0, n_bars - WINDOW + 1, stride, dtype=np.int64)
    ids = [f"b{s}" for s in starts]
    windows = schema.windows_table(ids, ids, t0=(ts[starts]).astype("datetime64[us]"),
                                   bar_index=starts)
    schema.write_dataset(out, schema.WindowSet(windows, schema.bars_table(ts, ohlc), {}),
                         source={"bench": "random walk", "bars": n_bars, "stride": stride})
    return len(starts)


# ---- children -------------------------------------------------------------------------------

def child_throughput(path: str, epochs: int) -> dict:
    one_core()
    from pipeline.data.loader import ShardLoader

    loader = ShardLoader(path, "train", batch_size=BATCH, seed=0)
    n = loader.num_samples
    for _ in loader:  # warm-up epoch: first-touch allocations, page cache
        pass
    best_wall, best_cpu = float("inf"), float("inf")
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in loader:
            pass
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)

    # baseline: the same bytes, in memory, gathered by numpy with the same shuffled order
    features = np.empty((n, WINDOW, F), np.float32)
    valid = np.empty((n, WINDOW), np.uint8)
    loader.set_epoch(0)
    for batch in loader:
        idx = batch["index"].numpy()
        features[idx] = batch["features"].numpy()
        valid[idx] = batch["valid"].numpy()
    orders = [loader.rank_order(e) for e in range(1, epochs + 1)]
    base_wall, base_cpu = float("inf"), float("inf")
    for order in orders:
        wall, cpu = time.perf_counter(), time.process_time()
        for lo in range(0, n, BATCH):
            idx = order[lo:lo + BATCH]
            np.take(features, idx, axis=0)
            np.take(valid, idx, axis=0)
        base_wall = min(base_wall, time.perf_counter() - wall)
        base_cpu = min(base_cpu, time.process_time() - cpu)
    return {"windows": n, "loader_wall": n / best_wall, "loader_cpu": n / best_cpu,
            "numpy_wall": n / base_wall, "numpy_cpu": n / base_cpu}


def child_stream(path: str) -> dict:
    one_core()
    from pipeline.data.loader import ShardLoader

    base_rss = peak_rss_mb()
    start = time.perf_counter()
    loader = ShardLoader(path, "train", batch_size=BATCH, seed=0)  # verifies every sha256
    verify_s = time.perf_counter() - start
    count = 0
    start = time.perf_counter()
    for batch in loader:
        count += len(batch["index"])
    return {"windows": count, "rss_mb": peak_rss_mb(), "rss_after_imports_mb": base_rss,
            "verify_s": verify_s, "stream_s": time.perf_counter() - start}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# `moola-pipeline data shard` as a user runs it, reporting its own peak RSS when it exits.
SHARD_WRAPPER = """
import atexit, runpy, sys
sys.path.insert(0, {bench!r})
from loader import peak_rss_mb
atexit.register(lambda: print("PEAK_RSS_MB", peak_rss_mb(), file=sys.stderr, flush=True))
sys.argv = ["moola-pipeline", *sys.argv[1:]]
runpy.run_module("pipeline.cli", run_name="__main__")
"""


def run_shard_command(windows: str, shards: str) -> tuple[float, float]:
    """`moola-pipeline data shard` in a child; (its peak RSS in MB, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SHARD_WRAPPER.format(bench=os.path.dirname(
        os.path.abspath(__file__))), "data", "shard", "--in", windows, "--out", shards],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"data shard failed: {proc.stderr[-2000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_MB")][-1]
    return float(peak.split()[1]), seconds


# ---- main -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100_000, help="throughput split size")
    parser.add_argument("--big", type=int, default=1_000_000, help="big split for peak RSS")
    parser.add_argument("--bars", type=int, default=1_800_000, help="bars for data shard RSS")
    parser.add_argument("--strides", default="52,4",
                        help="window strides over the bars, comma-separated (52: the ingest "
                             "default; 4: 13x more windows, so memory must not follow them)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-shard", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path = args.child[:2]
        result = child_throughput(path, args.epochs) if kind == "throughput" else child_stream(path)
        print(json.dumps(result))
        return

    rows = []
    tmp = tempfile.mkdtemp(prefix="moola-bench-loader-")
    try:
        small = os.path.join(tmp, "small")
        took = write_split(small, args.windows)
        print(f"wrote {args.windows:,} windows in {took:.1f} s", file=sys.stderr)
        t = run_child("throughput", small)
        # Per core = per CPU second of the one-threaded reader; wall time is shown too, but on a
        # shared machine it mostly measures the other processes.
        rows.append(("loader -> torch, windows per CPU second (one core)",
                     f"{t['loader_cpu']:,.0f}", ">= 400,000"))
        rows.append(("baseline: numpy copy of the same bytes, per CPU second",
                     f"{t['numpy_cpu']:,.0f}", ""))
        rows.append(("loader / numpy copy (CPU)", f"{t['loader_cpu'] / t['numpy_cpu']:.2f}", ""))
        rows.append(("loader, numpy copy: windows/s by wall clock",
                     f"{t['loader_wall']:,.0f}, {t['numpy_wall']:,.0f}", ""))
        s_small = run_child("stream", small)
        rows.append((f"peak RSS streaming {s_small['windows']:,} windows", f"{s_small['rss_mb']:,.0f} MB",
                     "< 1,024 MB"))
        if not args.skip_big:
            big = os.path.join(tmp, "big")
            took = write_split(big, args.big)
            gb = sum(os.path.getsize(os.path.join(big, f)) for f in os.listdir(big)) / 1e9
            print(f"wrote {args.big:,} windows ({gb:.1f} GB) in {took:.1f} s", file=sys.stderr)
            s_big = run_child("stream", big)
            shutil.rmtree(big)
            rows.append((f"peak RSS streaming {s_big['windows']:,} windows ({gb:.1f} GB)",
                         f"{s_big['rss_mb']:,.0f} MB", "< 1,024 MB, flat"))
            rows.append(("  of which after imports", f"{s_big['rss_after_imports_mb']:,.0f} MB", ""))
            rows.append(("  sha256 verify + stream time",
                         f"{s_big['verify_s']:.1f} s + {s_big['stream_s']:.1f} s", ""))
        if not args.skip_shard:
            for stride in map(int, args.strides.split(",")):
                windows = os.path.join(tmp, f"bars-windows-{stride}")
                n_windows = write_bars_dataset(windows, args.bars, stride)
                shards = os.path.join(tmp, f"bars-shards-{stride}")
                rss, seconds = run_shard_command(windows, shards)
                shutil.rmtree(shards)
                rows.append((f"data shard, {args.bars:,} bars -> {n_windows:,} windows: peak RSS",
                             f"{rss:,.0f} MB", "< 4,096 MB"))
                rows.append(("  wall time", f"{seconds:.1f} s", ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows.append(("load average (1 min) at the end", f"{os.getloadavg()[0]:.1f}",
                 f"{os.cpu_count()} cores"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>14}  goal")
    for name, value, goal in rows:
        print(f"{name.ljust(width)}  {value:>14}  {goal}")


if __name__ == "__main__":
    main()
