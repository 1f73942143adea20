"""Targets built on the fly from (expansion_start, expansion_end); the one place the
conventions are defined.

s, e: 0-based inclusive bar indices of the expansion, 0 <= s <= e <= 104; -1 on unlabeled rows.

- span:      m_t = 1 for s <= t <= e, else 0 (a [B,105] 0/1 mask).
- countdown: c_t = s - t (bars left until the expansion starts: positive before it, 0 at s,
             negative after). Scale `raw`: clip(c_t, -20, 20), the old runs' targets (whose
             Huber loss sat near 16). Scale `unit`: clip((c_t + 20) / 40, 0, 1): 1 twenty or
             more bars before s, 0.5 at s, 0 twenty or more bars after.
- pointer:   center = (s + e) / 2 / 105, length = (e - s) / 105. This is the training
             scripts' convention (divisor 105, no +1), chosen over the "paper-strict" /104
             variant so that a one-bar expansion has length 0 and both values lie in [0, 1).
             `pointers_to_bars` is its inverse.

Unlabeled rows (s < 0) get all-zero targets; the losses mask them out.
"""

from __future__ import annotations

import torch

WINDOW = 105
COUNTDOWN_CLIP = 20.0
COUNTDOWN_SCALES = ("unit", "raw")


def _bars(start: torch.Tensor, window: int) -> torch.Tensor:
    return torch.arange(window, device=start.device).unsqueeze(0)  # [1, window]


def span_target(start: torch.Tensor, end: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    t = _bars(start, window)
    inside = (t >= start.unsqueeze(1)) & (t <= end.unsqueeze(1)) & (start.unsqueeze(1) >= 0)
    return inside.to(torch.float32)


def countdown_target(start: torch.Tensor, scale: str = "unit", window: int = WINDOW) -> torch.Tensor:
    c = (start.unsqueeze(1) - _bars(start, window)).to(torch.float32)
    c = c.clamp(-COUNTDOWN_CLIP, COUNTDOWN_CLIP)
    if scale == "unit":
        c = (c + COUNTDOWN_CLIP) / (2 * COUNTDOWN_CLIP)  # already in [0, 1] after the clip
    elif scale != "raw":
        raise ValueError(f"countdown scale must be one of {COUNTDOWN_SCALES}, got {scale!r}")
    return torch.where(start.unsqueeze(1) >= 0, c, torch.zeros_like(c))


def pointer_target(start: torch.Tensor, end: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    s, e = start.to(torch.float32), end.to(torch.float32)
    target = torch.stack([(s + e) / 2 / window, (e - s) / window], dim=1)
    return torch.where((start >= 0).unsqueeze(1), target, torch.zeros_like(target))


def pointers_to_bars(pointers: torch.Tensor, window: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pointer_target`: (center, length) in (0,1) -> (start, end) as float bars."""
    center, length = pointers[..., 0] * window, pointers[..., 1] * window
    return center - length / 2, center + length / 2
