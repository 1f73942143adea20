"""Helpers for the 2-process gloo tests (tests/test_reducer_ddp.py, tests/test_diagnostics.py):
a free port, process-group setup, and a deterministic global batch split unevenly."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from pipeline.model import JadeConfig
from pipeline.reducer import LossConfig, MultiTaskModel

# Dropout off so one process and two compute the same function; float64 so that a 1e-6
# relative tolerance tests the reduction, not float32 summation order.
MODEL_CFG = dict(input_dropout=0.0, dense_dropout=0.0)
STRATEGY_OPTIONS = {
    "equal": {},
    "fixed": {"weights": {"type": 1.0, "pointer": 2.0, "span": 0.5, "countdown": 3.0}},
    "uncertainty": {"init": {"pointer": -0.6, "countdown": 0.3}},
    "uncertainty-positive": {"init": {"pointer": -0.6, "span": 0.2}},
    "running-mean": {},
}
RANK_ROWS = [(0, 4), (4, 7)]  # rank 0 holds 4 rows, rank 1 holds 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)


def build(strategy: str, scale: str = "unit") -> MultiTaskModel:
    torch.manual_seed(0)
    cfg = LossConfig(countdown_scale=scale, weighting=strategy,
                     weighting_options=STRATEGY_OPTIONS[strategy], span_pos_weight=13.1)
    return MultiTaskModel.build(JadeConfig(**MODEL_CFG), cfg).double()


def global_batch(scenario: str) -> dict:
    """7 rows. Rank 0 (rows 0-3): labeled rows with warm-up bars and a gap, one unlabeled row.
    Rank 1 (rows 4-6), scenario "some": one labeled row whose bars are all invalid (so no
    span/countdown elements on that rank) and two unlabeled rows; scenario "none": nothing
    labeled at all (zero elements for every task on rank 1)."""
    g = torch.Generator().manual_seed(7)
    features = torch.randn(7, 105, 12, generator=g, dtype=torch.float64)
    valid = torch.ones(7, 105, dtype=torch.bool)
    valid[:, :6] = False
    valid[1, 40:55] = False
    label = torch.tensor([0, 1, 1, -1, 2, -1, -1])
    start = torch.tensor([12, 60, 3, -1, 30, -1, -1])
    end = torch.tensor([25, 70, 40, -1, 44, -1, -1])
    valid[4] = False
    if scenario == "none":
        label[4], start[4], end[4] = -1, -1, -1
    return {"features": features, "valid": valid, "label": label, "expansion_start": start,
            "expansion_end": end}


def rank_slice(batch: dict, rank: int) -> dict:
    lo, hi = RANK_ROWS[rank]
    return {k: v[lo:hi] for k, v in batch.items()}


def grads(module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in module.named_parameters()}


def assert_close_rel(got: dict, want: dict, rel: float = 1e-6) -> None:
    for name, w in want.items():
        g = got[name]
        err = (g - w).norm().item()
        assert err <= rel * w.norm().item() + 1e-12, f"{name}: |diff| {err:.3e}, |want| {w.norm():.3e}"


def max_rel_error(got: dict, want: dict) -> float:
    return max((got[n] - w).norm().item() / max(w.norm().item(), 1e-30) for n, w in want.items())
