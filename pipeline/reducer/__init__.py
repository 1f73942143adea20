"""Task losses, the DDP-exact reducer, weighting strategies and gradient diagnostics.

Imports no Ray: everything here is plain PyTorch (torch.distributed when initialised)."""

from pipeline.reducer.diagnostics import GradientProbe
from pipeline.reducer.element_mean import element_mean
from pipeline.reducer.losses import LossConfig, element_counts, element_losses, task_losses
from pipeline.reducer.multitask import LOSS_STATS, MultiTaskModel
from pipeline.reducer.targets import countdown_target, pointer_target, pointers_to_bars, span_target
from pipeline.reducer.weighting import WEIGHTINGS, Weighting, build_weighting

__all__ = ["LOSS_STATS", "element_mean", "LossConfig", "task_losses", "element_losses", "element_counts",
           "MultiTaskModel", "GradientProbe", "WEIGHTINGS", "Weighting", "build_weighting",
           "span_target", "countdown_target", "pointer_target", "pointers_to_bars"]
