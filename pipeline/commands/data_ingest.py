"""`data synth` and `data ingest`: write a canonical windows data set (local path or s3://).

The `data` group (pipeline/commands/data.py) adds these two commands. Both check all their input
before writing anything, so a refused input leaves --out untouched.
"""

from __future__ import annotations

import click

from pipeline.errors import UserError


def _summary(ws, out: str, extra: str = "") -> None:
    import numpy as np

    from pipeline.data import schema

    labels = ws.column("label")
    n = len(ws)
    labeled = labels >= 0
    parts = [f"wrote {n} windows to {out}"]
    if labeled.any():
        counts = np.bincount(labels[labeled], minlength=2)
        length = (ws.column("expansion_end") - ws.column("expansion_start") + 1)[labeled]
        parts.append(", ".join(f"{name} {c}" for name, c in zip(schema.LABELS, counts)))
        parts.append(f"expansion length mean {length.mean():.1f} median {np.median(length):.0f}, "
                     f"in-span {length.sum() / (labeled.sum() * schema.WINDOW):.1%} of bars")
    if labeled.sum() < n:
        parts.append(f"{n - labeled.sum()} unlabeled")
    if ws.bars is not None:
        parts.append(f"{ws.bars.num_rows} bars in {schema.BARS_FILE}")
    click.echo("; ".join(parts) + extra)


@click.command()
@click.option("--out", "out", required=True, metavar="URI", help="Data set directory (local path or s3://bucket/prefix).")
@click.option("--windows", "n_windows", type=click.IntRange(min=1), default=50, show_default=True,
              metavar="N",
              help="Number of labeled windows.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, metavar="S",
              help="Random seed (same seed, same data).")
@click.option("--bars-out", default=None, metavar="FILE",
              help="Also write the bar series to this .csv or .parquet file, and labels.csv beside it "
                   "(input for `data ingest --format bars`).")
@click.option("--retracement-fraction", type=click.FloatRange(0, 1), default=0.45,
              show_default=True, metavar="F",
              help="Share of retracement windows (moola: 0.45; other markets can be far more "
                   "imbalanced, e.g. 0.15).")
@click.option("--expansion-median", type=click.FloatRange(1, 40), default=5.3, show_default=True,
              metavar="BARS",
              help="Median expansion length (5.3: ~7% of bars in span, as in moola; 2: ~3%).")
def synth(out: str, n_windows: int, seed: int, bars_out: str | None,
          retracement_fraction: float = 0.45, expansion_median: float = 5.3) -> None:
    """Generate a learnable synthetic data set that looks like moola's labeled NQ windows."""
    from pipeline import storage
    from pipeline.data import schema, synth as synth_lib

    bars_kind = _bars_kind(bars_out) if bars_out else None
    if bars_out and storage.basename(bars_out) == "labels.csv":
        raise UserError(f"--bars-out {bars_out}: labels.csv is where the labels go; pick another name")
    syn = synth_lib.synthesize(n_windows, seed, retracement_fraction, expansion_median)
    schema.write_dataset(out, syn.windows, source={
        "generator": "synth", "windows": n_windows, "retracement_fraction": retracement_fraction,
        "expansion_median": expansion_median}, seed=seed)
    if bars_out:
        labels_uri = storage.join(storage.parent(bars_out), "labels.csv")
        _write_bars_file(bars_out, bars_kind, syn.windows.bars)
        _write_csv(labels_uri, synth_lib.labels_rows(syn))
        click.echo(f"wrote the bar series to {bars_out} and its labels to {labels_uri}")
    _summary(syn.windows, out)


def _bars_kind(uri: str) -> str:
    low = uri.lower()
    if low.endswith(".csv"):
        return "csv"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    raise UserError(f"--bars-out {uri}: use a file name ending in .csv or .parquet")


def _write_bars_file(uri: str, kind: str, bars) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import storage

    if kind == "parquet":
        with storage.staged_file(uri, suffix=".parquet") as tmp:
            pq.write_table(bars, tmp)
        return
    import pyarrow.csv as pacsv

    # ISO 8601 in UTC ("2024-01-02T14:30:00Z"); a plain cast is ~50x faster than strftime
    seconds = bars.column("timestamp").cast(pa.int64()).cast(pa.timestamp("us")).cast(pa.timestamp("s"))
    iso = pc.binary_join_element_wise(
        pc.replace_substring(seconds.cast(pa.string()), " ", "T"), "Z", "")
    text = bars.set_column(0, "timestamp", iso)
    with storage.staged_file(uri, suffix=".csv") as tmp, open(tmp, "wb") as f:
        f.write((",".join(text.column_names) + "\n").encode())
        pacsv.write_csv(text, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def _write_csv(uri: str, columns: dict[str, list]) -> None:
    import csv
    import io

    from pipeline import storage

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns.keys())
    writer.writerows(zip(*columns.values()))
    storage.write_text_atomic(uri, buf.getvalue())


@click.command()
@click.option("--format", "fmt", type=click.Choice(["moola", "bars"]), required=True,
              help="moola: moola's labeled Parquet; bars: a bar series CSV/Parquet (+ --labels).")
@click.option("--in", "in_uri", required=True, metavar="FILE", help="Input file (local path or s3://).")
@click.option("--out", "out", required=True, metavar="URI", help="Data set directory (local path or s3://bucket/prefix).")
@click.option("--labels", "labels_uri", default=None, metavar="CSV",
              help="bars only: labels CSV (window_id, start, label, expansion_start, expansion_end).")
@click.option("--stride", type=int, default=None, metavar="N",
              help="bars only, without --labels: bars between unlabeled windows [default: 52].")
def ingest(fmt: str, in_uri: str, out: str, labels_uri: str | None, stride: int | None) -> None:
    """Turn real data into a canonical windows data set (every problem reported, nothing dropped)."""
    from pipeline.data import ingest as ingest_lib, schema

    if fmt == "moola":
        if labels_uri or stride is not None:
            raise UserError("--labels and --stride apply to --format bars only")
        result = ingest_lib.ingest_moola(in_uri)
    else:
        if labels_uri and stride is not None:
            raise UserError("--stride cuts unlabeled windows; with --labels the windows come from "
                            "the labels file: drop one of them")
        result = ingest_lib.ingest_bars(in_uri, labels_uri,
                                        ingest_lib.DEFAULT_STRIDE if stride is None else stride)
    schema.write_dataset(out, result.windows, source=result.source)
    extra = f" (ignored columns: {', '.join(result.ignored_columns)})" if result.ignored_columns else ""
    extra += "".join(f"; {note}" for note in result.notes)
    _summary(result.windows, out, extra)
