"""report.html and compare.html from the recorded run: what they contain, that they render in
headless Chromium to a non-blank page with no broken image, that every inline PNG decodes, that
s3:// run directories work, and that bad input is one clear error with nothing written."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests.fixtures.cli import assert_user_error, run_cli

RECORDED = Path(__file__).parent / "data" / "recorded_run"
sys.path.insert(0, str(RECORDED.parent))
from make_recorded_run import make_run  # noqa: E402
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]
IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')

# Injected into a copy of the page: after load, record which <img> did not decode.
CHECK_IMAGES = """<script>window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute('data-images', String(document.images.length));
  document.body.setAttribute('data-broken', JSON.stringify(bad));
});</script>"""


def copy_run(tmp_path, name="run") -> Path:
    dest = tmp_path / name
    shutil.copytree(RECORDED, dest, ignore=shutil.ignore_patterns("report.html"))
    return dest


def make_starving(tmp_path, name="starving") -> Path:
    return Path(make_run(str(tmp_path / name), starving=True))


def make_healthy(tmp_path, name="healthy") -> Path:
    return Path(make_run(str(tmp_path / name)))


def chromium(tmp_path, *args, timeout=60) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), "chromium missing: run infra/test-deps.sh"
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def assert_renders(tmp_path, page: Path, browser: bool = True) -> None:
    """Not blank in a screenshot, every <img> decoded by the browser and by Pillow."""
    text = page.read_text()
    images = IMG_RE.findall(text)
    assert len(images) == text.count("<img"), "an <img> that is not an inline PNG"
    for alt, data in images:
        im = Image.open(io.BytesIO(base64.b64decode(data)))
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100, alt
        assert ImageStat.Stat(im.convert("L")).stddev[0] > 5, f"{alt}: a blank plot"
    # no network fetches: nothing loads from http(s)
    assert not re.search(r'(src|href)="https?:', text) and "url(http" not in text
    if not browser:
        return

    shot = tmp_path / f"{page.stem}.png"
    proc = chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), proc.stderr[-2000:]
    gray = Image.open(shot).convert("L")
    stat = ImageStat.Stat(gray)
    assert stat.stddev[0] > 20, f"screenshot looks blank (stddev {stat.stddev[0]:.1f})"
    inked = sum(gray.histogram()[:200]) / (gray.width * gray.height)
    assert inked > 0.01, f"only {inked:.2%} of the screenshot is drawn"

    probe = tmp_path / f"{page.stem}-probe.html"
    probe.write_text(text.replace("</body>", CHECK_IMAGES + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    count = re.search(r'data-images="(\d+)"', dom)
    broken = re.search(r'data-broken="([^"]*)"', dom)
    assert count and broken, dom[:500]
    assert int(count.group(1)) == len(images) > 0
    assert json.loads(broken.group(1).replace("&quot;", '"')) == []


def test_report_of_recorded_run_has_every_section_and_renders(tmp_path):
    run = copy_run(tmp_path)
    proc = run_cli("report", run)
    assert proc.returncode == 0, proc.stderr
    page = run / "report.html"
    assert proc.stdout.strip() == str(page)
    text = page.read_text()
    assert "alarms" in text[:text.index("Summary per task")]  # the alarm box comes first
    for section in ("Summary per task", "Task metrics", "Losses",
                    "Task weights and log-variances", "Gradients on the shared encoder",
                    "Best-epoch predictions", "Throughput", "Resolved config", "relativity12"):
        assert section in text, section
    alts = [alt for alt, _ in IMG_RE.findall(text)]
    assert alts == ["per-task loss curves", "task weights", "gradient norms and shares",
                    "task metric curves", "span probability histogram",
                    "val windows with expansions", "throughput and epoch times"]
    assert_renders(tmp_path, page)


def test_alarms_are_at_the_top_of_a_starving_runs_report(tmp_path):
    run = make_starving(tmp_path)
    proc = run_cli("report", run, "--out", tmp_path / "elsewhere.html")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "elsewhere.html").read_text()
    assert not (run / "report.html").exists()
    alarms_at = text.index("Balance alarms")
    assert alarms_at < text.index("Summary per task") < text.index("<img")
    assert "countdown is starving" in text and "plateau" in text
    from pipeline.report.html import write_report  # in-process: one CLI start less
    text = Path(write_report(str(make_healthy(tmp_path)))).read_text()
    assert "No balance alarms" in text and 'class="alarms"' not in text


def test_report_says_how_many_steps_ran_from_a_cuda_graph(tmp_path):
    from pipeline.report.html import write_report  # in-process: one CLI start less
    run = copy_run(tmp_path)
    assert "CUDA graphs" not in Path(write_report(str(run))).read_text()  # an eager run
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) | {"graphed_steps": 4} for line in lines]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = Path(write_report(str(run))).read_text()
    assert (f"CUDA graphs: {4 * len(records)} of the {records[-1]['step']} training steps"
            in text)


def test_report_says_what_is_missing(tmp_path):
    run = copy_run(tmp_path)
    (run / "best_val_predictions.npz").unlink()
    (run / "manifest.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    stripped = []
    for line in lines:
        r = json.loads(line)
        for key in ("grad_norm", "grad_share", "log_vars", "span", "samples_per_s"):
            r.pop(key, None)
        stripped.append(json.dumps(r))
    (run / "metrics.jsonl").write_text("\n".join(stripped) + "\n")
    proc = run_cli("report", run)
    assert proc.returncode == 0, proc.stderr
    text = (run / "report.html").read_text()
    assert "Not in this run" in text
    assert "best_val_predictions.npz" in text and "manifest.json" in text
    assert re.search(r"record keys absent: [^<]*grad_norm", text)
    assert "No data for: gradient norms and shares" in text
    assert_renders(tmp_path, run / "report.html", browser=False)


def test_a_half_written_last_line_of_a_live_run_is_left_out_and_said(tmp_path):
    from pipeline.report.html import write_report

    run = copy_run(tmp_path)
    n = len((run / "metrics.jsonl").read_text().splitlines())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 8, "train": {"ty')  # no newline: the writer is mid-line
    text = Path(write_report(str(run))).read_text()
    assert f"{n} epochs recorded" in text
    assert "last line is incomplete" in text


def test_a_nan_loss_is_an_alarm_and_the_report_still_draws(tmp_path):
    from pipeline.report.html import write_report

    run = copy_run(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    last["train"]["span"] = float("nan")
    lines[-1] = json.dumps(last)  # json writes NaN, as the trainer's json.dumps would
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = Path(write_report(str(run))).read_text()
    assert "nonfinite" in text and "span: train loss is nan" in text
    assert_renders(tmp_path, run / "report.html", browser=False)


def test_no_credential_reaches_the_report(tmp_path, monkeypatch):
    run = copy_run(tmp_path)
    with open(run / "config.yaml", "a") as f:  # as if a secret had slipped into the file
        f.write("env:\n  AWS_SECRET_ACCESS_KEY: s3cr3t-value-123\n"
                "address_note: http://user:hunter2pass@head:8265\n")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-456")
    from pipeline.report.html import write_report
    text = Path(write_report(str(run))).read_text()
    assert "AWS_SECRET_ACCESS_KEY" in text  # the key is shown, masked
    for secret in ("s3cr3t-value-123", "hunter2pass", "env-secret-456"):
        assert secret not in text


def test_compare_puts_runs_side_by_side_and_renders(tmp_path):
    healthy, starving = copy_run(tmp_path, "healthy"), make_starving(tmp_path)
    out = tmp_path / "cmp.html"
    proc = run_cli("compare", healthy, starving, "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "1. healthy (uncertainty)" in text and "2. starving (uncertainty)" in text
    assert "Final and best metrics" in text and "val loss countdown" in text
    assert re.search(r"starving countdown \(epoch \d+\)", text)
    assert len(IMG_RE.findall(text)) == 3
    assert_renders(tmp_path, out)


@pytest.mark.slow
def test_fresh_training_run_ends_with_report_tensorboard_and_epoch_lines(tmp_path):
    """The epoch hook and the end-of-run report wired into a real (local-mode) training run."""
    import itertools

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.data.shards import random_chunks, write_shard_set

    shards = str(tmp_path / "shards")
    write_shard_set(shards, [f"f{i}" for i in range(12)], itertools.chain(
        random_chunks(24, split="train", seed=0), random_chunks(8, split="val", seed=1)))
    (tmp_path / "run.yaml").write_text("model:\n  hidden: 16\n  head_width: 16\n"
                                       "train:\n  probe_every: 1\n")
    out = tmp_path / "run"
    proc = run_cli("train", "--workers", "0", "--data", shards, "--out", out, "--config",
                   tmp_path / "run.yaml", "--epochs", "3", "--batch-size", "8", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    for epoch in (1, 2, 3):  # counted from 1, out of the 3 asked for
        assert re.search(rf"^epoch {epoch}/3 \| train type \S+ ptr \S+ span \S+ cd \S+ \| val ",
                         logs, re.M), logs[-3000:]
    assert str(out / "report.html") in logs
    assert_renders(tmp_path, out / "report.html")
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/span")] == [0, 1, 2]
    assert {"weights/countdown", "grad_share/pointer", "span/f1"} <= set(acc.Tags()["scalars"])


def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path):
    assert_user_error(run_cli("report", tmp_path / "nope"), "nope", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli("report", empty), "no metrics.jsonl")
    run = copy_run(tmp_path)
    bad_line = len((run / "metrics.jsonl").read_text().splitlines()) + 1
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 99, "train": \n{"epoch": 100}\n')
    proc = run_cli("report", run)
    assert_user_error(proc, f"metrics.jsonl line {bad_line}", "not valid JSON")
    assert not (run / "report.html").exists()
    good = copy_run(tmp_path, "good")
    proc = run_cli("compare", good, run, "--out", tmp_path / "c.html")
    assert_user_error(proc, f"line {bad_line}")
    assert not (tmp_path / "c.html").exists()
    (good / "best_val_predictions.npz").write_bytes(b"not a zip")
    assert_user_error(run_cli("report", good), "best_val_predictions.npz", "cannot be read")
    assert_user_error(run_cli("compare"), "RUN")


@pytest.mark.s3
def test_report_and_compare_of_an_s3_run_directory(tmp_path, s3_bucket, monkeypatch):
    client = s3_bucket.server.boto3_client()
    for path in RECORDED.iterdir():
        if path.name != "report.html":
            client.upload_file(str(path), s3_bucket.name, f"runs/a/{path.name}")
    uri = f"{s3_bucket.uri}/runs/a"
    proc = run_cli("report", uri, env=s3_bucket.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{uri}/report.html"
    assert "runs/a/report.html" in s3_bucket.keys()
    body = client.get_object(Bucket=s3_bucket.name, Key="runs/a/report.html")["Body"].read()
    assert b"Summary per task" in body and body.count(b"data:image/png;base64,") == 7
    s3_bucket.use(monkeypatch)  # compare in-process: one CLI start less
    from pipeline.report.compare import write_comparison
    write_comparison([uri, str(RECORDED)], f"{s3_bucket.uri}/cmp.html")
    assert "cmp.html" in s3_bucket.keys()


def test_report_counts_epochs_from_1_and_pluralises(tmp_path):
    from pipeline.report.html import render_report
    from pipeline.report.run import load_run

    run = copy_run(tmp_path)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 7 and records[-1]["best_epoch"] == 7  # the records: from 0
    text = render_report(load_run(str(run)))
    assert "8 epochs recorded" in text and "best epoch 8 &middot;" in text
    assert "final (epoch 8)" in text and "at best epoch (8)" in text
    assert "(epoch 0)" not in text and "final (epoch 7)" not in text
    logged = json.loads((run / "alarms.jsonl").read_text().splitlines()[0])
    assert logged["epoch"] == 0  # the alarm table shows it as the first epoch
    assert '<tr><td class="l">1</td><td class="l">starving</td><td class="l">pointer</td>' in text
    (run / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert "1 epoch recorded" in render_report(load_run(str(run)))


def test_report_and_compare_have_no_empty_header_row(tmp_path):
    from pipeline.report.compare import render_comparison
    from pipeline.report.html import render_report
    from pipeline.report.run import load_run

    runs = [load_run(str(copy_run(tmp_path, "a"))), load_run(str(make_starving(tmp_path)))]
    empty_header = re.compile(r"<tr>(?:<th[^>]*></th>)+</tr>")
    for text in (render_report(runs[0]), render_comparison(runs)):
        assert text.count("<table>") > 1
        assert not empty_header.search(text)
    assert "<table><tr><td class=\"l\">feature set</td>" in render_report(runs[0])


def test_compare_bolds_the_best_run_in_every_row_including_per_task_losses(tmp_path):
    from pipeline.report.compare import render_comparison
    from pipeline.report.run import load_run

    runs = [load_run(str(make_healthy(tmp_path))), load_run(str(make_starving(tmp_path)))]
    text = render_comparison(runs)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td class=\"l\">([^<]*)</td>.*?</tr>", text)}
    for task in ("type", "pointer", "span", "countdown"):
        row = rows[f"val loss {task}"]
        best = [min(v for v in (r.records[i]["val"][task] for i in range(len(r.records))))
                for r in runs]
        winners = [i for i, b in enumerate(best) if b == min(best)]  # a tie bolds both
        cells = re.findall(r"<td>(.*?)</td>", row)
        bold = [i for i, c in enumerate(cells) if c.startswith("<b>")]
        assert bold == [2 * w + 1 for w in winners], (task, row)  # the best runs' best cells
        assert re.search(r"\(ep \d+\)", row) and "(ep 0)" not in row  # epochs from 1


def test_plot_axes_count_whole_epochs_from_1(tmp_path, monkeypatch):
    from pipeline.report import plots
    from pipeline.report.run import load_run

    figures = []
    real_to_png = plots.to_png
    monkeypatch.setattr(plots, "to_png", lambda fig: figures.append(fig) or real_to_png(fig))
    run = load_run(str(copy_run(tmp_path)))
    records = run.records[:3]  # a short run: matplotlib would tick 0.25, 0.5, ...
    plots.loss_curves(records, run.epochs[:3], run.tasks, best_epoch=1)
    plots.overlay_curves([run], [("val.span", "val loss: span")])
    assert len(figures) == 2
    for fig in figures:
        ax = fig.axes[0]
        fig.canvas.draw()
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert list(ax.get_lines()[0].get_xdata())[:3] == [1, 2, 3]
    best = [line for line in figures[0].axes[0].get_lines() if line.get_label() == "best epoch"]
    assert list(best[0].get_xdata()) == [2, 2]  # record epoch 1 is the second epoch
