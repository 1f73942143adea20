"""The model on windows: a plain torch forward (or MC-dropout samples) in fixed-size batches.

`WindowPredictor` is what runs in the local engine and inside every Ray actor: the same code
turns the same windows into the same numbers. Outputs are the quantities a user reads, in the
conventions of `pipeline.reducer.targets`: type probabilities (softmax), pointer center and
length in bars (sigmoid outputs x 105), span probabilities (sigmoid) and the countdown in bars
(`unit` scale: c * 40 - 20; `raw`: as is). The probabilities are computed in float32 by torch,
exactly as training recorded its val predictions (`train/loop.py` `_predictions`).

MC dropout: the dropout modules (and an LSTM's between-layer dropout) in train mode, everything
else in eval; N passes; mean and population standard deviation of every output over the passes.
Each batch's dropout masks come from a generator seeded by (seed, the batch's first window), so
a prediction does not depend on which process or actor computed it.
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import torch
from torch import nn

from pipeline.reducer.targets import COUNTDOWN_CLIP

OUTPUTS = ("type_prob", "pointer_center_bars", "pointer_length_bars", "span_prob",
           "countdown_bars")
PER_BAR = ("span_prob", "countdown_bars")
WINDOW = 105


class WindowPredictor:
    def __init__(self, net: nn.Module, *, countdown_scale: str = "unit", mc_samples: int = 0,
                 batch_size: int = 1024, seed: int = 0, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.countdown_scale = countdown_scale
        self.mc_samples = int(mc_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.net.cfg.tasks)

    def predict(self, features: np.ndarray, key: str = "") -> dict[str, np.ndarray]:
        """Outputs of windows [n,105,F] (and `<name>_std` with MC dropout), batch by batch."""
        parts = [self._batch(np.ascontiguousarray(features[a:a + self.batch_size], np.float32),
                             f"{key}:{a}")
                 for a in range(0, len(features), self.batch_size)]
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _batch(self, x: np.ndarray, key: str) -> dict[str, np.ndarray]:
        x = torch.from_numpy(x).to(self.device)
        with torch.no_grad():
            if self.mc_samples <= 0:
                return self._read(self.net(x))
            samples = []
            with mc_dropout(self.net), _seeded(self.seed, key, self.device):
                for _ in range(self.mc_samples):
                    samples.append(self._read(self.net(x)))
        out = {}
        for name in samples[0]:
            stack = np.stack([s[name] for s in samples])
            out[name] = stack.mean(axis=0, dtype=np.float64).astype(np.float32)
            out[f"{name}_std"] = stack.std(axis=0, dtype=np.float64).astype(np.float32)
        return out

    def _read(self, raw: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = {}
        if "type_logits" in raw:
            out["type_prob"] = torch.softmax(raw["type_logits"], dim=-1)
        if "pointers" in raw:
            out["pointer_center_bars"] = raw["pointers"][:, 0] * WINDOW
            out["pointer_length_bars"] = raw["pointers"][:, 1] * WINDOW
        if "span_logits" in raw:
            out["span_prob"] = torch.sigmoid(raw["span_logits"])
        if "countdown" in raw:
            out["countdown_bars"] = countdown_bars(raw["countdown"], self.countdown_scale)
        return {k: v.float().cpu().numpy() for k, v in out.items()}


def countdown_bars(countdown: torch.Tensor, scale: str) -> torch.Tensor:
    """The countdown head's output in bars (inverse of `targets.countdown_target`'s scale)."""
    if scale == "unit":
        return countdown * (2 * COUNTDOWN_CLIP) - COUNTDOWN_CLIP
    return countdown


def dropout_modules(net: nn.Module) -> list[nn.Module]:
    """Modules whose train mode means dropout: nn.Dropout* and an LSTM with dropout > 0."""
    return [m for m in net.modules()
            if isinstance(m, nn.modules.dropout._DropoutNd)
            or (isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1)]


@contextlib.contextmanager
def mc_dropout(net: nn.Module):
    """Dropout on, everything else as it was (eval), restored afterwards."""
    modules = dropout_modules(net)
    for m in modules:
        m.train()
    try:
        yield
    finally:
        for m in modules:
            m.eval()


@contextlib.contextmanager
def _seeded(seed: int, key: str, device: torch.device):
    """Dropout masks from (seed, key) without touching the caller's global RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed << 32) ^ zlib.crc32(key.encode()))
        yield
