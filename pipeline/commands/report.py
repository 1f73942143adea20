"""`moola-pipeline report RUN` and `moola-pipeline compare RUN...`.

Thin: the work is in `pipeline.report`; matplotlib is imported inside the commands so the rest
of the CLI starts fast.
"""

from __future__ import annotations

import click


@click.command()
@click.argument("run", metavar="RUN")
@click.option("--out", metavar="URI",
              help="Where to write the page (local path or s3://). [RUN/report.html]")
def report(run, out):
    """Write RUN's report.html (RUN: a run directory, local path or s3://)."""
    from pipeline.report.html import write_report

    click.echo(write_report(run, out))


@click.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--out", metavar="URI", default="compare.html", show_default=True,
              help="Where to write the comparison page (local path or s3://).")
def compare(runs, out):
    """One page comparing runs side by side: final and best metrics, overlaid curves."""
    from pipeline.report.compare import write_comparison

    click.echo(write_comparison(list(runs), out))
