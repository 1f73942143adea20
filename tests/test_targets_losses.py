"""Targets, per-element masked losses and element_mean (single process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.reducer import (LossConfig, countdown_target, element_counts, element_mean,
                              pointer_target, pointers_to_bars, span_target, task_losses)


def test_span_target_is_inclusive():
    m = span_target(torch.tensor([3, 0, -1]), torch.tensor([5, 0, -1]))
    assert m.shape == (3, 105)
    assert m[0].nonzero().flatten().tolist() == [3, 4, 5]
    assert m[1].nonzero().flatten().tolist() == [0]
    assert m[2].sum() == 0  # unlabeled


def test_countdown_raw_and_unit_scales():
    start = torch.tensor([30])
    raw = countdown_target(start, "raw")[0]
    assert raw[30] == 0 and raw[29] == 1 and raw[31] == -1
    assert raw[0] == 20 and raw[104] == -20  # clipped: 30 bars before, 74 after
    unit = countdown_target(start, "unit")[0]
    assert unit[30] == 0.5 and unit[10] == 1.0 and unit[9] == 1.0 and unit[50] == 0.0
    assert torch.allclose(unit, (raw + 20) / 40)
    with pytest.raises(ValueError):
        countdown_target(start, "bars")


def test_pointer_convention_and_inverse():
    start, end = torch.tensor([10, 52]), torch.tensor([30, 52])
    p = pointer_target(start, end)
    assert torch.allclose(p[0], torch.tensor([20 / 105, 20 / 105]))
    assert torch.allclose(p[1], torch.tensor([52 / 105, 0.0]))
    s, e = pointers_to_bars(p)
    assert torch.allclose(s, start.float(), atol=1e-4) and torch.allclose(e, end.float(), atol=1e-4)


def test_element_mean_masks_and_ignores_nan_on_masked_elements():
    values = torch.tensor([1.0, 2.0, float("nan"), 5.0], requires_grad=True)
    mask = torch.tensor([True, True, False, True])
    out = element_mean(values, mask)
    assert out.item() == pytest.approx(8 / 3)
    out.backward()
    assert torch.allclose(values.grad, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))


def test_element_mean_with_no_elements_is_zero_with_a_gradient_path():
    values = torch.randn(4, requires_grad=True)
    out = element_mean(values, torch.zeros(4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(values.grad, torch.zeros(4))


def make_batch():
    torch.manual_seed(0)
    B = 4
    valid = torch.ones(B, 105, dtype=torch.bool)
    valid[:, :6] = False  # warm-up bars
    valid[1, 50:60] = False  # a gap
    return {
        "features": torch.randn(B, 105, 12),
        "valid": valid,
        "label": torch.tensor([0, 1, -1, 1]),
        "expansion_start": torch.tensor([10, 40, -1, 90]),
        "expansion_end": torch.tensor([20, 70, -1, 104]),
    }


def make_outputs(B=4, C=3, requires_grad=False):
    torch.manual_seed(1)
    return {"type_logits": torch.randn(B, C, requires_grad=requires_grad),
            "pointers": torch.rand(B, 2, requires_grad=requires_grad),
            "span_logits": torch.randn(B, 105, requires_grad=requires_grad),
            "countdown": (3 * torch.randn(B, 105)).requires_grad_(requires_grad)}


@pytest.mark.parametrize("scale", ["unit", "raw"])
def test_task_losses_equal_hand_computed_masked_means(scale):
    batch, out = make_batch(), make_outputs()
    cfg = LossConfig(countdown_scale=scale, span_pos_weight=13.1)
    losses = task_losses(out, batch, cfg)
    rows = [0, 1, 3]  # the labeled rows
    # type: one element per labeled row
    ce = F.cross_entropy(out["type_logits"][rows], batch["label"][rows])
    assert losses["type"].item() == pytest.approx(ce.item(), rel=1e-6)
    # pointer: two elements per labeled row
    tgt = torch.stack([(batch["expansion_start"] + batch["expansion_end"]) / 2 / 105,
                       (batch["expansion_end"] - batch["expansion_start"]) / 105], 1).float()
    hub = F.huber_loss(out["pointers"][rows], tgt[rows], delta=0.08)
    assert losses["pointer"].item() == pytest.approx(hub.item(), rel=1e-6)
    # span and countdown: only valid bars of labeled rows, pooled over rows (not mean of rows)
    span_sum, cd_sum, n = 0.0, 0.0, 0
    for r in rows:
        s, e = int(batch["expansion_start"][r]), int(batch["expansion_end"][r])
        for t in range(105):
            if not batch["valid"][r, t]:
                continue
            y = 1.0 if s <= t <= e else 0.0
            p = torch.sigmoid(out["span_logits"][r, t]).item()
            span_sum += -(13.1 * y * torch.log(torch.tensor(p)) + (1 - y) * torch.log(torch.tensor(1 - p))).item()
            c = max(-20, min(20, s - t))
            c = c if scale == "raw" else (c + 20) / 40
            d = abs(out["countdown"][r, t].item() - c)
            cd_sum += 0.5 * d * d if d <= 1.0 else d - 0.5
            n += 1
    assert n == 3 * 99 - 10
    assert losses["span"].item() == pytest.approx(span_sum / n, rel=1e-5)
    assert losses["countdown"].item() == pytest.approx(cd_sum / n, rel=1e-5)
    assert element_counts(batch, ["type", "pointer", "span", "countdown"]) == \
        {"type": 3, "pointer": 6, "span": n, "countdown": n}


def test_unlabeled_rows_and_masked_bars_get_no_gradient():
    batch, out = make_batch(), make_outputs(requires_grad=True)
    losses = task_losses(out, batch, LossConfig())
    sum(losses.values()).backward()
    assert out["type_logits"].grad[2].abs().sum() == 0
    assert out["pointers"].grad[2].abs().sum() == 0
    assert out["span_logits"].grad[2].abs().sum() == 0
    assert out["countdown"].grad[:, :6].abs().sum() == 0  # warm-up
    assert out["countdown"].grad[1, 50:60].abs().sum() == 0  # gap
    assert out["countdown"].grad[0, 6:].abs().min() > 0


def test_all_unlabeled_batch_gives_zero_losses_that_still_backpropagate():
    batch, out = make_batch(), make_outputs(requires_grad=True)
    batch["label"][:] = -1
    batch["expansion_start"][:] = -1
    batch["expansion_end"][:] = -1
    losses = task_losses(out, batch, LossConfig())
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(t.grad is not None for t in out.values())


def test_bad_loss_config_is_a_user_error():
    with pytest.raises(UserError, match="loss.countdown_scale"):
        LossConfig(countdown_scale="bars")
    with pytest.raises(UserError, match="loss.span_pos_weight"):
        LossConfig(span_pos_weight=0)
