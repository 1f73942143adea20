"""GradientProbe: per-task gradient norms of the weighted losses, shares, the
countdown/pointer ratio, starving flags; exact and non-disturbing under 2-process DDP."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.reducer import GradientProbe
from tests.ddp_helpers import (assert_close_rel, build, free_port, global_batch, grads, init_gloo,
                               rank_slice)


def manual_norms(mt, batch):
    total, losses, _ = mt(batch)
    terms = mt.weighting.task_terms(losses)
    shared, head = {}, {}
    for t in mt.tasks:
        g = torch.autograd.grad(terms[t], mt.model.shared_parameters(), retain_graph=True, allow_unused=True)
        shared[t] = torch.sqrt(sum((x ** 2).sum() for x in g if x is not None)).item()
        g = torch.autograd.grad(terms[t], mt.model.head_parameters(t), retain_graph=True)
        head[t] = torch.sqrt(sum((x ** 2).sum() for x in g)).item()
    return shared, head


def test_probe_figures_match_manual_autograd_and_leave_grads_alone():
    mt = build("uncertainty")
    batch = global_batch("some")
    shared, head = manual_norms(mt, batch)
    probe = GradientProbe(every=1)
    total, losses, _ = mt(batch)
    rep = probe.step(mt, losses)
    assert all(p.grad is None for p in mt.parameters())  # nothing accumulated
    for t in mt.tasks:
        assert rep["grad_norm"][t] == pytest.approx(shared[t], rel=1e-9)
        assert rep["grad_norm_head"][t] == pytest.approx(head[t], rel=1e-9)
    assert sum(rep["grad_share"].values()) == pytest.approx(1.0)
    assert rep["grad_ratio_countdown_pointer"] == pytest.approx(shared["countdown"] / shared["pointer"])
    assert probe.report() is rep
    total.backward()  # the graph survives the probe
    assert mt.model.lstm.weight_ih_l0.grad is not None


def test_probe_runs_every_k_steps_and_costs_nothing_when_off():
    mt = build("equal")
    batch = global_batch("some")
    _, losses, _ = mt(batch)
    off = GradientProbe(every=0)
    mt.weighting.task_terms = None  # any use would raise
    assert all(off.step(mt, losses) is None for _ in range(5))
    assert off.report()["grad_norm"] == {}
    del mt.weighting.task_terms
    probe = GradientProbe(every=3)
    hits = [probe.step(mt, losses) is not None for _ in range(7)]
    assert hits == [True, False, False, True, False, False, True]


def test_a_task_that_stays_below_the_share_threshold_is_flagged_starving():
    mt = build("fixed")
    mt.weighting.fixed.update(countdown=1e-6, pointer=200.0)  # countdown gets almost no gradient
    _, losses, _ = mt(global_batch("some"))
    probe = GradientProbe(every=1, starve_share=0.05, starve_checks=3)
    flags = [probe.step(mt, losses)["starving"] for _ in range(3)]
    assert flags == [[], [], ["countdown"]]
    assert probe.report()["grad_share"]["countdown"] < 1e-4
    mt.weighting.fixed["countdown"] = 3.0  # recovers: the flag clears at the next check
    _, losses, _ = mt(global_batch("some"))
    assert probe.step(mt, losses)["starving"] == []


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    mt = build("uncertainty")
    ddp = DDP(mt)
    total, losses, _ = ddp(rank_slice(global_batch("some"), rank))
    report = GradientProbe(every=1).step(ddp, losses)  # between forward and backward
    total.backward()
    torch.save({"report": report, "grads": grads(mt)}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_probe_under_ddp_is_exact_identical_on_ranks_and_does_not_disturb_backward(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = build("uncertainty")
    batch = global_batch("some")
    want = GradientProbe(every=1).step(ref, ref(batch)[1])
    total, _, _ = ref(batch)
    total.backward()
    for r in range(2):
        got = ranks[r]["report"]
        for key in ("grad_norm", "grad_norm_head", "grad_share"):
            for t in ref.tasks:
                assert got[key][t] == pytest.approx(want[key][t], rel=1e-6), (r, key, t)
        assert got["grad_ratio_countdown_pointer"] == pytest.approx(want["grad_ratio_countdown_pointer"], rel=1e-6)
        assert_close_rel(ranks[r]["grads"], grads(ref), rel=1e-6)
    assert ranks[0]["report"] == ranks[1]["report"]


def test_frozen_encoder_neither_starves_nor_breaks_the_probe():
    mt = build("equal")
    for p in mt.model.shared_parameters():
        p.requires_grad_(False)
    _, losses, _ = mt(global_batch("some"))
    probe = GradientProbe(every=1, starve_checks=1)
    rep = probe.step(mt, losses)
    assert rep["grad_norm"] == {t: 0.0 for t in mt.tasks}
    assert rep["grad_norm_head"]["countdown"] > 0
    assert rep["starving"] == []
