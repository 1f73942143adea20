"""`report.html`: one self-contained page that shows whether every task is learning.

Alarms come first (a starving task should be the first thing a person sees), then the losses,
weights and gradients that explain them, the task metrics, the best epoch's predictions, and
the run's context (throughput, config, data). Written at the end of every run and by
`moola-pipeline report RUN`, for a local or s3:// run directory. Epochs on the page count from 1
(`shown_epoch`); the records they come from count from 0.
"""

from __future__ import annotations

import datetime as dt

import yaml

from pipeline import storage
from pipeline.report import plots
from pipeline.report.alarms import AlarmConfig, describe_thresholds, replay
from pipeline.report.page import Raw, esc, fmt, img, page, table
from pipeline.report.run import REPORT, Run, epochs_text, load_run, lookup, number, shown_epoch

# Keys issue 4 asks every record to carry; the report lists those no record has.
EXPECTED_KEYS = ["epoch", "step", "world_size", "train", "val", "weights", "log_vars",
                 "grad_norm", "grad_share", "grad_ratio_countdown_pointer", "samples_per_s",
                 "epoch_time_s", "lr"]

# (label, path, "max" or "min": which direction is better). The trainer writes the first name of
# each pair; the second is the name issue 6's brief used, so either layout reports.
METRIC_ROWS = [
    ("val loss (sum of tasks)", "val_loss", "min"),
    ("span F1 (pooled bars)", "span.f1", "max"),
    ("span F1 (per window)", "span.window_f1", "max"),
    ("span F1 (per window)", "span.f1_window", "max"),
    ("span precision", "span.precision", "max"),
    ("span recall", "span.recall", "max"),
    ("span probability separation", "span.prob_separation", "max"),
    ("span probability separation", "span.separation", "max"),
    ("pointer Hit@\u00b13 start", "pointer.hit3_start", "max"),
    ("pointer Hit@\u00b13 end", "pointer.hit3_end", "max"),
    ("pointer Hit@\u00b13 both", "pointer.hit3_both", "max"),
    ("pointer center MAE (bars)", "pointer.center_mae_bars", "min"),
    ("pointer length MAE (bars)", "pointer.length_mae_bars", "min"),
    ("countdown MAE (bars)", "countdown.mae_bars", "min"),
    ("type accuracy", "type.accuracy", "max"),
    ("type macro F1", "type.f1_macro", "max"),
    ("type macro F1", "type.macro_f1", "max"),
]


def write_report(run_dir: str, out: str | None = None) -> str:
    """Render RUN's report and write it (atomically) to `out`, default RUN/report.html.
    Returns the URI written. Reads everything first: a broken input writes nothing."""
    run = load_run(run_dir)
    text = render_report(run)
    target = out or storage.join(run.uri, REPORT)
    storage.write_text_atomic(target, text)
    return target


def render_report(run: Run) -> str:
    alarm_cfg = AlarmConfig.from_run_config(run.config)
    records, epochs, tasks, best = run.records, run.epochs, run.tasks, run.best_epoch
    no_data: list[str] = []
    body = [f"<h1>Run report: {esc(run.name)}</h1>", _subtitle(run)]
    body += _alarm_section(run, alarm_cfg)
    body += _evaluation_section(run)
    body += ["<h2>Summary per task</h2>", _task_table(run)]
    body += ["<h2>Task metrics</h2>", _metric_table(run, best)]
    body += ["<h2>Losses</h2>",
             img(plots.loss_curves(records, epochs, tasks, best), "per-task loss curves", no_data)]
    body += ["<h2>Task weights and log-variances</h2>",
             img(plots.weight_curves(records, epochs, tasks), "task weights", no_data)]
    body += ["<h2>Gradients on the shared encoder</h2>",
             img(plots.gradient_curves(records, epochs, tasks, alarm_cfg.starve_share),
                 "gradient norms and shares", no_data)]
    body += ["<h2>Task metrics over epochs</h2>",
             img(plots.metric_curves(records, epochs, best), "task metric curves", no_data)]
    body += _prediction_section(run, no_data)
    body += ["<h2>Throughput</h2>",
             img(plots.throughput_curves(records, epochs), "throughput and epoch times", no_data)]
    graphed = sum(int(r.get("graphed_steps") or 0) for r in records)
    if graphed:  # say whether the GPU step ran from a CUDA graph (and how much of it)
        steps = int(records[-1].get("step") or 0)
        body.append(f"<p>CUDA graphs: {graphed} of the {steps} training steps recorded were "
                    f"replayed from a captured graph (<code>train.cuda_graphs</code>).</p>")
    body += _config_section(run)
    body += _manifest_section(run)
    body += _missing_section(run, no_data)
    return page(f"moola run {run.name}", body)


def _evaluation_section(run: Run) -> list[str]:
    """`evaluate`'s table per split (test first), and the span threshold chosen on val."""
    from pipeline.evaluate.evaluate import interval_text
    out = []
    if run.threshold:
        out.append(f"<p>Span threshold <b>{run.threshold['span_threshold']:.2f}</b>, chosen on "
                   f"val ({esc(run.threshold.get('criterion', 'window_f1'))}, "
                   f"{esc(run.threshold.get('source', ''))}) and applied unchanged on test.</p>")
    for split, result in sorted(run.evaluations.items(), key=lambda kv: kv[0] != "test"):
        title = f"Evaluation on {split} ({result['windows']} windows, {esc(result['checkpoint'])})"
        if result.get("selection_split"):
            title += ": selection split, optimistic"
        rows = [[metric + ("" if e["higher_is_better"] else " (lower is better)"), interval_text(e),
                 e.get("best_baseline") or "-",
                 interval_text(e["baselines"].get(e.get("best_baseline"))), interval_text(e.get("lift"))]
                for metric, e in result["metrics"].items()]
        out += [f"<h2>{title}</h2>",
                table(["metric", "model [95% CI]", "best baseline", "baseline [95% CI]",
                       "lift [95% CI]"], rows),
                f"<p>{esc(result.get('bootstrap'))} bootstrap resamples of the windows, seed "
                f"{esc(result.get('seed'))}; lift: better than the best naive baseline by this "
                f"much (positive = better).</p>"]
    return out


def _subtitle(run: Run) -> str:
    last = run.records[-1]
    from pipeline.config import redact
    parts = [f"run directory <code>{esc(redact(run.uri))}</code>"]
    if last.get("run_id"):
        parts.append(f"run id {esc(last['run_id'])}")
    parts.append(f"{epochs_text(len(run.records))} recorded")
    if last.get("world_size") is not None:
        parts.append(f"{esc(last['world_size'])} worker(s)")
    if run.weighting:
        parts.append(f"weighting <b>{esc(run.weighting)}</b>")
    if run.best_epoch is not None:
        parts.append(f"best epoch {shown_epoch(run.best_epoch)}")
    parts.append(f"generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}")
    return f'<p class="sub">{" &middot; ".join(parts)}</p>'


def _alarm_section(run: Run, cfg: AlarmConfig) -> list[str]:
    final_epoch = run.epochs[-1]
    rows = []
    seen = set()
    for first, latest in replay(run.records, cfg):
        seen.add(first.key)
        state = "still active" if latest.epoch == final_epoch else \
            f"cleared after epoch {shown_epoch(latest.epoch)}"
        rows.append([shown_epoch(first.epoch), first.kind, first.task, Raw(esc(latest.message)),
                     state])
    for logged in run.logged_alarms:  # raised live under other thresholds, not reproduced here
        key = (logged.get("kind"), logged.get("task"))
        if key not in seen:
            seen.add(key)
            epoch = logged.get("epoch")  # alarms.jsonl counts from 0, the table from 1
            rows.append([None if number(epoch) is None else shown_epoch(epoch), logged.get("kind"),
                         logged.get("task"), Raw(esc(logged.get("message", ""))),
                         "logged during training"])
    thresholds = f'<p class="sub">Checks: {esc(describe_thresholds(cfg))}.</p>'
    if not rows:
        return ['<div class="ok"><h2>No balance alarms</h2>', thresholds, "</div>"]
    return ['<div class="alarms">', f"<h2>Balance alarms ({len(rows)})</h2>",
            table(["first epoch", "kind", "task", "latest message", "state"], rows, left_cols=5),
            thresholds, "</div>"]


def _task_table(run: Run) -> str:
    last, best = run.records[-1], run.record_at(run.best_epoch)
    rows = []
    for t in run.tasks:
        rows.append([t, lookup(last, f"train.{t}"), lookup(last, f"val.{t}"),
                     lookup(best, f"val.{t}") if best else None, lookup(last, f"weights.{t}"),
                     lookup(last, f"log_vars.{t}"), lookup(last, f"grad_share.{t}"),
                     lookup(last, f"grad_norm.{t}")])
    return table(["task", "final train loss", "final val loss", "val loss at best epoch",
                  "final weight", "final log-variance", "final grad share",
                  "final grad norm"], rows)


def _metric_table(run: Run, best_epoch: int | None) -> str:
    last, best = run.records[-1], run.record_at(best_epoch)
    rows = []
    for label, path, better in METRIC_ROWS:
        values = [(number(lookup(r, path)), run.epochs[i]) for i, r in enumerate(run.records)]
        values = [(v, e) for v, e in values if v is not None]
        if not values:
            continue
        top = max(values) if better == "max" else min(values)
        rows.append([label, lookup(last, path), lookup(best, path) if best else None,
                     f"{fmt(top[0])} (epoch {shown_epoch(top[1])})"])
    if not rows:
        return '<p class="note">No task metrics in the records.</p>'
    at_best = "at best epoch" + ("" if best_epoch is None else f" ({shown_epoch(best_epoch)})")
    return table(["metric", f"final (epoch {shown_epoch(run.epochs[-1])})", at_best,
                  "best over epochs"], rows)


def _prediction_section(run: Run, no_data: list[str]) -> list[str]:
    out = ["<h2>Best-epoch predictions (val split)</h2>"]
    pred = run.predictions
    if pred is None:
        no_data.append("best-epoch predictions (best_val_predictions.npz)")
        return out + ['<p class="note">No best_val_predictions.npz in the run directory.</p>']
    epoch = int(pred["epoch"]) if "epoch" in pred else run.best_epoch
    out.append(img(plots.span_histogram(pred, epoch), "span probability histogram", no_data))
    rows = plots.pick_windows(pred)
    out.append(img(plots.window_panels(pred, rows), "val windows with expansions", no_data))
    return out


def _config_section(run: Run) -> list[str]:
    if run.config is None:
        return ["<h2>Resolved config</h2>", '<p class="note">No config.yaml in the run.</p>']
    from pipeline.config import redact  # the file is redacted already; a second pass is cheap
    text = yaml.safe_dump(redact(run.config), sort_keys=False, default_flow_style=None)
    return ["<h2>Resolved config (secrets redacted)</h2>", f"<pre>{esc(text)}</pre>"]


def _manifest_section(run: Run) -> list[str]:
    m = run.manifest
    if m is None:
        return ["<h2>Data</h2>", '<p class="note">No manifest.json in the run.</p>']
    shards = m.get("shards") or []
    rows = [["feature set", m.get("feature_set")],
            ["features", f"{len(m.get('features') or [])}: {', '.join(m.get('features') or [])}"],
            ["window", m.get("window")], ["schema version", m.get("schema_version")],
            ["splits", ", ".join(f"{k} {v}" for k, v in (m.get("splits") or {}).items())],
            ["shards", f"{len(shards)} files, {sum(int(s.get('bytes') or 0) for s in shards):,} bytes"],
            ["seed", m.get("seed")], ["created", m.get("created")]]
    body = ["<h2>Data (manifest summary)</h2>", table(None, rows, left_cols=2)]
    for key in ("split_policy", "source"):
        if m.get(key):
            body.append(f"<p><b>{key.replace('_', ' ')}</b></p>"
                        f"<pre>{esc(yaml.safe_dump(m[key], sort_keys=False))}</pre>")
    return body


def _missing_section(run: Run, no_data: list[str]) -> list[str]:
    absent = [k for k in EXPECTED_KEYS if not any(k in r for r in run.records)]
    null = [k for k in EXPECTED_KEYS if k not in absent and
            all(r.get(k) in (None, {}) for r in run.records)]
    items = list(run.notes) \
        + ([f"files not in the run directory: {', '.join(run.missing)}"] if run.missing else []) \
        + ([f"record keys absent: {', '.join(absent)}"] if absent else []) \
        + ([f"record keys always empty: {', '.join(null)}"] if null else []) \
        + ([f"plots without data: {', '.join(no_data)}"] if no_data else [])
    if not items:
        return []
    return ["<h2>Not in this run</h2>", "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items)
            + "</ul>"]
