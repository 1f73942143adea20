"""`moola-pipeline export RUN --out DIR`: the model as model.pt2 / model.onnx with model.json.

Thin: flags -> `pipeline.export.export_run` -> a few lines saying what was written. torch and
the exporters are imported inside the command so the rest of the CLI starts fast.
"""

from __future__ import annotations

import click


@click.command()
@click.argument("run", metavar="RUN")
@click.option("--checkpoint", default="best", show_default=True, metavar="best|latest|NAME",
              help="Which checkpoint of RUN.")
@click.option("--format", "formats", multiple=True, default=("all",), show_default=True,
              metavar="pt2|onnx|all",
              help="pt2: a torch.export program (torch.export.load). onnx: an ONNX model "
                   "(onnxruntime; needs the `export` extra). all: both. Repeatable.")
@click.option("--out", required=True, metavar="DIR",
              help="A folder that does not exist yet or is empty (local path or s3://).")
def export(run, checkpoint, formats, out):
    """Export RUN's checkpoint for other programs: model.pt2, model.onnx and model.json (the
    card: features, input layout, outputs, span threshold, data hash, evaluate figures)."""
    from pipeline.export import export_run

    asked = [part for f in formats for part in f.split(",") if part.strip()]
    card = export_run(run, out, formats=asked, checkpoint=checkpoint,
                      progress=lambda line: click.echo(line))
    click.echo(render_summary(card))


def render_summary(card: dict) -> str:
    from pipeline import storage

    run, files = card["run"], card["files"]
    written = [storage.join(card["written_to"], e["file"]) + f" ({e['bytes'] / 1024:.0f} KiB)"
               for e in files.values()]
    lines = [f"written: {', '.join(written)}, {storage.join(card['written_to'], 'model.json')}",
             f"checkpoint {run['checkpoint']} of {run['run_id']}"
             f"{' (best)' if run['is_best'] else ''}; training data manifest "
             f"{card['data']['manifest_hash']}",
             f"span threshold {card['span_threshold']['value']:.2f} "
             f"({card['span_threshold']['source']})"]
    if card["onnx"]:
        onnx = card["onnx"]
        lines.append(f"ONNX opset {onnx['opset']}, recurrence: {onnx['recurrence']} "
                     f"(ops: {', '.join(onnx['op_types'])})")
    worst = {fmt: max(d for by_batch in card["parity"][fmt].values() for d in by_batch.values())
             for fmt in files}
    lines.append("max |exported - eager|: "
                 + ", ".join(f"{fmt} {d:.1e}" for fmt, d in worst.items()))
    if not card["evaluation"]:
        lines.append(f"no evaluate figures in the card: run `moola-pipeline evaluate {run['uri']}` "
                     f"first to include them")
    return "\n".join(lines)
