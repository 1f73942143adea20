"""JadeCompact: a small multi-task BiLSTM over 105-bar windows.

x [B,105,F] -> input dropout -> BiLSTM(F -> 2*hidden) -> lstm_out [B,105,2H]
  pooled path:  mean over time -> Linear(2H -> head_width) + ReLU = `features` [B,head_width]
                type head    Dropout -> Linear(head_width -> C)            -> type_logits [B,C]
                pointer head Dropout -> Linear(head_width -> 2) -> sigmoid -> pointers [B,2]
  per-bar path (on lstm_out, not on the pooled vector, as in the original model):
                span head      Dropout -> Linear(2H -> 1) -> span_logits [B,105]
                countdown head Dropout -> Linear(2H -> 1) -> countdown   [B,105]

With F=12, hidden 96, 1 layer, 3 classes and all heads the model has 97,543 parameters
(LSTM 84,480, projection 12,352, heads 195 + 130 + 193 + 193); the original pipeline's
97,547 also counted its four log-sigma scalars, which here live in the uncertainty weighting
(`pipeline.reducer.MultiTaskModel` wraps both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import TASKS, ModelSection
from pipeline.errors import UserError
WINDOW = 105

# Output key of each task's head.
OUTPUT_KEYS = {"type": "type_logits", "pointer": "pointers", "span": "span_logits",
               "countdown": "countdown"}


@dataclass
class JadeConfig(ModelSection):
    """The run config's `model:` section (`pipeline.config.ModelSection`: one source of the
    defaults) plus the input width, which comes from the data."""
    n_features: int = 12

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {unknown} in model.tasks: choose from {list(TASKS)}")
        if not self.tasks:
            raise UserError("model.tasks is empty: enable at least one of " + ", ".join(TASKS))
        for name in ("n_features", "hidden", "num_layers", "num_classes", "head_width"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_dropout", "recurrent_dropout", "dense_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")


def _head(dropout: float, d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, d_out))


class JadeCompact(nn.Module):
    def __init__(self, cfg: JadeConfig | None = None):
        super().__init__()
        cfg = cfg or JadeConfig()
        self.cfg = cfg
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.lstm = nn.LSTM(cfg.n_features, cfg.hidden, num_layers=cfg.num_layers,
                            batch_first=True, bidirectional=True,
                            dropout=cfg.recurrent_dropout if cfg.num_layers > 1 else 0.0)
        seq_width = 2 * cfg.hidden
        self.projection = nn.Linear(seq_width, cfg.head_width)
        # One attribute per head (`type_head`, ...): a ModuleDict key "type" would clash
        # with nn.Module.type.
        head_shapes = {"type": (cfg.head_width, cfg.num_classes), "pointer": (cfg.head_width, 2),
                       "span": (seq_width, 1), "countdown": (seq_width, 1)}
        for task in cfg.tasks:
            setattr(self, f"{task}_head", _head(cfg.dense_dropout, *head_shapes[task]))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.cfg.tasks

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder every task shares: the LSTM and the projection."""
        return [*self.lstm.parameters(), *self.projection.parameters()]

    def head_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.head(task).parameters())

    def head(self, task: str) -> nn.Module:
        return getattr(self, f"{task}_head")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lstm_out, _ = self.lstm(self.input_dropout(x))  # [B,105,2H]
        features = torch.relu(self.projection(lstm_out.mean(dim=1)))  # [B,head_width]
        tasks, out = self.cfg.tasks, {}
        if "type" in tasks:
            out["type_logits"] = self.type_head(features)
        if "pointer" in tasks:
            out["pointers"] = torch.sigmoid(self.pointer_head(features))
        if "span" in tasks:
            out["span_logits"] = self.span_head(lstm_out).squeeze(-1)
        if "countdown" in tasks:
            out["countdown"] = self.countdown_head(lstm_out).squeeze(-1)
        return out
