"""Load a pretrained encoder (LSTM + projection) into JadeCompact, strictly.

The original loader copied what it could with `strict=False` and reported a match ratio, so a
checkpoint of another shape loaded "successfully" with random weights. Here every encoder
tensor must be present with the model's exact shape; anything else is a UserError naming the
tensor and both shapes.

Accepted sources: a state dict, or a URI (local path or s3://) of a torch file, or of a
directory holding one (`model.pt`, `state.pt`, `checkpoint.pt`, or a single `*.pt`). Inside
the file the weights may sit at the top level or under `model`, `model_state_dict`,
`model_state` or `state_dict`; prefixes added by wrappers (`module.` from DDP, `model.` from
MultiTaskModel, `_orig_mod.` from torch.compile) are stripped, and the original pretrainer's
`encoder.` prefix means `lstm.`.
"""

from __future__ import annotations

import io
import pickle
from typing import Mapping

import torch

from pipeline import storage
from pipeline.errors import UserError
from pipeline.model.jade import JadeCompact

ENCODER_PARTS = ("lstm", "projection")
_NESTED_KEYS = ("model", "model_state_dict", "model_state", "state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_CHECKPOINT_NAMES = ("model.pt", "state.pt", "checkpoint.pt")


def _checkpoint_file(uri: str) -> str:
    if not storage.is_dir(uri):
        return uri
    names = storage.listdir(uri)
    for name in _CHECKPOINT_NAMES:
        if name in names:
            return storage.join(uri, name)
    pt_files = [n for n in names if n.endswith(".pt")]
    if len(pt_files) == 1:
        return storage.join(uri, pt_files[0])
    raise UserError(f"{uri}: expected one checkpoint file (model.pt, state.pt or a single *.pt) "
                    f"in this directory, found {pt_files or 'none'}")


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    path = _checkpoint_file(uri)
    data = storage.read_bytes(path)
    try:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # The trainer's state.pt also holds RNG and loader state (numpy objects) that the
            # weights-only unpickler refuses; checkpoints are the user's own files, as in
            # pipeline.train.checkpoint.read_state.
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return _unwrap(obj, path)


def _unwrap(obj, where: str) -> dict[str, torch.Tensor]:
    for key in _NESTED_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{where}: no model weights found (expected a state dict, or one under "
                        f"{', '.join(_NESTED_KEYS)})")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:  # wrappers can nest: module.model.lstm...
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if name.startswith("encoder."):
            name = "lstm." + name[len("encoder."):]
        state[name] = value
    return state


def load_encoder(model: JadeCompact, source, parts: tuple[str, ...] = ENCODER_PARTS,
                 freeze: bool = False) -> list[str]:
    """Copy the encoder tensors of `source` into `model`; returns the names loaded.

    Strict: every tensor of the requested parts must exist in the checkpoint with the same
    shape, and the checkpoint may hold no extra tensors for those parts (e.g. a second LSTM
    layer the model does not have).
    """
    where = source if isinstance(source, str) else "checkpoint"
    state = read_state_dict(source) if isinstance(source, str) else _unwrap(source, where)
    own = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in parts}
    theirs = {k: v for k, v in state.items() if k.split(".", 1)[0] in parts}
    missing = sorted(set(own) - set(theirs))
    if missing:
        raise UserError(f"{where}: encoder tensor(s) missing from the checkpoint: "
                        f"{', '.join(missing)}")
    extra = sorted(set(theirs) - set(own))
    if extra:
        raise UserError(f"{where}: checkpoint has encoder tensor(s) this model does not: "
                        f"{', '.join(extra)} (check model.hidden / model.num_layers)")
    for name, tensor in own.items():
        if tuple(theirs[name].shape) != tuple(tensor.shape):
            raise UserError(f"{where}: shape mismatch for {name}: checkpoint "
                            f"{list(theirs[name].shape)}, model {list(tensor.shape)} "
                            f"(check model.n_features / model.hidden / model.head_width)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in theirs:
                param.copy_(theirs[name].to(param.dtype))
                if freeze:
                    param.requires_grad_(False)
    return sorted(own)
