"""`moola-pipeline predict`: a run's model on new bars or a shard set -> Parquet + manifest.json.

Thin: flags -> `pipeline.predict.predict` -> a summary. Every input problem is a UserError raised
before anything is written (see pipeline/predict/job.py `prepare`).
"""

from __future__ import annotations

import click


@click.command()
@click.option("--run", "run", required=True, metavar="RUN", help="Run directory (local or s3://).")
@click.option("--checkpoint", default="best", show_default=True, metavar="best|latest|NAME",
              help="Which checkpoint of RUN.")
@click.option("--in", "in_uri", required=True, metavar="URI",
              help="A bar file (.csv or .parquet, local or s3://; a `symbol` column for several "
                   "instruments) or a shard set (a directory with manifest.json).")
@click.option("--out", "out", required=True, metavar="URI",
              help="Output directory: windows/*.parquet, bars/*.parquet, manifest.json (last).")
@click.option("--stride", type=int, default=None, metavar="S",
              help="Bar files: a window every S bars.  [default: 52]")
@click.option("--mc-samples", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="N", help="MC dropout: N passes with dropout on; mean and std of every "
                                "output (0: one plain pass).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the MC-dropout masks.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: this process, plain torch. ray: Ray Data with an "
                                      "actor pool (a local Ray, or --address).")
@click.option("--address", default=None, metavar="ADDR",
              help="--engine ray: join the Ray cluster at ADDR (else a local Ray).")
@click.option("--actors", type=click.IntRange(min=1), default=None, metavar="N",
              help="--engine ray: actors in the pool.  [default: what the cluster holds]")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="G", help="--engine ray: GPU share per actor (0.25: four per GPU).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              metavar="B", help="Windows per forward pass.")
@click.option("--allow-frequency-change", is_flag=True,
              help="Predict on bars of another frequency than the training bars.")
@click.option("--verbose", is_flag=True, help="Show Ray's own output on the console.")
def predict(run, checkpoint, in_uri, out, stride, mc_samples, seed, engine, address, actors,
            gpus_per_actor, batch_size, allow_frequency_change, verbose):
    """Run a trained model over bars or shards; write per-window and per-bar predictions."""
    from pipeline.commands.data import progress_reporter
    from pipeline.errors import UserError
    from pipeline.predict import Options, predict as predict_lib

    if engine == "local" and (address or actors or gpus_per_actor):
        raise UserError("--address, --actors and --gpus-per-actor apply to --engine ray")
    options = Options(stride=stride, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                      allow_frequency_change=allow_frequency_change)
    ray_options = {"address": address, "actors": actors, "gpus_per_actor": gpus_per_actor,
                   "verbose": verbose}
    with progress_reporter() as progress:
        manifest = predict_lib(run, in_uri, out, checkpoint=checkpoint, options=options,
                               engine=engine, ray_options=ray_options, progress=progress)
    click.echo(summary(manifest, out))


def summary(manifest: dict, out: str) -> str:
    rows = manifest["rows"]
    names = list(manifest["input"]["instruments"])
    lines = [f"predicted {rows['windows']} windows of {len(names)} instrument"
             f"{'s' if len(names) != 1 else ''} ({', '.join(names[:5])}"
             f"{' ...' if len(names) > 5 else ''}) with {manifest['checkpoint']} on "
             f"{manifest['engine']}: {out}",
             f"span threshold {manifest['span_threshold']:.2f} from "
             f"{manifest['threshold_source']}"]
    if rows.get("bars"):
        lines.append(f"per-bar table: {rows['bars']} bars, each the mean of the windows "
                     f"that cover it")
    lines += [f"note: {n}" for n in manifest["notes"]]
    if manifest.get("ray_log"):
        lines.append(f"Ray's own output: {manifest['ray_log']} (--verbose shows it on the "
                     f"console instead)")
    return "\n".join(lines)
