"""The reducer under real DDP (2 gloo processes on CPU): gradients on an unevenly split
global batch equal the single-process gradients on the concatenated batch, for every
weighting strategy; the naive per-rank mean does not; log-variances stay identical."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.reducer import WEIGHTINGS, element_losses
from tests.ddp_helpers import (STRATEGY_OPTIONS, assert_close_rel, build, free_port, global_batch,
                               grads, init_gloo, max_rel_error, rank_slice)

SCENARIOS = ("some", "none")
SCALES = ("unit",)  # the raw scale changes only the countdown targets; one scale keeps this fast


def naive_local_mean(values, mask):
    mask = mask.expand_as(values)
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    result = {"ddp": {}, "log_vars": {}}
    for scenario in SCENARIOS:
        local = rank_slice(global_batch(scenario), rank)
        for strategy in WEIGHTINGS:
            for scale in SCALES:
                mt = build(strategy, scale)
                ddp = DDP(mt)
                total, _, _ = ddp(local)
                total.backward()
                result["ddp"][(scenario, strategy, scale)] = grads(mt)
                if scenario == "some" and scale == "unit" and mt.weighting.log_vars() is not None:
                    torch.optim.AdamW(ddp.parameters(), lr=0.1).step()
                    mine = torch.tensor(list(mt.weighting.log_vars().values()), dtype=torch.float64)
                    gathered = [torch.zeros_like(mine) for _ in range(world)]
                    dist.all_gather(gathered, mine)
                    result["log_vars"][strategy] = gathered
    # The naive per-rank mean, averaged the way DDP averages gradients.
    mt = build("equal")
    outputs = mt.model(rank_slice(global_batch("some"), rank)["features"])
    parts = element_losses(outputs, rank_slice(global_batch("some"), rank), mt.loss_cfg)
    mt.weighting({t: naive_local_mean(v, m) for t, (v, m) in parts.items()}).backward()
    for p in mt.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    result["naive"] = grads(mt)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def reference_grads(scenario: str, strategy: str, scale: str) -> dict:
    mt = build(strategy, scale)
    total, _, _ = mt(global_batch(scenario))
    total.backward()
    return grads(mt)


def test_ddp_gradients_equal_single_process_for_every_strategy(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert set(STRATEGY_OPTIONS) == set(WEIGHTINGS)
    checked = 0
    for scenario in SCENARIOS:
        for strategy in WEIGHTINGS:
            for scale in SCALES:
                want = reference_grads(scenario, strategy, scale)
                for r in range(2):
                    assert_close_rel(ranks[r]["ddp"][(scenario, strategy, scale)], want, rel=1e-6)
                checked += 1
    assert checked == len(SCENARIOS) * len(WEIGHTINGS) * len(SCALES)

    # The naive mean of per-rank means is measurably off (here by more than 5%).
    err = max_rel_error(ranks[0]["naive"], reference_grads("some", "equal", "unit"))
    assert err > 0.05, err

    # Log-variances got gradients (they moved) and are identical on both ranks after a step.
    for strategy in ("uncertainty", "uncertainty-positive"):
        per_rank = ranks[0]["log_vars"][strategy]
        assert torch.equal(per_rank[0], per_rank[1])
        init = build(strategy).weighting.log_vars()
        assert all(abs(a - b) > 1e-3 for a, b in zip(per_rank[0].tolist(), init.values()))
        want = reference_grads("some", strategy, "unit")
        for name, g in want.items():
            if name.startswith("weighting.log_var_"):
                assert g.abs().item() > 0, name
