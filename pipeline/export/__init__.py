"""A trained run as files other programs load: `torch.export` (.pt2), ONNX, and a model card.

`export_run` (the `export` command). Plain torch; onnx/onnxscript/onnxruntime (the `export`
extra) only when ONNX is asked for. No Ray.
"""

from pipeline.export.card import CARD_FILE, CARD_VERSION
from pipeline.export.export import FILE_NAMES, FORMATS, export_run

__all__ = ["CARD_FILE", "CARD_VERSION", "FILE_NAMES", "FORMATS", "export_run"]
