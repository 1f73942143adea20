"""`moola-pipeline data ...`: synth, ingest, shard, validate, inspect, build.

Thin: each command parses flags, calls the library in pipeline/data, and prints. Heavy imports
happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import sys

import click

from pipeline.errors import UserError


@click.group()
def data() -> None:
    """Build, shard, check and inspect data sets (local paths or s3://bucket/prefix)."""


try:  # synth and ingest live in their own module (another area); tolerate it being absent
    from pipeline.commands.data_ingest import ingest, synth

    data.add_command(synth)
    data.add_command(ingest)
except ImportError:  # pragma: no cover - only while that module is not there
    synth = ingest = None


# ---- progress -------------------------------------------------------------------------------

@contextlib.contextmanager
def progress_reporter():
    """A (step, done, total) callback: rich bars on a terminal, a few plain lines otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        tasks: dict[str, int] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bars.add_task(step, total=total)
            bars.update(tasks[step], completed=done, total=total)

        with bars:
            yield update
        return

    last: dict[str, int] = {}

    def plain(step: str, done: int, total: int) -> None:
        tenth = (10 * done) // max(total, 1)  # a line per tenth of the work, not per chunk
        if last.get(step) != tenth:
            last[step] = tenth
            click.echo(f"{step}: {done}/{total}", err=True)

    yield plain


# ---- shard ----------------------------------------------------------------------------------

def shard_options(f):
    options = [
        click.option("--features", "feature_set", type=click.Choice(["relativity12", "relativity13"]),
                     default="relativity12", show_default=True, help="Named feature set."),
        click.option("--split", "split_policy", type=click.Choice(["auto", "time", "group"]),
                     default="auto", show_default=True,
                     help="time: blocks by t0 with an embargo; group: whole group_ids; auto: time "
                          "when every window has a time, else group."),
        click.option("--val-fraction", type=float, default=0.2, show_default=True),
        click.option("--test-fraction", type=float, default=0.0, show_default=True),
        click.option("--rows-per-shard", type=click.IntRange(min=1), default=65536,
                     show_default=True, help="Rows per Parquet shard file."),
        click.option("--split-seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the group split's shuffle."),
        click.option("--folds", type=int, default=None, metavar="K",
                     help="Cross-validation folds over the windows outside the test split, "
                          "written into the manifest (train on one with `train --fold I`)."),
        click.option("--fold-scheme", type=click.Choice(["purged-kfold", "walk-forward", "cpcv"]),
                     default=None,
                     help="purged-kfold: K time groups, each tested once; walk-forward: train "
                          "only on the past; cpcv: every choice of --test-groups of K groups. "
                          "[purged-kfold]"),
        click.option("--embargo", type=int, default=None, metavar="BARS",
                     help="Folds: train windows starting within BARS bars after a test block "
                          "are dropped (and counted). [105; walk-forward: none]"),
        click.option("--test-groups", type=int, default=None, metavar="N",
                     help="cpcv: test groups per fold (C(K, N) folds). [2]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_shard(in_uri: str, out: str, feature_set: str, split_policy: str, val_fraction: float,
              test_fraction: float, rows_per_shard: int, split_seed: int, folds: int | None,
              fold_scheme: str | None, embargo: int | None, test_groups: int | None) -> dict:
    from pipeline.data.folds import FOLDS_KEY, fold_spec
    from pipeline.data.shard_dataset import shard_dataset

    spec = fold_spec(folds, fold_scheme, embargo, test_groups)  # bad flags: before any work
    with progress_reporter() as progress:
        manifest = shard_dataset(in_uri, out, feature_set=feature_set, split_policy=split_policy,
                                 val_fraction=val_fraction, test_fraction=test_fraction,
                                 seed=split_seed, rows_per_shard=rows_per_shard, folds=spec,
                                 progress=progress)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items())
    click.echo(f"wrote {len(manifest['shards'])} shards to {out}: {counts} "
               f"({len(manifest['features'])} features, {feature_set})")
    click.echo(manifest["split_summary"])
    if FOLDS_KEY in manifest:
        click.echo(manifest[FOLDS_KEY]["summary"])
    return manifest


@data.command()
@click.option("--in", "in_uri", required=True, help="Canonical windows data set (from synth/ingest).")
@click.option("--out", "out", required=True, help="Shard set directory (local path or s3://).")
@shard_options
def shard(in_uri, out, **options) -> None:
    """Compute features, assign splits and write Parquet shards + manifest.json (written last)."""
    run_shard(in_uri, out, **options)


# ---- build ----------------------------------------------------------------------------------

@data.command()
@click.option("--source", type=click.Choice(["synth", "moola", "bars"]), default="synth",
              show_default=True, help="synth: generate; moola/bars: ingest --in.")
@click.option("--out", "out", required=True, help="Shard set directory (local path or s3://).")
@click.option("--windows-out", default=None,
              help="Where the canonical windows go [default: OUT/windows].")
@click.option("--windows", "n_windows", type=click.IntRange(min=1), default=50, show_default=True,
              help="synth: number of windows.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="synth: random seed.")
@click.option("--in", "in_uri", default=None, help="moola/bars: input file.")
@click.option("--labels", "labels_uri", default=None, help="bars: labels CSV.")
@click.option("--stride", type=int, default=None, help="bars without labels: window stride.")
@shard_options
@click.pass_context
def build(ctx, source, out, windows_out, n_windows, seed, in_uri, labels_uri, stride,
          **options) -> None:
    """synth or ingest, then shard, in one command."""
    from pipeline import storage

    if synth is None:
        raise UserError("data build needs `data synth` and `data ingest`, which are not installed")
    windows_out = windows_out or storage.join(out, "windows")
    if source == "synth":
        if in_uri or labels_uri or stride is not None:
            raise UserError("--in, --labels and --stride apply to --source moola or bars")
        ctx.invoke(synth, out=windows_out, n_windows=n_windows, seed=seed, bars_out=None)
    else:
        if not in_uri:
            raise UserError(f"--source {source} needs --in FILE")
        ctx.invoke(ingest, fmt=source, in_uri=in_uri, out=windows_out, labels_uri=labels_uri,
                   stride=stride)
    run_shard(windows_out, out, **options)


# ---- validate and inspect -------------------------------------------------------------------

@data.command()
@click.argument("uri")
def validate(uri: str) -> None:
    """Check a shard set: schema, counts, sha256, label ranges, NaN/inf, leakage."""
    from pipeline.data.shard_check import validate_shard_set

    manifest, stats, problems = validate_shard_set(uri)
    if problems:
        listed = "; ".join(problems[:20])
        more = f" ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UserError(f"{uri}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                        f"{listed}{more}")
    from pipeline.data.folds import FOLDS_KEY

    counts = ", ".join(f"{k} {v['windows']}" for k, v in stats.items())
    layout = manifest.get(FOLDS_KEY)
    fold_text = (f"; {layout['n_folds']} {layout['scheme']} folds checked (no shared bar or "
                 f"group, embargo, counts)") if layout else ""
    click.echo(f"{uri}: ok: {len(manifest['shards'])} shards, sha256 verified, {counts}; "
               f"schema, label ranges, finite features and no leakage checked{fold_text}")


@data.command()
@click.argument("uri")
def inspect(uri: str) -> None:
    """A readable summary: splits, class balance, spans, feature means, shards."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.data.manifest import load_manifest
    from pipeline.data.shard_check import split_stats

    manifest = load_manifest(uri, verify=False)
    stats = split_stats(uri, manifest)
    console = Console(width=max(Console().width, 110))
    console.print(f"[bold]{uri}[/bold]  features {manifest.get('feature_set', '')} "
                  f"(F={len(manifest['features'])}), created {manifest.get('created', '?')}")
    if manifest.get("split_summary"):
        console.print(manifest["split_summary"])

    table = Table(title="splits")
    for col in ("split", "windows", "labeled", "consol.", "retrace.", "in-span", "len mean",
                "len median", "len min-max", "valid bars"):
        table.add_column(col, justify="right")
    for split, s in stats.items():
        table.add_row(split, str(s["windows"]), str(s["labeled"]), str(s["consolidation"]),
                      str(s["retracement"]), f"{s['in_span_fraction']:.1%}",
                      f"{s['length_mean']:.1f}", f"{s['length_median']:.0f}",
                      f"{s['length_min']}-{s['length_max']}", f"{s['valid_fraction']:.1%}")
    console.print(table)

    means = Table(title="feature means (all bars)")
    means.add_column("feature")
    for split in stats:
        means.add_column(split, justify="right")
    for i, name in enumerate(manifest["features"]):
        means.add_row(name, *(f"{s['feature_means'][i]:.4f}" for s in stats.values()))
    console.print(means)

    _print_folds(console, manifest)

    shards = Table(title="shards")
    for col in ("path", "split", "rows", "row groups", "MB", "sha256"):
        shards.add_column(col, justify="right" if col in ("rows", "row groups", "MB") else "left")
    for s in manifest["shards"]:
        shards.add_row(s["path"], s["split"], str(s["rows"]), str(len(s["row_group_rows"])),
                       f"{s['bytes'] / 1e6:.1f}", s["sha256"][:16])
    console.print(shards)


def _print_folds(console, manifest: dict) -> None:
    """Per fold: its test groups and train/test/purged/embargoed/unused counts; cpcv's paths."""
    from rich.table import Table

    from pipeline.data.folds import FOLDS_KEY, STATUS

    layout = manifest.get(FOLDS_KEY)
    if not layout:
        return
    console.print(layout.get("summary", ""))
    table = Table(title=f"folds ({layout['scheme']}; val of a fold = its test block)")
    table.add_column("fold", justify="right")
    table.add_column("test groups", justify="right")
    for name in ("train", "test", "purged", "embargoed", "unused"):
        table.add_column(name, justify="right")
    for a in layout["assignments"]:
        table.add_row(str(a["fold"]), ",".join(map(str, a["test_groups"])),
                      *(str(a["counts"][name]) for name in STATUS[1:] + STATUS[:1]))
    console.print(table)
    if layout["scheme"] == "cpcv":
        for p, path in enumerate(layout["paths"]):
            console.print(f"path {p}: folds " + " ".join(str(f) for f in path)
                          + " (one per group, in group order)")
