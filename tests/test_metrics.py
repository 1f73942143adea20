"""Task metrics against hand-computed values; states merge exactly, also across processes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.train.metrics import TaskMetrics

W = 105
BIG = 20.0  # a logit whose sigmoid is 1 - 2e-9


def _batch(starts, ends, labels, valid=None):
    n = len(starts)
    return {
        "label": torch.tensor(labels),
        "expansion_start": torch.tensor(starts),
        "expansion_end": torch.tensor(ends),
        "valid": torch.ones(n, W, dtype=torch.bool) if valid is None else valid,
    }


def _perfect(batch, num_classes=3):
    """Outputs that are exactly right on every labeled row (and garbage on unlabeled ones)."""
    s, e, y = batch["expansion_start"].double(), batch["expansion_end"].double(), batch["label"]
    t = torch.arange(W).double()
    inside = (t >= s[:, None]) & (t <= e[:, None])
    countdown_unit = ((s[:, None] - t).clamp(-20, 20) + 20) / 40
    logits = torch.full((len(y), num_classes), -5.0)
    logits[torch.arange(len(y)), y.clamp(min=0)] = 5.0
    return {
        "type_logits": logits,
        "pointers": torch.stack([(s + e) / 2 / W, (e - s) / W], 1).float(),
        "span_logits": torch.where(inside, BIG, -BIG).float(),
        "countdown": countdown_unit.float(),
    }


def _metrics(outputs, batch, **kw):
    m = TaskMetrics(**kw)
    m.update(outputs, batch)
    return m.compute()


def test_perfect_predictor_scores_perfectly_and_ignores_unlabeled_and_invalid_bars():
    valid = torch.ones(4, W, dtype=torch.bool)
    valid[:, :10] = False  # warm-up bars
    batch = _batch([30, 50, 70, -1], [40, 50, 90, -1], [0, 1, 1, -1], valid)
    out = _perfect(batch)
    # wreck the unscored parts: the unlabeled row and the invalid bars
    out["span_logits"][3] = BIG
    out["span_logits"][:, :10] = -out["span_logits"][:, :10] + BIG
    out["countdown"][:, :10] = 99.0
    out["countdown"][3] = 99.0
    out["pointers"][3] = torch.tensor([0.9, 0.9])
    r = _metrics(out, batch)
    span = r["span"]
    for key in ("precision", "recall", "f1", "window_precision", "window_recall", "window_f1"):
        assert span[key] == pytest.approx(1.0), key
    assert span["bars"] == 3 * 95 and span["windows"] == 3
    assert span["prob_separation"] == pytest.approx(1.0, abs=1e-6)
    ptr = r["pointer"]
    assert ptr["hit3_start"] == ptr["hit3_end"] == ptr["hit3_both"] == 1.0 and ptr["windows"] == 3
    assert ptr["center_mae_bars"] == pytest.approx(0, abs=1e-4)
    assert ptr["length_mae_bars"] == pytest.approx(0, abs=1e-4)
    assert r["countdown"]["mae_bars"] == pytest.approx(0, abs=1e-5) and r["countdown"]["bars"] == 285
    assert r["type"]["accuracy"] == 1.0 and r["type"]["f1_macro"] == 1.0 and r["type"]["samples"] == 3
    assert r["type"]["recall"] == [1.0, 1.0, None]  # class 2 never occurs


def test_predicting_nothing_gives_span_f1_zero_and_constant_class_gives_known_type_scores():
    batch = _batch([10, 40, 0, 5], [19, 44, 3, 5], [0, 0, 1, 1])
    out = _perfect(batch, num_classes=2)
    out["span_logits"] = torch.full((4, W), -BIG)
    out["type_logits"] = torch.tensor([[1.0, 0.0]] * 4)  # always class 0
    r = _metrics(out, batch, num_classes=2)
    span = r["span"]
    assert span["precision"] == span["recall"] == span["f1"] == 0.0
    assert span["window_precision"] == span["window_recall"] == span["window_f1"] == 0.0
    assert span["prob_separation"] == pytest.approx(0.0, abs=1e-8)
    # confusion [[2, 0], [2, 0]]: F1 class 0 = 2*2/(2+4), class 1 = 0
    assert r["type"]["accuracy"] == 0.5
    assert r["type"]["f1_macro"] == pytest.approx((4 / 6 + 0) / 2)
    assert r["type"]["recall"] == [1.0, 0.0]


def test_predicting_everything_in_span_pooled_and_per_window():
    # window A: 10 true bars of 105; window B: 1 true bar
    batch = _batch([10, 40], [19, 40], [0, 1])
    out = _perfect(batch)
    out["span_logits"] = torch.full((2, W), BIG)
    span = _metrics(out, batch)["span"]
    tp, fp, fn = 11, 2 * W - 11, 0
    assert span["precision"] == pytest.approx(tp / (tp + fp))
    assert span["recall"] == 1.0
    assert span["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert span["window_precision"] == pytest.approx((10 / W + 1 / W) / 2)
    assert span["window_f1"] == pytest.approx((20 / (20 + 95) + 2 / (2 + 104)) / 2)


def test_window_average_differs_from_pooled_when_windows_differ():
    batch = _batch([10, 60], [29, 69], [0, 0])  # 20 and 10 true bars
    out = _perfect(batch)
    out["span_logits"][1] = -BIG  # window B: nothing predicted
    span = _metrics(out, batch)["span"]
    assert span["window_f1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert span["f1"] == pytest.approx(2 * 20 / (2 * 20 + 0 + 10))
    assert span["precision"] == 1.0 and span["recall"] == pytest.approx(20 / 30)


def test_pointer_hits_and_maes_in_bars():
    batch = _batch([40, 10], [60, 12], [0, 1])  # centers 50, 11; lengths 20, 2
    out = _perfect(batch)
    # A: center +2, length +4 -> start round(52-12)=40 (hit), end 64 (miss by 4)
    # B: center -5 bars, length exact -> start 5, end 7: both miss
    out["pointers"] = torch.tensor([[52 / W, 24 / W], [6 / W, 2 / W]], dtype=torch.float64)
    ptr = _metrics(out, batch)["pointer"]
    assert ptr["hit3_start"] == 0.5 and ptr["hit3_end"] == 0.0 and ptr["hit3_both"] == 0.0
    assert ptr["center_mae_bars"] == pytest.approx((2 + 5) / 2)
    assert ptr["length_mae_bars"] == pytest.approx((4 + 0) / 2)


@pytest.mark.parametrize("scale", ["unit", "raw"])
def test_countdown_mae_is_in_bars_for_either_scale(scale):
    batch = _batch([30], [35], [1])
    out = _perfect(batch)
    # "0 bars to go" everywhere: 0.5 on the unit scale, 0 on the raw one
    out["countdown"] = torch.full((1, W), 0.5 if scale == "unit" else 0.0)
    r = _metrics(out, batch, countdown_scale=scale)
    expected = sum(min(abs(30 - t), 20) for t in range(W)) / W
    assert r["countdown"]["mae_bars"] == pytest.approx(expected)


def test_nothing_to_score_gives_nulls_not_nans():
    batch = _batch([-1, -1], [-1, -1], [-1, -1])
    r = _metrics(_perfect(batch), batch)
    text = json.dumps(r, allow_nan=False)  # raises on NaN
    assert r["span"]["f1"] is None and r["span"]["prob_separation"] is None
    assert r["pointer"]["hit3_both"] is None and r["countdown"]["mae_bars"] is None
    assert r["type"]["accuracy"] is None and "NaN" not in text


def test_only_the_given_tasks_are_reported():
    batch = _batch([30], [35], [1])
    out = {k: v for k, v in _perfect(batch).items() if k in ("type_logits", "span_logits")}
    r = _metrics(out, batch, tasks=("type", "span"))
    assert set(r) == {"type", "span"}


def _random_case(n, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 100, (n,), generator=g)
    ends = (starts + torch.randint(0, 5, (n,), generator=g)).clamp(max=104)
    labels = torch.randint(-1, 3, (n,), generator=g)
    starts = torch.where(labels >= 0, starts, -1)
    ends = torch.where(labels >= 0, ends, -1)
    valid = torch.rand(n, W, generator=g) > 0.1
    batch = {"label": labels, "expansion_start": starts, "expansion_end": ends, "valid": valid}
    outputs = {"type_logits": torch.randn(n, 3, generator=g),
               "pointers": torch.rand(n, 2, generator=g),
               "span_logits": torch.randn(n, W, generator=g),
               "countdown": torch.rand(n, W, generator=g)}
    return outputs, batch


def _half(d, sl):
    return {k: v[sl] for k, v in d.items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif isinstance(a[k], list):
            assert a[k] == pytest.approx(b[k])
        else:
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12), k


def test_merged_states_of_two_halves_equal_the_whole():
    outputs, batch = _random_case(32, seed=1)
    whole = TaskMetrics()
    whole.update(outputs, batch)
    first, second = TaskMetrics(), TaskMetrics()
    first.update(_half(outputs, slice(0, 13)), _half(batch, slice(0, 13)))
    second.update(_half(outputs, slice(13, 32)), _half(batch, slice(13, 32)))
    merged = first.compute(first.state() + second.state())
    _assert_same(merged, whole.compute())
    # and several updates on one object accumulate the same way
    first.update(_half(outputs, slice(13, 32)), _half(batch, slice(13, 32)))
    _assert_same(first.compute(), whole.compute())
    first.reset()
    assert first.state().abs().sum() == 0


def _worker(rank, world, init_file, outputs, batch, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        m = TaskMetrics()
        half = slice(0, 10) if rank == 0 else slice(10, 24)
        m.update(_half(outputs, half), _half(batch, half))
        results[rank] = m.compute()  # all-reduces the state itself
    finally:
        torch.distributed.destroy_process_group()


def test_compute_all_reduces_over_the_process_group(tmp_path):
    outputs, batch = _random_case(24, seed=2)
    whole = TaskMetrics()
    whole.update(outputs, batch)
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_worker, args=(r, 2, tmp_path / "pg", outputs, batch, results))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs)
        expected = whole.compute()
        _assert_same(results[0], expected)
        _assert_same(results[1], expected)
    assert not math.isnan(expected["span"]["f1"])


def test_update_asks_the_host_nothing(monkeypatch):
    """The per-step path must not sync with the device: no .item()/bool()/float(), no
    data-dependent shapes (boolean indexing, nonzero). On CPU a sync is invisible, so the
    Python-level ways to cause one are made to fail instead."""
    outputs, batch = _random_case(8, seed=3)
    m = TaskMetrics()

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} in update(): a host sync per step")
        return method

    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
            raise AssertionError("boolean-mask indexing in update(): a host sync per step")
        return original_getitem(self, index)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    m.update(outputs, batch)
    m.update(outputs, batch)
    monkeypatch.undo()
    assert m.compute()["type"]["samples"] == 2 * int((batch["label"] >= 0).sum())
