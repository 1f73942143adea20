"""Fault tolerance on the session's real Ray cluster: a worker killed mid-epoch is restarted by
Ray from the last checkpoint, and a run whose driver was killed continues with `--resume`; both
end with exactly the parameters of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.train.checkpoint import read_meta, read_state
from pipeline.train.rundir import checkpoint_dirs, read_metrics
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.ray_cluster import _get_head
from tests.test_train_local import make_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = "model:\n  hidden: 16\n  head_width: 16\ntrain:\n  probe_every: 4\n  keep_checkpoints: 50\n"
EPOCHS, BATCH, N_TRAIN, EVERY = 3, 8, 192, 4   # 24 steps per epoch, a checkpoint every 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _ray_heads):
    head = _get_head(_ray_heads, "plain")
    base = tmp_path_factory.mktemp("resume")
    shards = make_shards(base / "shards", n_train=N_TRAIN, n_val=16)
    cfg = base / "run.yaml"
    cfg.write_text(CONFIG)
    args = ["train", "--address", head.address, "--workers", "2", "--data", shards,
            "--config", cfg, "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--checkpoint-every", str(EVERY), "--seed", "7"]
    full = base / "full"
    proc = run_cli(*args, "--out", full, env=head.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return head, base, args, full


def start(args, out, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args), "--out",
                             str(out)], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_mid_epoch_checkpoint(out, proc, min_step: int, timeout=240) -> str:
    """The name of the first checkpoint taken inside an epoch at or after `min_step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name in checkpoint_dirs(str(out)):
            step = int(name.rsplit("_s", 1)[1])
            if step >= min_step and step % (N_TRAIN // BATCH) and \
                    os.path.exists(out / name / "meta.json"):
                return name
        assert proc.poll() is None, f"run ended before a checkpoint: {proc.stdout.read()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared")


def worker_pid(out, rank: int) -> int:
    return json.loads((out / "workers" / f"rank{rank}.json").read_text())["pid"]


def assert_same_run(out, full):
    got, want = read_metrics(str(out)), read_metrics(str(full))
    assert [r["epoch"] for r in got] == list(range(EPOCHS))   # one record per epoch
    for a, b in zip(got, want):
        assert a["step"] == b["step"]
        assert a["train"] == pytest.approx(b["train"], rel=1e-9)
        assert a["val"] == pytest.approx(b["val"], rel=1e-9)
    pa = read_state(str(out / checkpoint_dirs(str(out))[-1]))
    pb = read_state(str(full / checkpoint_dirs(str(full))[-1]))
    assert pa["step"] == pb["step"] == EPOCHS * N_TRAIN // BATCH
    for k in pb["model"]:
        assert torch.equal(pa["model"][k], pb["model"][k]), k
    for k in pb["multitask"]:  # the weighting's log-variances too
        assert torch.equal(pa["multitask"][k], pb["multitask"][k]), k


def test_worker_killed_mid_epoch_is_restarted_and_ends_exactly_like_uninterrupted(setup):
    head, base, args, full = setup
    out = base / "killed"
    proc = start([*args, "--max-failures", "1"], out, head.env())
    try:
        name = wait_for_mid_epoch_checkpoint(out, proc, min_step=EVERY * 2)
        victim = worker_pid(out, 1)
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert worker_pid(out, 1) != victim            # rank 1 runs in a new process
    assert read_meta(str(out / name))["loader"]["batches_consumed"] > 0
    assert_same_run(out, full)


def test_resume_of_a_stopped_run_continues_at_the_right_epoch_and_batch(setup):
    head, base, args, full = setup
    out = base / "stopped"
    proc = start(args, out, head.env())
    try:
        wait_for_mid_epoch_checkpoint(out, proc, min_step=(N_TRAIN // BATCH) + EVERY)
        proc.kill()  # the driver dies: the job and its workers go with it
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.time() + 60  # wait until the old workers are gone before resuming
    while time.time() < deadline and any(_alive(worker_pid(out, r)) for r in (0, 1)):
        time.sleep(0.5)
    latest = checkpoint_dirs(str(out))[-1]
    meta = read_meta(str(out / latest))
    epoch, consumed = meta["loader"]["epoch"], meta["loader"]["batches_consumed"]
    assert epoch >= 1 or consumed > 0

    proc = run_cli("train", "--out", out, "--resume", env=head.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_run(out, full)
    # The resumed part started where the checkpoint was: its first new checkpoint is the next
    # one after `latest`, not a restart from step 0.
    names = checkpoint_dirs(str(out))
    assert names.index(latest) < len(names) - 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


# ---- what --resume and Ctrl-C say (issue: resume said nothing and could silently start over)

LOCAL = ["--workers", "0", "--epochs", "2", "--batch-size", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A finished 2-epoch local-mode run (6 steps per epoch) to copy and cut."""
    base = tmp_path_factory.mktemp("resume-local")
    shards = make_shards(base / "shards")
    cfg = base / "small.yaml"
    cfg.write_text(CONFIG)
    out = base / "run"
    proc = run_cli("train", "--data", shards, "--out", out, "--config", cfg, *LOCAL, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, shards, cfg, out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_resume_says_which_checkpoint_epoch_and_step_it_continues_from(local_run, tmp_path):
    _, _, _, done = local_run
    out = _copy(done, tmp_path / "cut")
    import shutil
    shutil.rmtree(out / "checkpoint_e0002_s00000012")  # the run stopped before its last one
    proc = run_cli("train", "--out", out, "--resume", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("--resume: continuing from checkpoint checkpoint_e0001_s00000006 (step 6) at "
            "epoch 2 of 2") in proc.stderr
    assert [r["epoch"] for r in read_metrics(str(out))] == [0, 1]


def test_resume_without_a_whole_checkpoint_says_it_starts_fresh(local_run, tmp_path):
    _, _, _, done = local_run
    out = _copy(done, tmp_path / "cut-short")
    for name in checkpoint_dirs(str(out)):  # every checkpoint cut short while it was written
        (out / name / "meta.json").unlink()
    proc = run_cli("train", "--out", out, "--resume", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--resume: {out} has no whole checkpoint" in proc.stderr
    assert "starting the run fresh from epoch 1 of 2" in proc.stderr
    assert [r["epoch"] for r in read_metrics(str(out))] == [0, 1]
    assert read_meta(str(out / checkpoint_dirs(str(out))[-1]))["step"] == 12


@pytest.mark.parametrize("ray_run", [False, True], ids=["local-mode", "ray-workers"])
def test_resume_of_a_finished_run_says_so_and_trains_nothing(local_run, setup, tmp_path, ray_run):
    head, _, _, full = setup
    out = _copy(full if ray_run else local_run[3], tmp_path / "finished")
    (out / "report.html").unlink()  # as when a stop cut the run short of writing it
    before = (out / "metrics.jsonl").read_text(), checkpoint_dirs(str(out))
    markers = {p.name: p.read_text() for p in (out / "workers").iterdir()}
    proc = run_cli("train", "--out", out, "--resume", env=head.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = EPOCHS if ray_run else 2
    assert f"--resume: the run in {out} is already finished ({epochs} epochs" in proc.stdout
    assert ((out / "metrics.jsonl").read_text(), checkpoint_dirs(str(out))) == before
    # no worker started (each writes its marker), and no Ray: nothing of Ray's in the output
    assert {p.name: p.read_text() for p in (out / "workers").iterdir()} == markers
    assert "Ray" not in proc.stdout + proc.stderr
    assert (out / "report.html").exists() and f"report: {out / 'report.html'}" in proc.stdout


def test_ctrl_c_says_how_to_continue(local_run, tmp_path):
    base, shards, cfg, _ = local_run
    out = tmp_path / "interrupted"
    proc = start(["train", "--data", shards, "--config", cfg, "--workers", "0", "--epochs", "500",
                  "--batch-size", "8"], out, {})
    try:
        deadline = time.time() + 120
        while not read_metrics(str(out)):  # the first epoch is done
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "aborted" not in output.splitlines()[-1]
    assert "training interrupted by Ctrl-C" in output
    assert f"continue with `moola-pipeline train --out {out} --resume`" in output.lower()
    assert "a --resume continues from checkpoint_e" in output
    assert (out / "report.html").exists()
