"""`moola-pipeline export RUN`: a run's checkpoint as model.pt2 / model.onnx plus model.json.

Outline: the formats asked for (and their dependencies) -> an --out that holds nothing yet ->
the run's checkpoint (`pipeline.trained_run`) -> its network in eval mode, fp32, on CPU -> one
`torch.export` capture -> each format's file, then a parity check of every written file against
the eager network -> the card. Everything is written to a staging folder and published at the
end (a rename on a local disk; on S3 the files, then model.json last), so a failure leaves no
export behind and a folder with model.json is always complete. Plain torch; no Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid

import torch

from pipeline import storage
from pipeline.errors import UserError
from pipeline.export import programs
from pipeline.export.card import CARD_FILE, build_card
from pipeline.trained_run import TrainedRun, open_run

FORMATS = ("pt2", "onnx")
FILE_NAMES = {"pt2": "model.pt2", "onnx": "model.onnx"}
PARITY_BATCHES = (1, 7)


def export_run(run: str, out: str, formats=("all",), checkpoint: str = "best",
               progress=lambda line: None) -> dict:
    """Export RUN's checkpoint to OUT; returns the card (plus `written_to`). Every check a user
    can fail (format, dependencies, OUT, the run and its checkpoint) runs before any work."""
    chosen = resolve_formats(formats)
    if "onnx" in chosen:
        programs.require_onnx_deps()
    check_out(out)
    trained = open_run(run, checkpoint)
    net, example = inference_net(trained)
    with staging(out) as stage:
        progress(f"capturing {trained.checkpoint} with torch.export (batch dynamic, "
                 f"{example.shape[1]} bars, fp32)")
        program = programs.capture(net, example)
        onnx_info = write_formats(program, net, example, chosen, stage, progress)
        progress("checking the written files against the eager model")
        parity = check_parity(net, stage, chosen, example.shape[2])
        files = {fmt: file_entry(stage, FILE_NAMES[fmt]) for fmt in chosen}
        card = build_card(trained, files, onnx_info, parity, versions(chosen))
        write_card(stage, card)
    card["written_to"] = out
    return card


# ------------------------------------------------------------------------------- steps

def resolve_formats(formats) -> list[str]:
    """`all`, pt2, onnx (repeatable) -> the formats in a fixed order; unknown: one error."""
    asked = [f.strip().lower() for f in (formats or ("all",))]
    unknown = [f for f in asked if f not in (*FORMATS, "all")]
    if unknown:
        raise UserError(f"--format {unknown[0]}: unknown format; use pt2, onnx or all")
    return [f for f in FORMATS if f in asked or "all" in asked]


def check_out(out: str) -> None:
    """OUT must not hold anything yet: an export is published whole, never merged into an old
    one (whose model.json would then describe the wrong files)."""
    if not storage.exists(out):
        return
    if not storage.is_dir(out) or storage.listdir(out):
        raise UserError(f"--out {out}: already exists and is not an empty folder; choose another "
                        f"--out or remove it")


def inference_net(trained: TrainedRun) -> tuple[torch.nn.Module, torch.Tensor]:
    """The bare network as it predicts (eval: dropout off; fp32; CPU) and an example input."""
    net = trained.net.eval().float().cpu()
    example = torch.zeros(programs.EXAMPLE_BATCH, trained.manifest.get("window", 105),
                          net.cfg.n_features)
    return net, example


def output_names(net: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """The heads' output keys in the order the network returns them (the exported order)."""
    with torch.no_grad():
        return list(net(example))


def write_formats(program, net, example, chosen: list[str], stage: str, progress) -> dict | None:
    """model.pt2 and/or model.onnx from the one captured program; the ONNX graph's facts."""
    onnx_info = None
    if "pt2" in chosen:
        progress(f"writing {FILE_NAMES['pt2']}")
        programs.save_pt2(program, os.path.join(stage, FILE_NAMES["pt2"]))
    if "onnx" in chosen:
        progress(f"writing {FILE_NAMES['onnx']} (torch.onnx, dynamo)")
        proto = programs.save_onnx(program, output_names(net, example),
                                   os.path.join(stage, FILE_NAMES["onnx"]))
        op_types = programs.onnx_op_types(proto)
        onnx_info = {**programs.onnx_signature(proto), "op_types": op_types,
                     "recurrence": programs.recurrence_kind(op_types)}
    return onnx_info


def check_parity(net, stage: str, chosen: list[str], n_features: int) -> dict:
    """Max |exported - eager| per output of each written file, reloaded from disk, at a few
    batch sizes; a file outside rtol 1e-4 / atol 1e-5 is a bug and stops the export."""
    runners = {"pt2": programs.pt2_runner, "onnx": programs.onnx_runner}
    result = {"rtol": programs.RTOL, "atol": programs.ATOL, "input": "seeded N(0, 1) features"}
    for fmt in chosen:
        run = runners[fmt](os.path.join(stage, FILE_NAMES[fmt]))
        result[fmt] = {}
        for batch in PARITY_BATCHES:
            x = programs.parity_input(batch, n_features)
            with torch.no_grad():
                want = {k: v.numpy() for k, v in net(x).items()}
            result[fmt][f"batch_{batch}"] = programs.max_differences(run(x), want)
    return result


def file_entry(stage: str, name: str) -> dict:
    with open(os.path.join(stage, name), "rb") as f:
        data = f.read()
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_card(stage: str, card: dict) -> None:
    with open(os.path.join(stage, CARD_FILE), "w") as f:
        f.write(json.dumps(card, indent=2, default=str) + "\n")


def versions(chosen: list[str]) -> dict:
    found = {"torch": torch.__version__}
    if "onnx" in chosen:
        import onnx
        import onnxruntime
        import onnxscript
        found.update(onnx=onnx.__version__, onnxscript=onnxscript.__version__,
                     onnxruntime=onnxruntime.__version__)
    return found


# --------------------------------------------------------------------------- publishing

@contextlib.contextmanager
def staging(out: str):
    """A local folder to write the export into, published to OUT only if the body succeeds."""
    local = not storage.is_s3(out)
    if local:  # beside OUT, so that publishing is one rename on one filesystem
        target = storage.resolve(out)[1]
        stage = os.path.join(os.path.dirname(target),
                             f".{os.path.basename(target)}.export-{uuid.uuid4().hex[:8]}")
        with storage.user_errors(out):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.mkdir(stage)
    else:
        stage = tempfile.mkdtemp(prefix="moola-export-")
    try:
        yield stage
        publish(stage, out, local)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: str, out: str, local: bool) -> None:
    if local:
        check_out(out)  # nothing appeared there while we exported
        with storage.user_errors(out):
            os.replace(stage, storage.resolve(out)[1])  # onto nothing or an empty folder
        return
    names = sorted(os.listdir(stage), key=lambda n: n == CARD_FILE)  # the card last
    for name in names:
        storage.upload_file(os.path.join(stage, name), storage.join(out, name))
