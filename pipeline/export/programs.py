"""The network as files other programs load: a `torch.export` program (.pt2) and an ONNX model.

One capture serves both: `torch.export.export` traces the eval-mode fp32 network once with the
batch dimension dynamic and the 105 bars fixed, `torch.export.save` writes that program, and
`torch.onnx.export` translates the same program (the exporter accepts an ExportedProgram), so
the two files cannot disagree about the graph and the slow capture runs once.

Only the batch is dynamic: the window is 105 bars by contract. The program keeps `aten.lstm`
as one op, and with torch 2.13 + onnxscript 0.7.2 it becomes one native ONNX `LSTM` node (not a
`Loop`); `onnx_op_types` records what a given torch/onnxscript produced, and the card says so.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import torch

from pipeline.errors import UserError

INPUT_NAME = "features"
BATCH = torch.export.Dim("batch", min=1)
EXAMPLE_BATCH = 2  # not 0 or 1: torch.export specialises those sizes to constants
ONNX_DEPS = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'moola-pipeline[export]'"
# The agreement the parity check (and the tests) demand between an exported file and eager.
RTOL, ATOL = 1e-4, 1e-5


def require_onnx_deps() -> None:
    """ONNX export needs onnx and onnxscript (torch does not depend on them) and the check
    runs onnxruntime: say so before any work, not after a minute of capture."""
    import importlib
    missing = []
    for name in ONNX_DEPS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)} (not installed): "
                        f"{INSTALL_HINT}, or export only --format pt2")


def capture(net: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The network as one graph, batch dynamic (>= 1), everything else fixed."""
    with _quiet_exporters():
        return torch.export.export(net, (example,), dynamic_shapes=({0: BATCH},))


def save_pt2(program: torch.export.ExportedProgram, path: str) -> None:
    torch.export.save(program, path)


def save_onnx(program: torch.export.ExportedProgram, output_names: list[str], path: str):
    """Translate the captured program to ONNX (default opset), one named output per head, and
    save it as one self-contained file (a 100k-parameter model needs no external data)."""
    with _quiet_exporters(), _lstm_fake_kernel_as_loop():
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME],
                                         output_names=output_names,
                                         dynamic_shapes=({0: BATCH},), verbose=False)
    onnx_program.save(path, external_data=False)
    return onnx_program.model_proto


def onnx_op_types(model_proto) -> list[str]:
    """Every op type in the graph, its subgraphs (a Loop's body) and its local functions."""
    found: set[str] = set()

    def walk(graph) -> None:
        for node in graph.node:
            found.add(node.op_type)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub)

    walk(model_proto.graph)
    for function in model_proto.functions:
        for node in function.node:
            found.add(node.op_type)
    return sorted(found)


def recurrence_kind(op_types: list[str]) -> str:
    """How the BiLSTM came out: a native ONNX `LSTM` node, a `Loop`/`Scan`, or unrolled."""
    if "LSTM" in op_types:
        return "LSTM"
    if "Loop" in op_types or "Scan" in op_types:
        return "Loop"
    return "unrolled"


def onnx_signature(model_proto) -> dict:
    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    default_domain = [o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")]
    return {"opset": max(default_domain),
            "ir_version": model_proto.ir_version,
            "inputs": {v.name: dims(v) for v in model_proto.graph.input},
            "outputs": {v.name: dims(v) for v in model_proto.graph.output}}


# ------------------------------------------------------------------------------ parity

def parity_input(batch: int, n_features: int, seed: int = 0) -> torch.Tensor:
    """Feature-like values (the features lie in about [-3, 3]) from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 105, n_features, generator=generator)


def pt2_runner(path: str):
    """features -> outputs (numpy), running the .pt2 file as torch.export.load reads it."""
    module = torch.export.load(path).module()

    def run(x: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: v.numpy() for k, v in module(x).items()}
    return run


def onnx_runner(path: str):
    """The same for the ONNX file, in onnxruntime on the CPU."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(x: torch.Tensor) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {INPUT_NAME: x.numpy()})))
    return run


def max_differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output, the largest |got - want|; raises (a bug, not a user error) when an output is
    missing or outside rtol 1e-4 / atol 1e-5."""
    out = {}
    for name, expected in want.items():
        actual = got[name]
        if actual.shape != expected.shape or not np.allclose(actual, expected, RTOL, ATOL):
            raise RuntimeError(f"exported output {name} differs from the eager model "
                               f"(max |diff| {np.abs(actual - expected).max():.3g})")
        out[name] = float(np.abs(actual - expected).max())
    return out


def _lstm_fake_kernel_as_loop():
    """During the ONNX translation, trace `aten.lstm` through torch's while_loop decomposition
    instead of its 105-step Python unrolling: the graph keeps `aten.lstm` either way (the kernel
    only propagates shapes on fake tensors), and the translation takes a quarter less CPU (6.5 s
    against 9 s on a 16-unit run, torch 2.13). It is the patch `torch.onnx.export` applies itself
    when it captures a module with dynamic shapes. Not used for the .pt2 capture, where it would
    save more but leaves two unbacked symbols in the program's range constraints that
    `torch.export.load` then warns about. A torch without it translates unrolled."""
    try:
        from torch.export._patches import register_lstm_while_loop_decomposition
    except ImportError:
        return contextlib.nullcontext()
    return register_lstm_while_loop_decomposition()


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters log and warn about things that are not ours to fix (torchvision's ops
    not installed, deprecated internals); keep the command's output to its own lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
