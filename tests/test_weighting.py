"""Weighting strategies: formulas against hand-computed values, Kendall's stationary point,
the clamp, running-mean state, the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.reducer import WEIGHTINGS, LossConfig, MultiTaskModel, build_weighting

TASKS = ("type", "pointer", "span", "countdown")
L = {"type": 1.2, "pointer": 0.02, "span": 0.8, "countdown": 15.9}


def losses(values=L):
    return {t: torch.tensor(v, dtype=torch.float64) for t, v in values.items()}


def test_registry_lists_every_strategy():
    assert set(WEIGHTINGS) == {"equal", "fixed", "uncertainty", "uncertainty-positive", "running-mean"}


def test_equal_and_fixed():
    w = build_weighting("equal", TASKS)
    assert w(losses()).item() == pytest.approx(sum(L.values()))
    assert w.effective_weights() == {t: 0.25 for t in TASKS}
    f = build_weighting("fixed", TASKS, {"weights": {"type": 1, "pointer": 2, "span": 0.5, "countdown": 0.5}})
    assert f(losses()).item() == pytest.approx(1.2 + 0.04 + 0.4 + 7.95)
    assert f.effective_weights()["pointer"] == pytest.approx(0.5)


def test_uncertainty_formula_by_hand():
    init = {"type": 0.3, "pointer": -0.6, "span": -0.2, "countdown": 1.1}
    w = build_weighting("uncertainty", TASKS, {"init": init})
    expected = (math.exp(-0.3) * 1.2 + 0.15            # classification: exp(-s) L + s/2
                + 0.5 * math.exp(0.6) * 0.02 - 0.3     # regression: 0.5 exp(-s) L + s/2
                + math.exp(0.2) * 0.8 - 0.1            # span is classification (BCE)
                + 0.5 * math.exp(-1.1) * 15.9 + 0.55)
    assert w(losses()).item() == pytest.approx(expected, rel=1e-6)
    raw = {"type": math.exp(-0.3), "pointer": 0.5 * math.exp(0.6), "span": math.exp(0.2),
           "countdown": 0.5 * math.exp(-1.1)}
    total = sum(raw.values())
    for t in TASKS:
        assert w.effective_weights()[t] == pytest.approx(raw[t] / total, rel=1e-6)
    assert w.log_vars()["pointer"] == pytest.approx(-0.6)
    assert sum(w.effective_weights().values()) == pytest.approx(1.0)


def test_uncertainty_gradient_on_log_variance_by_hand():
    w = build_weighting("uncertainty", TASKS, {"init": {"countdown": 0.4}})
    w(losses()).backward()
    # d/ds [0.5 exp(-s) L + 0.5 s] = -0.5 exp(-s) L + 0.5
    assert w.log_var_countdown.grad.item() == pytest.approx(-0.5 * math.exp(-0.4) * 15.9 + 0.5, rel=1e-6)
    assert w.log_var_type.grad.item() == pytest.approx(-math.exp(0.0) * 1.2 + 0.5, rel=1e-6)


def test_uncertainty_positive_formula_by_hand():
    w = build_weighting("uncertainty-positive", TASKS, {"init": {"pointer": -0.6}})
    s = {"type": 0.0, "pointer": -0.6, "span": 0.0, "countdown": 0.0}
    expected = sum(0.5 * math.exp(-s[t]) * L[t] + math.log(1 + math.exp(s[t])) for t in TASKS)
    assert w(losses()).item() == pytest.approx(expected, rel=1e-6)
    assert w.effective_weights()["pointer"] == pytest.approx(
        math.exp(0.6) / (3 + math.exp(0.6)), rel=1e-6)
    # The regulariser keeps the total positive even for tiny losses and very negative s.
    tiny = build_weighting("uncertainty-positive", TASKS, {"init": {t: -8.0 for t in TASKS}})
    assert tiny(losses({t: 0.0 for t in TASKS})).item() > 0


def optimise_s(kind_task: str, loss_value: float, steps=3000, clamp=None, init=0.0, w=None):
    """Adam on s alone with the loss held at `loss_value`, projecting after each step as the
    training step does (TrainStep calls `weighting.project_()` after `optimizer.step()`)."""
    if w is None:
        opts = {"init": {kind_task: init}}
        if clamp:
            opts["clamp"] = clamp
        w = build_weighting("uncertainty", (kind_task,), opts)
    param = getattr(w, f"log_var_{kind_task}")
    opt = torch.optim.Adam([param], lr=0.02)
    held = torch.tensor(loss_value)
    for _ in range(steps):
        opt.zero_grad()
        w({kind_task: held}).backward()
        opt.step()
        w.project_()
    return w, param.item()


@pytest.mark.parametrize("loss_value", [0.05, 0.7, 16.0])
def test_kendall_stationary_point_regression(loss_value):
    w, s = optimise_s("countdown", loss_value)
    assert s == pytest.approx(math.log(loss_value), abs=2e-3)
    assert w.weights()["countdown"] == pytest.approx(1 / (2 * loss_value), rel=5e-3)


def test_kendall_stationary_point_classification():
    _, s = optimise_s("type", 0.9)
    assert s == pytest.approx(math.log(2 * 0.9), abs=2e-3)


def test_clamp_bounds_the_weight_of_a_vanishing_loss():
    _, free = optimise_s("countdown", 1e-4, steps=1500)
    assert free < -6  # unclamped: s heads to log(1e-4) = -9.2, weight ~5000
    w, raw_s = optimise_s("countdown", 1e-4, steps=1500, clamp=(-2.0, 5.0))
    assert w.log_vars()["countdown"] == pytest.approx(-2.0)
    assert w.weights()["countdown"] == pytest.approx(0.5 * math.exp(2.0))
    assert raw_s == pytest.approx(-2.0)  # projected back onto the bound after every step


def test_a_clamped_log_variance_leaves_its_bound_when_the_loss_asks():
    """Issue 16.4: with the clamp inside the loss, s overshooting -2 got gradient 0 and stayed
    at -2 for the rest of the run; projected, it follows the loss back to log 5."""
    w, s_low = optimise_s("countdown", 1e-4, steps=300, clamp=(-2.0, 2.0))
    assert s_low == pytest.approx(-2.0)
    _, s_after = optimise_s("countdown", 5.0, steps=1500, w=w)  # optimum s* = log 5 = 1.61
    assert s_after == pytest.approx(math.log(5.0), abs=0.05)
    assert w.log_vars()["countdown"] == pytest.approx(math.log(5.0), abs=0.05)


def test_a_clamp_projects_an_init_outside_it():
    w = build_weighting("uncertainty", TASKS, {"init": {"span": -5.0}, "clamp": [-2, 2]})
    assert w.log_vars()["span"] == pytest.approx(-2.0)


@pytest.mark.parametrize("kind", ["uncertainty", "uncertainty-positive"])
def test_a_task_without_elements_leaves_its_log_variance_alone(kind):
    """Issue 16.7: a batch with no element of a task (loss 0) still pushed s down through the
    regulariser (gradient 1/2): 100 steps gave s = -5 and weight 148. Now s gets no gradient."""
    w = build_weighting(kind, TASKS)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    absent = {t: torch.tensor(False) for t in TASKS}
    for _ in range(100):
        opt.zero_grad()
        w({t: torch.zeros((), requires_grad=True) for t in TASKS}, absent).backward()
        opt.step()
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in w.log_vars().values())
    # with the task present the regulariser is back (s moves toward log of its loss)
    w({t: torch.tensor(0.01) for t in TASKS}, {t: torch.tensor(True) for t in TASKS}).backward()
    assert w.log_var_countdown.grad.item() == pytest.approx(-0.5 * 0.01 + 0.5 if kind == "uncertainty"
                                                            else -0.5 * 0.01 + 0.5, rel=1e-6)


def test_running_mean_warmup_average_then_ema():
    w = build_weighting("running-mean", TASKS, {"warmup_steps": 3, "momentum": 0.9})
    seq = [2.0, 4.0, 6.0, 10.0, 20.0]
    for v in seq:
        w({t: torch.tensor(v) for t in TASKS})
    m = sum(seq[:3]) / 3  # simple average over the warm-up
    for v in seq[3:]:
        m = 0.9 * m + 0.1 * v
    assert w.running_means()["countdown"] == pytest.approx(m)
    # total = sum_k w_k * L_k / m_k with the old 70/10/10/10 weights
    out = w({t: torch.tensor(L[t]) for t in TASKS})
    m_after = {t: 0.9 * m + 0.1 * L[t] for t in TASKS}
    assert out.item() == pytest.approx(sum({"pointer": 0.7}.get(t, 0.1) * L[t] / m_after[t] for t in TASKS), rel=1e-5)


def test_running_mean_first_step_normalises_every_task_to_its_weight():
    w = build_weighting("running-mean", TASKS)
    assert w(losses()).item() == pytest.approx(1.0)  # 0.7 + 0.1 * 3, each L_k / L_k


def test_running_mean_state_is_checkpointed_and_frozen_in_eval():
    w = build_weighting("running-mean", TASKS)
    for v in (1.0, 3.0):
        w({t: torch.tensor(v) for t in TASKS})
    sd = w.state_dict()
    assert set(sd) == {"running", "steps"} and int(sd["steps"]) == 2
    restored = build_weighting("running-mean", TASKS)
    restored.load_state_dict(sd)
    assert restored.running_means() == w.running_means()
    restored.eval()
    restored({t: torch.tensor(100.0) for t in TASKS})
    assert restored.running_means()["type"] == pytest.approx(2.0)


def test_log_variances_are_parameters_and_state_of_the_multitask_model():
    mt = MultiTaskModel.build(loss_cfg=LossConfig(weighting_options={"init": {"pointer": -0.6}}))
    names = dict(mt.named_parameters())
    assert names["weighting.log_var_pointer"].item() == pytest.approx(-0.6)
    assert "weighting.log_var_countdown" in mt.state_dict()


def test_registry_errors_name_the_setting():
    with pytest.raises(UserError, match="unknown weighting 'gradnorm'"):
        build_weighting("gradnorm", TASKS)
    with pytest.raises(UserError, match="does not take option"):
        build_weighting("equal", TASKS, {"init": {}})
    with pytest.raises(UserError, match="missing \\['countdown'\\]"):
        build_weighting("fixed", TASKS, {"weights": {"type": 1, "pointer": 1, "span": 1}})
    with pytest.raises(UserError, match="clamp"):
        build_weighting("uncertainty", TASKS, {"clamp": [3, 1]})
    with pytest.raises(UserError, match="init"):
        build_weighting("uncertainty", TASKS, {"init": {"stones": 0.0}})


def test_param_groups_give_log_variances_their_own_rate_and_no_decay():
    mt = MultiTaskModel.build()
    groups = mt.param_groups(lr=1e-3, weight_decay=0.01, weighting_lr=0.05)
    assert [len(g["params"]) for g in groups] == [len(list(mt.model.parameters())), 4]
    assert groups[1]["lr"] == 0.05 and groups[1]["weight_decay"] == 0.0
    torch.optim.AdamW(groups)  # a valid optimizer spec: every parameter exactly once
    assert len(MultiTaskModel.build(loss_cfg=LossConfig(weighting="equal")).param_groups(1e-3)) == 1
