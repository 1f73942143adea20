"""Bad input at every entry point: each case is one clear `error:` naming the flag, key or file,
a non-zero exit, no traceback, and nothing written (the out dir does not appear, the inputs are
unchanged). Every case fails before Ray starts: the train cases run local checks (config,
manifest, batch vs split, CPUs and GPUs of this machine) before `ray.init`.

The data validator's own catalogue is in test_bad_input_windows.py / test_bad_input_shards.py and
its property test in test_validation_property.py; this file covers the CLI and config surface.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest

from pipeline.config import AlarmsSection, TrainConfig, load_config
from pipeline.data.shards import random_chunks, write_shard_set
from pipeline.errors import UserError
from pipeline.report.alarms import AlarmConfig
from tests.fixtures.cli import assert_user_error, run_cli

N_TRAIN, N_VAL = 64, 8
TOO_MANY = len(os.sched_getaffinity(0)) + 1   # one worker more than this machine has CPUs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid inputs for every command: windows, shards, a run config, a plain file, a run dir."""
    root = tmp_path_factory.mktemp("inputs")
    shards = root / "shards"
    write_shard_set(str(shards), [f"f{i}" for i in range(12)], itertools.chain(
        random_chunks(N_TRAIN, split="train", seed=0), random_chunks(N_VAL, split="val", seed=1)))
    proc = run_cli("data", "synth", "--out", root / "windows", "--windows", "30",
                   "--bars-out", root / "bars" / "bars.csv")
    assert proc.returncode == 0, proc.stderr
    (root / "plain.txt").write_text("not a directory\n")
    return root


def snapshot(root) -> dict:
    """Every file under root with its size and mtime: 'nothing written' means this is equal."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


# (args, needles, yaml text for {yaml} or None). Placeholders: {windows} {bars} {shards} {file}
# (a plain file: "a path under a file" is unreadable even for root) {out} {yaml}.
TRAIN = ["train", "--data", "{shards}", "--out", "{out}", "--workers", "0", "--epochs", "1",
         "--batch-size", "8"]
SUBMIT = ["submit", "--address", "http://127.0.0.1:1", "--", "--data", "/d", "--out", "{out}"]
CASES = {
    # data synth / build / shard / ingest
    "synth-zero-windows": (["data", "synth", "--out", "{out}", "--windows", "0"], ["--windows"], None),
    "synth-negative-seed": (["data", "synth", "--out", "{out}", "--seed", "-1"], ["--seed"], None),
    "shard-negative-split-seed": (["data", "shard", "--in", "{windows}", "--out", "{out}",
                                   "--split-seed", "-1"], ["--split-seed"], None),
    "synth-out-under-a-file": (["data", "synth", "--out", "{file}/ds"], ["plain.txt/ds"], None),
    "synth-s3-no-bucket": (["data", "synth", "--out", "s3:///ds"], ["s3:///ds", "needs a bucket"], None),
    "synth-bars-out-kind": (["data", "synth", "--out", "{out}", "--bars-out", "{out}/b.txt"],
                            ["--bars-out"], None),
    "shard-val-fraction-above-1": (["data", "shard", "--in", "{windows}", "--out", "{out}",
                                    "--val-fraction", "1.5"], ["--val-fraction 1.5"], None),
    "shard-negative-fraction": (["data", "shard", "--in", "{windows}", "--out", "{out}",
                                 "--test-fraction", "-0.1"], ["--test-fraction -0.1"], None),
    "shard-fractions-sum-to-1": (["data", "shard", "--in", "{windows}", "--out", "{out}",
                                  "--val-fraction", "0.5", "--test-fraction", "0.5"],
                                 ["--val-fraction 0.5", "--test-fraction 0.5"], None),
    "shard-zero-rows-per-shard": (["data", "shard", "--in", "{windows}", "--out", "{out}",
                                   "--rows-per-shard", "0"], ["--rows-per-shard"], None),
    "shard-unknown-features": (["data", "shard", "--in", "{windows}", "--out", "{out}",
                                "--features", "relativity99"], ["--features", "relativity99"], None),
    "shard-unknown-split": (["data", "shard", "--in", "{windows}", "--out", "{out}",
                             "--split", "random"], ["--split"], None),
    "shard-in-is-a-file": (["data", "shard", "--in", "{file}", "--out", "{out}"], ["plain.txt"], None),
    "shard-in-under-a-file": (["data", "shard", "--in", "{file}/w", "--out", "{out}"],
                              ["plain.txt/w"], None),
    "shard-out-s3-no-bucket": (["data", "shard", "--in", "{windows}", "--out", "s3://"],
                               ["needs a bucket"], None),
    "build-negative-windows": (["data", "build", "--out", "{out}", "--windows", "-1"], ["--windows"], None),
    "build-stride-for-synth": (["data", "build", "--out", "{out}", "--stride", "5"], ["--stride"], None),
    "build-bars-without-in": (["data", "build", "--out", "{out}", "--source", "bars"], ["--in"], None),
    "ingest-unknown-format": (["data", "ingest", "--format", "csv", "--in", "{file}", "--out", "{out}"],
                              ["--format"], None),
    "ingest-directory-as-file": (["data", "ingest", "--format", "bars", "--in", "{windows}",
                                  "--out", "{out}"], ["windows"], None),
    "ingest-moola-with-labels": (["data", "ingest", "--format", "moola", "--in", "{file}",
                                  "--labels", "{file}", "--out", "{out}"], ["--labels"], None),
    "ingest-zero-stride": (["data", "ingest", "--format", "bars", "--in", "{bars}", "--stride", "0",
                            "--out", "{out}"], ["--stride 0"], None),
    "ingest-negative-stride": (["data", "build", "--source", "bars", "--in", "{bars}", "--stride",
                                "-5", "--out", "{out}"], ["--stride -5"], None),
    "ingest-labels-missing": (["data", "ingest", "--format", "bars", "--in", "{bars}", "--labels",
                               "{out}.csv", "--out", "{out}"], ["out.csv", "not found"], None),
    "validate-a-file": (["data", "validate", "{file}"], ["plain.txt"], None),
    "inspect-s3-no-bucket": (["data", "inspect", "s3:///shards"], ["needs a bucket"], None),
    # train: flags
    "train-zero-epochs": (TRAIN + ["--epochs", "0"], ["--epochs", "got 0"], None),
    "train-negative-batch": (TRAIN + ["--batch-size", "-2"], ["--batch-size", "got -2"], None),
    "train-zero-lr": (TRAIN + ["--lr", "0"], ["--lr"], None),
    "train-nan-lr": (TRAIN + ["--lr", "nan"], ["train.lr", "finite"], None),
    "train-negative-seed": (TRAIN + ["--seed", "-1"], ["--seed", "got -1"], None),
    "train-negative-workers": (TRAIN + ["--workers", "-1"], ["--workers", "got -1"], None),
    "train-batch-larger-than-split": (TRAIN + ["--batch-size", str(N_TRAIN + 8)],
                                      [f"--batch-size {N_TRAIN + 8}", f"({N_TRAIN} windows)"], None),
    "train-more-workers-than-cpus": (TRAIN + ["--workers", str(TOO_MANY), "--batch-size", str(TOO_MANY)],
                                     [f"--workers {TOO_MANY}", "CPUs", "this machine"], None),
    # more CPUs and GPUs than any test machine has
    "train-cpus-per-worker-above-cpus": (TRAIN + ["--workers", "2", "--config", "{yaml}"],
                                     ["--workers 2", "8192 CPUs", "this machine"],
                                     "cluster:\n  cpus_per_worker: 4096\n"),
    "train-gpu-without-gpu": (TRAIN + ["--gpus-per-worker", "64"], ["--gpus-per-worker 64", "GPU"], None),
    "train-unknown-balance": (TRAIN + ["--balance", "gradnorm2"], ["--balance", "gradnorm2"], None),
    "train-data-s3-no-bucket": (TRAIN + ["--data", "s3://"], ["--data s3://", "needs a bucket"], None),
    "train-out-s3-no-bucket": (TRAIN + ["--out", "s3:///runs"], ["--out s3:///runs", "needs a bucket"], None),
    "train-data-is-a-file": (TRAIN + ["--data", "{file}"], ["plain.txt"], None),
    # what a user following the README passes to --data by mistake, and the command to run
    "train-data-is-a-bars-csv": (TRAIN + ["--data", "{bars}"],
                                 ["bars.csv", "not a shard directory", "data build --source bars --in"],
                                 None),
    "train-data-is-a-windows-data-set": (TRAIN + ["--data", "{windows}"],
                                         ["windows", "shard it first", "moola-pipeline data shard --in"],
                                         None),
    "train-several-bad-flags": (TRAIN + ["--epochs", "0", "--lr", "-1"],
                                ["2 problems", "--epochs", "got 0", "--lr", "got -1.0"], None),
    "train-out-under-a-file": (TRAIN + ["--out", "{file}/run"], ["plain.txt/run"], None),
    "train-config-missing": (TRAIN + ["--config", "{out}.yaml"], [".yaml", "not found"], None),
    "train-config-is-a-directory": (TRAIN + ["--config", "{windows}"], ["windows"], None),
    "train-max-failures-local": (TRAIN + ["--max-failures", "1"], ["--max-failures"], None),
    # train: config file keys
    "config-unknown-key": (TRAIN + ["--config", "{yaml}"], ["train.epochz", "bad.yaml"], "train:\n  epochz: 3\n"),
    "config-unknown-section": (TRAIN + ["--config", "{yaml}"], ["optimizer", "bad.yaml"], "optimizer: {}\n"),
    "config-every-mistake-at-once": (TRAIN + ["--config", "{yaml}"],
                                     ["bad.yaml", "3 problems", "train.epoch (did you mean train.epochs?)",
                                      "modle (did you mean model?)", "train.lr must be float"],
                                     "train:\n  epoch: 3\n  lr: fast\nmodle: {}\n"),
    "config-wrong-type": (TRAIN + ["--config", "{yaml}"], ["train.lr", "float", "bad.yaml"],
                          "train:\n  lr: fast\n"),
    "config-bool-is-not-int": (TRAIN + ["--config", "{yaml}"], ["cluster.workers", "bad.yaml"],
                               "cluster:\n  workers: true\n"),
    "config-malformed-yaml": (TRAIN + ["--config", "{yaml}"], ["bad.yaml", "line 3"],
                              "train:\n  epochs: 2\n  lr: 0.1: fast\n"),
    "config-duplicate-key": (TRAIN + ["--config", "{yaml}"], ["bad.yaml", "line 3", "'epochs' given twice"],
                             "train:\n  epochs: 2\n  epochs: 5\n"),
    "config-infinite-float": (TRAIN + ["--config", "{yaml}"], ["bad.yaml", "loss.pointer_delta", "finite"],
                              "loss:\n  pointer_delta: .inf\n"),
    "config-not-a-mapping": (TRAIN + ["--config", "{yaml}"], ["bad.yaml", "mapping"], "- 1\n- 2\n"),
    "config-zero-hidden": (TRAIN + ["--config", "{yaml}"], ["model.hidden", "got 0"], "model:\n  hidden: 0\n"),
    "config-dropout-above-1": (TRAIN + ["--config", "{yaml}"], ["model.dense_dropout", "1.5"],
                               "model:\n  dense_dropout: 1.5\n"),
    "config-unknown-task": (TRAIN + ["--config", "{yaml}"], ["model.tasks", "volume"],
                            "model:\n  tasks: [span, volume]\n"),
    "config-zero-cpus-per-worker": (TRAIN + ["--config", "{yaml}"], ["cluster.cpus_per_worker"],
                                    "cluster:\n  cpus_per_worker: 0\n"),
    "config-countdown-scale": (TRAIN + ["--config", "{yaml}"], ["loss.countdown_scale", "log"],
                               "loss:\n  countdown_scale: log\n"),
    "config-alarm-wrong-type": (TRAIN + ["--config", "{yaml}"], ["alarms.starve_checks", "bad.yaml"],
                                "alarms:\n  starve_checks: often\n"),
    "config-alarm-unknown-key": (TRAIN + ["--config", "{yaml}"], ["alarms.starve", "bad.yaml"],
                                 "alarms:\n  starve: 0.1\n"),
    "config-alarm-share-above-1": (TRAIN + ["--config", "{yaml}"], ["alarms.starve_share", "2"],
                                   "alarms:\n  starve_share: 2\n"),
    # submit: the train arguments are checked before anything is sent (the address is dead)
    "submit-epochs-zero": (SUBMIT + ["--epochs", "0"], ["--epochs", "got 0"], None),
    "submit-unknown-train-flag": (SUBMIT + ["--epohcs", "2"], ["train arguments", "--epohcs"], None),
    "submit-batch-not-divisible": (SUBMIT + ["--workers", "3", "--batch-size", "16"],
                                   ["--batch-size 16", "--workers 3"], None),
    "submit-bad-config-key": (SUBMIT + ["--config", "{yaml}"], ["train.epochz", "bad.yaml"],
                              "train:\n  epochz: 3\n"),
    "submit-working-dir-is-a-file": (["submit", "--address", "http://127.0.0.1:1", "--working-dir",
                                      "{file}", "--", "--data", "/d", "--out", "{out}"],
                                     ["--working-dir"], None),
    # report, compare, storage, stack, runpod
    "report-missing-run": (["report", "{out}"], ["out", "not found"], None),
    "report-not-a-run": (["report", "{shards}"], ["shards", "metrics.jsonl"], None),
    "compare-missing-run": (["compare", "{out}", "--out", "{out}.html"], ["out", "not found"], None),
    "storage-check-s3-no-bucket": (["storage", "check", "s3://"], ["needs a bucket"], None),
    "storage-check-under-a-file": (["storage", "check", "{file}/x"], ["plain.txt/x"], None),
    "stack-zero-cpus": (["stack", "up", "--num-cpus", "0", "--dir", "{out}"], ["--num-cpus"], None),
    "runpod-zero-gpus": (["runpod", "up", "--gpus", "0", "--gpu-type", "X", "--dry-run"], ["--gpus"], None),
    "runpod-bad-volume": (["runpod", "up", "--gpus", "1", "--gpu-type", "X", "--volume", "v1:rel",
                           "--dry-run"], ["--volume"], None),
    "runpod-malformed-template": (["runpod", "up", "--gpus", "1", "--gpu-type", "X", "--template",
                                   "{yaml}", "--dry-run"], ["bad.yaml", "JSON"], '{"env": {\n'),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(name, inputs, tmp_path):
    args, needles, yaml_text = CASES[name]
    if yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text)
    places = {"windows": inputs / "windows", "bars": inputs / "bars" / "bars.csv", "shards": inputs / "shards", "file": inputs / "plain.txt",
              "out": tmp_path / "out", "yaml": tmp_path / "bad.yaml"}
    argv = [a.format(**places) for a in args]
    before_inputs, before_tmp = snapshot(inputs), snapshot(tmp_path)
    # RAY_ADDRESS set to a dead cluster: a case that reached ray.init would attach and fail
    proc = run_cli(*argv, env={"RAY_ADDRESS": "127.0.0.1:1", "RUNPOD_API_KEY": "rp-test-key",
                               "RAY_AUTH_TOKEN": "ray-test-token"}, timeout=120)
    assert_user_error(proc, *needles)
    errors = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, proc.stderr
    assert not (tmp_path / "out").exists(), f"{name} wrote {os.listdir(tmp_path / 'out')}"
    assert snapshot(inputs) == before_inputs
    assert snapshot(tmp_path) == before_tmp


def test_alarms_section_matches_the_alarm_checker():
    """`alarms:` has every AlarmConfig threshold (same defaults) except the clamp, which comes
    from the weighting it bounds."""
    ours = {f.name: f.default for f in dataclasses.fields(AlarmsSection)}
    theirs = {f.name: f.default for f in dataclasses.fields(AlarmConfig)}
    assert ours == {k: v for k, v in theirs.items() if k != "logvar_clamp"}


def test_alarms_in_the_run_config_reach_the_checker(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("alarms:\n  starve_share: 0.2\n  plateau_epochs: 2\n"
                    "loss:\n  weighting_options: {clamp: [-3, 3]}\n")
    cfg = load_config(str(path), {"data": "/d", "out": "/o"}).validate()
    assert isinstance(cfg, TrainConfig) and cfg.alarms.starve_share == 0.2
    alarm = AlarmConfig.from_run_config(cfg)
    assert alarm.starve_share == 0.2 and alarm.plateau_epochs == 2
    assert alarm.starve_checks == AlarmConfig().starve_checks
    assert alarm.logvar_clamp == (-3.0, 3.0)      # the weighting's clamp is not overridden
    # the saved config.yaml round-trips the section (resume reads it back)
    from pipeline.config import to_yaml
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(str(saved)).alarms == cfg.alarms
    with pytest.raises(UserError, match="alarms.plateau_epochs"):
        load_config(None, {"data": "/d", "out": "/o", "alarms.plateau_epochs": 0}).validate()


@pytest.mark.ray
def test_more_workers_than_the_cluster_has_is_refused_before_training(ray_cluster, inputs, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--address", ray_cluster.address, "--workers", "8", "--batch-size", "8",
                   "--epochs", "1", "--data", inputs / "shards", "--out", out,
                   env=ray_cluster.env(), timeout=180)
    assert_user_error(proc, "--workers 8", "8 CPUs", f"the cluster at --address {ray_cluster.address}",
                      "has 4")
    assert not out.exists()
