"""`moola-pipeline evaluate RUN`: test metrics with intervals beside naive baselines.

Thin: flags -> `pipeline.evaluate.evaluate_run` -> a table and the JSON's path.
"""

from __future__ import annotations

import click


@click.command()
@click.argument("run", metavar="RUN")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="test: held out. val: the selection split (optimistic: the checkpoint and "
                   "the threshold were chosen on it).")
@click.option("--checkpoint", default="best", show_default=True, metavar="best|latest|NAME",
              help="Which checkpoint of RUN.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples of the windows for the 95% intervals (0: none).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the bootstrap resampling.")
@click.option("--out", metavar="URI", help="Where to write the JSON. [RUN/eval/SPLIT.json]")
def evaluate(run, split, checkpoint, bootstrap, seed, out):
    """Score a run's checkpoint on a split against naive baselines fitted on train."""
    from pipeline.evaluate import evaluate_run

    result = evaluate_run(run, split=split, checkpoint=checkpoint, bootstrap=bootstrap,
                          seed=seed, out=out)
    click.echo(render_table(result))
    click.echo(f"written: {result['written_to']}")
    from pipeline.report.html import write_report
    click.echo(f"report: {write_report(run)}")


def render_table(result: dict) -> str:
    """The evaluation as a plain-text table (rich, no colour: it also goes to logs)."""
    import io

    from pipeline.evaluate.evaluate import interval_text
    from rich.console import Console
    from rich.table import Table

    split = result["split"]
    if result.get("fold") is not None:
        split = f"fold {result['fold']} {split}" + (" (its test block)" if split == "val" else "")
    title = (f"{split} ({result['windows']} windows), checkpoint {result['checkpoint']}, "
             f"span threshold {result['span_threshold']:.2f}")
    if result["selection_split"]:
        title += "\nSELECTION SPLIT: " + result["note"]
    table = Table(title=title, title_justify="left")
    for column in ("metric", "model [95% CI]", "best baseline", "baseline [95% CI]",
                   "lift [95% CI]"):
        table.add_column(column)
    for metric, entry in result["metrics"].items():
        best = entry.get("best_baseline")
        arrow = "" if entry["higher_is_better"] else " (lower)"
        baseline = interval_text(entry["baselines"].get(best)) if best else "-"
        table.add_row(metric + arrow, interval_text(entry), best or "-", baseline,
                      interval_text(entry.get("lift")))
    buf = io.StringIO()
    Console(file=buf, width=140, no_color=True, force_terminal=False).print(table)
    return (buf.getvalue().rstrip() + "\nlift: how much better than the best baseline (positive "
            "= better; '(lower)': lower values are better)")
