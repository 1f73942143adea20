"""`moola-pipeline compare RUN...`: runs side by side on one page.

Made for "the same data under each balancing strategy": a table of final and best values per
metric (best in the direction that is better, with its epoch), each run's alarms, and overlaid
curves of the per-task val losses, weights, gradient shares and task metrics.
"""

from __future__ import annotations

import datetime as dt

from pipeline import storage
from pipeline.config import redact
from pipeline.errors import UserError
from pipeline.report import plots
from pipeline.report.alarms import AlarmConfig, replay
from pipeline.report.html import METRIC_ROWS
from pipeline.report.page import Raw, esc, fmt, img, page, table
from pipeline.report.run import TASKS, Run, load_run, lookup, number, shown_epoch

DEFAULT_OUT = "compare.html"


def write_comparison(run_uris: list[str], out: str = DEFAULT_OUT) -> str:
    """Render the comparison of `run_uris` and write it atomically to `out` (local or s3://).
    Every run is read before anything is written."""
    if not run_uris:
        raise UserError("compare needs at least one RUN directory")
    runs = [load_run(u) for u in run_uris]
    storage.write_text_atomic(out, render_comparison(runs))
    return out


def _best(run: Run, path: str, better: str) -> tuple[float, int] | None:
    values = [(number(lookup(r, path)), e) for r, e in zip(run.records, run.epochs)]
    values = [(v, e) for v, e in values if v is not None]
    if not values:
        return None
    return max(values) if better == "max" else min(values)


def _metric_table(runs: list[Run]) -> str:
    header = ["metric"] + [f"{plots.run_label(r, i)}: {kind}" for i, r in enumerate(runs)
                           for kind in ("final", "best")]
    rows = [[label, *_compared(runs, path, better)] for label, path, better in METRIC_ROWS
            if any(_best(r, path, better) for r in runs)]
    rows += [[f"val loss {task}", *_compared(runs, f"val.{task}", "min")] for task in _tasks(runs)]
    return table(header, rows)


def _compared(runs: list[Run], path: str, better: str) -> list:
    """(final, best) cells of one metric for every run; the best run's best value in bold."""
    bests = [_best(r, path, better) for r in runs]
    values = [b[0] for b in bests if b]
    winner = (max(values) if better == "max" else min(values)) if values else None
    cells = []
    for run, b in zip(runs, bests):
        cells.append(lookup(run.records[-1], path))
        if b is None:
            cells.append(None)
            continue
        text = f"{fmt(b[0])} (ep {shown_epoch(b[1])})"
        cells.append(Raw(f"<b>{text}</b>" if b[0] == winner and len(runs) > 1 else text))
    return cells


def _tasks(runs: list[Run]) -> list[str]:
    """Tasks of any run, canonical order first."""
    seen = [t for r in runs for t in r.tasks]
    return [t for t in TASKS if t in seen] + sorted(set(seen) - set(TASKS))


def _run_table(runs: list[Run]) -> str:
    rows = []
    for i, run in enumerate(runs):
        alarms = replay(run.records, AlarmConfig.from_run_config(run.config))
        text = "; ".join(f"{a.kind} {a.task} (epoch {shown_epoch(a.epoch)})"
                         for a, _ in alarms) or "none"
        best = None if run.best_epoch is None else shown_epoch(run.best_epoch)
        rows.append([plots.run_label(run, i), Raw(f"<code>{esc(redact(run.uri))}</code>"),
                     len(run.records), best, lookup(run.records[-1], "world_size"),
                     Raw(esc(text))])
    return table(["run", "directory", "epochs", "best epoch", "workers", "balance alarms"],
                 rows, left_cols=2)


def _evaluation_table(runs: list[Run]) -> list[str]:
    """Each run's `evaluate` figures on test, side by side with their intervals and lift."""
    from pipeline.evaluate import METRICS
    from pipeline.evaluate.evaluate import interval_text
    evaluated = [(i, r, r.evaluations["test"]) for i, r in enumerate(runs) if "test" in r.evaluations]
    if not evaluated:
        return ['<p class="sub">No run has been evaluated on test yet '
                '(<code>moola-pipeline evaluate RUN</code>).</p>']
    header = ["metric"] + [f"{plots.run_label(r, i)}: {kind}" for i, r, _ in evaluated
                           for kind in ("test [95% CI]", "lift [95% CI]")]
    rows = []
    for metric in METRICS:
        entries = [e["metrics"].get(metric) for _, _, e in evaluated]
        if not any(entries):
            continue
        cells = [(interval_text(e), interval_text((e or {}).get("lift"))) for e in entries]
        rows.append([metric, *[cell for pair in cells for cell in pair]])
    return ["<h2>Test metrics (evaluate)</h2>",
            '<p class="sub">95% bootstrap intervals over the test windows; lift over the best '
            'naive baseline (positive = better). Intervals that overlap do not separate runs.</p>',
            table(header, rows)]


def render_comparison(runs: list[Run]) -> str:
    tasks = _tasks(runs)
    no_data: list[str] = []
    body = [f"<h1>Run comparison ({len(runs)} runs)</h1>",
            f'<p class="sub">generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}</p>',
            "<h2>Runs</h2>", _run_table(runs),
            *_evaluation_table(runs),
            "<h2>Final and best metrics</h2>",
            '<p class="sub">best = best value over the epochs (epoch in brackets, counted from '
            '1); bold marks the best run.</p>', _metric_table(runs),
            "<h2>Val loss per task</h2>",
            img(plots.overlay_curves(runs, [(f"val.{t}", f"val loss: {t}") for t in tasks]
                                     + [("val_loss", "val loss: sum of tasks")]),
                "overlaid val losses", no_data),
            "<h2>Weights and gradient shares</h2>",
            img(plots.overlay_curves(runs, [(f"weights.{t}", f"weight: {t}") for t in tasks]
                                     + [(f"grad_share.{t}", f"grad share: {t}") for t in tasks]),
                "overlaid weights and gradient shares", no_data),
            "<h2>Task metrics</h2>",
            img(plots.overlay_curves(runs, [(p, label) for label, p, _ in METRIC_ROWS
                                            if p != "val_loss"]),
                "overlaid task metrics", no_data)]
    if no_data:
        body.append(f'<p class="note">No data in any run for: {esc(", ".join(no_data))}.</p>')
    return page("moola run comparison", body)
