"""The report's figures, as PNG bytes.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly (no pyplot): no
global state, no display needed, safe in a Ray worker. Every function takes the run's records
(and predictions) and returns PNG bytes, or None when the run holds nothing to draw; the caller
says what was missing. The epochs passed in are the records' (from 0); the axes show them from 1,
with a tick on whole epochs only.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.report.run import has_series, series, shown_epoch

TASK_COLORS = {"type": "#1f77b4", "pointer": "#ff7f0e", "span": "#2ca02c", "countdown": "#d62728"}
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
              "#17becf"]
DPI = 80


def task_color(task: str) -> str:
    return TASK_COLORS.get(task, "#7f7f7f")


def to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.4):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _log_if_positive(ax, values: list[float]) -> None:
    """Log scale when every value is positive and they span more than a decade: per-element
    losses of the four tasks differ by 100x (pointer ~0.01 vs type ~1), so linear hides some."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        ax.set_yscale("log")


def _x(epochs) -> list[int]:
    """Record epochs (from 0) as the axis shows them (from 1)."""
    return [shown_epoch(e) for e in epochs]


def _mark_best(ax, best_epoch: int | None) -> None:
    if best_epoch is not None:
        ax.axvline(shown_epoch(best_epoch), color="#444", linestyle=":", linewidth=1.2,
                   label="best epoch")


def _finish(ax, title: str, ylabel: str = "", legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no ticks at quarter epochs
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def loss_curves(records, epochs, tasks, best_epoch=None) -> bytes | None:
    """Train (left) and val (right) per-element loss of every task on one axis each."""
    if not any(has_series(records, f"{s}.{t}") for s in ("train", "val") for t in tasks):
        return None
    fig, axes = _figure(2)
    for ax, split in zip(axes, ("train", "val")):
        values = []
        for t in tasks:
            ys = series(records, f"{split}.{t}")
            values += ys
            ax.plot(_x(epochs), ys, marker=".", color=task_color(t), label=t)
        _log_if_positive(ax, values)
        _mark_best(ax, best_epoch)
        _finish(ax, f"{split} loss per task (per element)", "loss")
    return to_png(fig)


def weight_curves(records, epochs, tasks) -> bytes | None:
    """Effective task weights and, when the strategy learns them, the log-variances s."""
    panels = [("weights", "effective weight")]
    if any(has_series(records, f"log_vars.{t}") for t in tasks):
        panels.append(("log_vars", "log-variance s = log sigma^2"))
    if not any(has_series(records, f"weights.{t}") for t in tasks) and len(panels) == 1:
        return None
    fig, axes = _figure(len(panels))
    for ax, (key, label) in zip(axes, panels):
        values = []
        for t in tasks:
            ys = series(records, f"{key}.{t}")
            values += ys
            ax.plot(_x(epochs), ys, marker=".", color=task_color(t), label=t)
        if key == "weights":
            _log_if_positive(ax, values)
        _finish(ax, label, key)
    return to_png(fig)


def gradient_curves(records, epochs, tasks, starve_share: float) -> bytes | None:
    """Per-task gradient norm on the shared encoder, its share, and the countdown/pointer ratio."""
    if not any(has_series(records, f"grad_norm.{t}") for t in tasks):
        return None
    fig, axes = _figure(3, width=4.4)
    values = []
    for t in tasks:
        ys = series(records, f"grad_norm.{t}")
        values += ys
        axes[0].plot(_x(epochs), ys, marker=".", color=task_color(t), label=t)
    _log_if_positive(axes[0], values)
    _finish(axes[0], "gradient norm on the shared encoder", "norm")
    for t in tasks:
        axes[1].plot(_x(epochs), series(records, f"grad_share.{t}"), marker=".",
                     color=task_color(t), label=t)
    axes[1].axhline(starve_share, color="#b00", linestyle="--", linewidth=1.2,
                    label=f"starving < {starve_share:g}")
    axes[1].set_ylim(0, 1)
    _finish(axes[1], "gradient share per task", "share")
    ratio = series(records, "grad_ratio_countdown_pointer")
    axes[2].plot(_x(epochs), ratio, marker=".", color="#555", label="countdown / pointer")
    axes[2].axhline(1.0, color="#2a2", linestyle="--", linewidth=1, label="balanced (1.0)")
    _log_if_positive(axes[2], ratio + [1.0])
    _finish(axes[2], "countdown / pointer gradient ratio", "ratio")
    return to_png(fig)


# (title, [(metric path, label)], reference lines [(y, label)])
METRIC_PANELS = [
    ("span F1", [("span.f1", "F1 pooled over bars"), ("span.window_f1", "F1 per window"),
                 ("span.f1_window", "F1 per window")],
     [(0.25, "production target 0.25")]),
    ("span probability separation", [("span.prob_separation", "in-span - out-of-span"),
                                     ("span.separation", "in-span - out-of-span")],
     [(0.05, "viable 0.05"), (0.10, "strong 0.10")]),
    ("pointer Hit@\u00b13", [("pointer.hit3_start", "start"), ("pointer.hit3_end", "end"),
                             ("pointer.hit3_both", "both")], []),
    ("pointer MAE (bars)", [("pointer.center_mae_bars", "center"),
                            ("pointer.length_mae_bars", "length")], [(2.0, "center target 2")]),
    ("countdown MAE (bars)", [("countdown.mae_bars", "MAE")], [(5.0, "target 5")]),
    ("type", [("type.accuracy", "accuracy"), ("type.f1_macro", "macro F1"),
              ("type.macro_f1", "macro F1")], [(0.5, "macro F1 gate 0.5")]),
]


def metric_curves(records, epochs, best_epoch=None) -> bytes | None:
    panels = [p for p in METRIC_PANELS if any(has_series(records, m) for m, _ in p[1])]
    if not panels:
        return None
    ncols = 3
    fig, axes = _figure(ncols, math.ceil(len(panels) / ncols), width=4.4, height=3.0)
    for ax, (title, metrics, refs) in zip(axes, panels):
        for path, label in metrics:
            if has_series(records, path):
                ax.plot(_x(epochs), series(records, path), marker=".", label=label)
        for y, label in refs:
            ax.axhline(y, color="#999", linestyle="--", linewidth=0.8, label=label)
        _mark_best(ax, best_epoch)
        _finish(ax, title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return to_png(fig)


def throughput_curves(records, epochs) -> bytes | None:
    if not (has_series(records, "samples_per_s") or has_series(records, "epoch_time_s")):
        return None
    fig, axes = _figure(2)
    axes[0].plot(_x(epochs), series(records, "samples_per_s"), marker=".", color="#1f77b4")
    _finish(axes[0], "training throughput", "samples/s", legend=False)
    axes[1].plot(_x(epochs), series(records, "epoch_time_s"), marker=".", color="#ff7f0e")
    _finish(axes[1], "epoch time (train)", "seconds", legend=False)
    return to_png(fig)


# --------------------------------------------------------------- best-epoch predictions


def scored_bars(pred: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(span probability, in-span bool) over the valid bars of labeled windows."""
    if "span_prob" not in pred or pred["span_prob"].ndim != 2 or not len(pred["span_prob"]):
        return None
    prob = pred["span_prob"].astype(np.float64)
    n, w = prob.shape
    start = pred.get("expansion_start", np.full(n, -1)).reshape(-1, 1)
    end = pred.get("expansion_end", np.full(n, -1)).reshape(-1, 1)
    bar = np.arange(w).reshape(1, -1)
    in_span = (bar >= start) & (bar <= end)
    scored = np.broadcast_to((start >= 0), (n, w)).copy()
    if "label" in pred:
        scored &= (pred["label"].reshape(-1, 1) >= 0)
    if "valid" in pred and pred["valid"].shape == prob.shape:
        scored &= pred["valid"].astype(bool)
    return prob[scored], in_span[scored]


def span_histogram(pred: dict, epoch) -> bytes | None:
    bars = scored_bars(pred)
    if bars is None or not len(bars[0]):
        return None
    prob, in_span = bars
    fig, axes = _figure(1, width=6.0)
    ax = axes[0]
    bins = np.linspace(0, 1, 41)
    ax.hist(prob[~in_span], bins=bins, density=True, alpha=0.55, color="#7f7f7f",
            label=f"out-of-span bars (n={int((~in_span).sum())})")
    ax.hist(prob[in_span], bins=bins, density=True, alpha=0.55, color="#2ca02c",
            label=f"in-span bars (n={int(in_span.sum())})")
    ax.axvline(0.5, color="#b00", linestyle="--", linewidth=1, label="threshold 0.5")
    shown = "" if epoch is None else f" ({shown_epoch(epoch)})"
    ax.set_title(f"span probability at the best epoch{shown}", fontsize=10)
    ax.set_xlabel("p(in span)", fontsize=9)
    ax.set_ylabel("density", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return to_png(fig)


def pick_windows(pred: dict, count: int = 4) -> list[int]:
    """Rows of labeled windows with an expansion, spread over the val split (deterministic)."""
    n = len(pred.get("span_prob", []))
    if "ohlc" not in pred or not n:
        return []
    ok = np.ones(n, bool)
    if "expansion_start" in pred:
        ok &= pred["expansion_start"] >= 0
    if "label" in pred:
        ok &= pred["label"] >= 0
    rows = np.flatnonzero(ok)
    if not len(rows):
        return []
    picks = np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)
    return [int(rows[i]) for i in np.unique(picks)]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous True runs of a 1-D mask as (first, last) bar indices."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def _candles(ax, ohlc: np.ndarray) -> None:
    o, h, l, c = (ohlc[:, i] for i in range(4))
    x = np.arange(len(o))
    colors = np.where(c >= o, "#26a69a", "#ef5350")
    # two line collections (wicks, thick bodies): far faster than 105 Rectangle patches
    ax.vlines(x, l, h, color="#333", linewidth=0.6)
    ax.vlines(x, np.minimum(o, c), np.maximum(o, c), colors=colors, linewidth=3.2)


def window_panels(pred: dict, rows: list[int]) -> bytes | None:
    """Val windows as candles; true expansion shaded green, predicted (p > 0.5) orange, the
    pointer head's predicted [start, end] as a bracket above the bars."""
    if not rows:
        return None
    fig, axes = _figure(2, math.ceil(len(rows) / 2), width=6.0, height=3.2)
    for ax, row in zip(axes, rows):
        ohlc = pred["ohlc"][row].astype(np.float64)
        _candles(ax, ohlc)
        s, e = int(pred["expansion_start"][row]), int(pred["expansion_end"][row])
        ax.axvspan(s - 0.5, e + 0.5, color="#2ca02c", alpha=0.18, label="true expansion")
        prob = pred["span_prob"][row]
        for i, (a, b) in enumerate(_runs(prob > 0.5)):
            ax.axvspan(a - 0.5, b + 0.5, ymin=0, ymax=0.12, color="#ff7f0e", alpha=0.8,
                       label="predicted span (p > 0.5)" if i == 0 else None)
        if "pointers" in pred:
            w = prob.shape[0]
            center, length = pred["pointers"][row] * w
            top = np.nanmax(ohlc[:, 1])
            ax.plot([center - length / 2, center + length / 2], [top, top], color="#9467bd",
                    linewidth=3, label="pointer head [start, end]")
        twin = ax.twinx()
        twin.plot(prob, color="#ff7f0e", linewidth=1, alpha=0.7, label="p(span) per bar")
        twin.legend(fontsize=6, loc="upper right")
        twin.set_ylim(0, 1)
        twin.tick_params(labelsize=7)
        twin.set_ylabel("p(span)", fontsize=8)
        index = int(pred["index"][row]) if "index" in pred else row
        label = int(pred["label"][row]) if "label" in pred else -1
        ax.set_title(f"val window {index} (label {label}, true span {s}-{e})", fontsize=9)
        ax.set_xlim(-1, prob.shape[0])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("bar", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    return to_png(fig)


# ------------------------------------------------------------------------------ compare


def overlay_curves(runs, panels: list[tuple[str, str]]) -> bytes | None:
    """One panel per (metric path, title), one line per run."""
    panels = [(p, t) for p, t in panels if any(has_series(r.records, p) for r in runs)]
    if not panels:
        return None
    ncols = min(3, len(panels))
    fig, axes = _figure(ncols, math.ceil(len(panels) / ncols), width=4.4, height=3.0)
    for ax, (path, title) in zip(axes, panels):
        values = []
        for i, run in enumerate(runs):
            ys = series(run.records, path)
            values += ys
            ax.plot(_x(run.epochs), ys, marker=".", color=RUN_COLORS[i % len(RUN_COLORS)],
                    label=run_label(run, i))
        if path.startswith(("train.", "val.", "grad_norm.")) or path == "val_loss":
            _log_if_positive(ax, values)
        _finish(ax, title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return to_png(fig)


def run_label(run, i: int) -> str:
    return f"{i + 1}. {run.name}" + (f" ({run.weighting})" if run.weighting else "")
