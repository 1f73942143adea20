"""Errors that say what to do: the shard-directory check behind `train --data`, every mistake of a
run config in one error with "did you mean", and ingest problems named by file line.

The CLI side of the same cases is in test_bad_input_cli.py (one `error:` line, nothing written).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data import ingest
from pipeline.data import manifest
from pipeline.errors import UserError
from tests.fixtures.cli import assert_user_error, run_cli
from tests.test_ingest import bars_columns, write_csv


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A windows data set, the bar series and labels behind it, and its shards."""
    root = tmp_path_factory.mktemp("synth")
    proc = run_cli("data", "synth", "--out", root / "windows", "--windows", "12",
                   "--bars-out", root / "bars.csv")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("data", "shard", "--in", root / "windows", "--out", root / "shards")
    assert proc.returncode == 0, proc.stderr
    return root


def refused(uri, flag="--data") -> str:
    with pytest.raises(UserError) as err:
        manifest.check_shard_dir(str(uri), flag)
    return err.value.message


# ---- --data: what it is, and what to run instead -----------------------------------------------

def test_a_bars_csv_is_named_with_the_flag_and_the_build_command(synth):
    message = refused(synth / "bars.csv")
    assert message.startswith(f"--data {synth / 'bars.csv'}: a file, not a shard directory")
    assert f"moola-pipeline data build --source bars --in {synth / 'bars.csv'} --out SHARDS" in message
    assert "a file stands where a folder" not in message


def test_a_windows_data_set_says_shard_it_first_with_the_exact_command(synth):
    message = refused(synth / "windows")
    assert "a windows data set" in message and "shard it first" in message
    assert f"`moola-pipeline data shard --in {synth / 'windows'} --out SHARDS`" in message
    assert message.endswith("then use SHARDS as --data")
    # its windows.parquet given instead of the directory: the same command, on its directory
    message = refused(synth / "windows" / "windows.parquet")
    assert f"data shard --in {synth / 'windows'} --out SHARDS" in message


def test_a_parquet_file_manifest_missing_and_empty_paths_say_what_to_do(synth, tmp_path):
    moola = tmp_path / "train_latest.parquet"
    pq.write_table(pa.table({"x": [1]}), moola)
    assert "data build --source moola --in" in refused(moola)
    assert f"pass the directory that holds it, {synth / 'shards'}" in \
        refused(synth / "shards" / "manifest.json")
    assert "not found" in refused(tmp_path / "nope") and "data build" in refused(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "an empty directory" in refused(tmp_path / "empty")
    # without a flag (inspect, validate) the message names the path alone
    assert refused(synth / "windows", flag=None).startswith(f"{synth / 'windows'}: a windows")


def test_a_shard_set_passes_and_load_manifest_names_the_flag(synth):
    manifest.check_shard_dir(str(synth / "shards"), "--data")
    assert manifest.load_manifest(str(synth / "shards"), flag="--data")["splits"]
    with pytest.raises(UserError, match=r"^--data .*windows: a windows data set"):
        manifest.load_manifest(str(synth / "windows"), flag="--data")


def test_train_on_a_windows_data_set_is_one_error_naming_data_shard(synth, tmp_path):
    proc = run_cli("train", "--data", synth / "windows", "--out", tmp_path / "run", "--workers",
                   "0", "--epochs", "1")
    assert_user_error(proc, "shard it first", f"moola-pipeline data shard --in {synth / 'windows'}")
    assert not (tmp_path / "run").exists()


@pytest.mark.s3
def test_the_same_answers_for_s3_uris(s3_bucket, monkeypatch):
    uri = s3_bucket.uri
    proc = run_cli("data", "synth", "--out", f"{uri}/windows", "--windows", "6",
                   "--bars-out", f"{uri}/raw/bars.csv", env=s3_bucket.env)
    assert proc.returncode == 0, proc.stderr
    s3_bucket.use(monkeypatch)
    assert "data build --source bars --in" in refused(f"{uri}/raw/bars.csv")
    assert f"data shard --in {uri}/windows --out SHARDS" in refused(f"{uri}/windows")
    assert "not found, so no shard set here" in refused(f"{uri}/nothing-here")
    assert "not a complete shard set" in refused(f"{uri}/raw")  # a prefix with other objects


# ---- config: every mistake at once, with suggestions ------------------------------------------

def test_every_unknown_and_mistyped_key_of_a_file_is_in_one_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epoch: 3\n  lr: fast\n  batchsize: 8\nepochs: 4\nmodle:\n"
                    "  hidden: 3\ncluster: 5\nzzz: 1\n")
    with pytest.raises(UserError) as err:
        load_config(str(path))
    message = err.value.message
    assert message.startswith(f"{path}: 7 problems: ")
    for part in ("unknown key train.epoch (did you mean train.epochs?)",
                 "train.lr must be float, got str 'fast'",
                 "unknown key train.batchsize (did you mean train.batch_size?)",
                 "unknown key epochs (did you mean train.epochs?)",  # a key in the wrong section
                 "unknown key modle (did you mean model?)",
                 "cluster must be a mapping, got int",
                 "unknown key zzz (known under the top level: alarms, cluster, data"):
        assert part in message, part


def test_validate_lists_every_bad_value_at_once():
    cfg = load_config(None, {"data": "d", "out": "o", "train.epochs": 0, "train.lr": -1.0,
                             "model.dense_dropout": 1.5, "train.scheduler": "linear"})
    with pytest.raises(UserError) as err:
        cfg.validate()
    message = err.value.message
    assert message.startswith("4 problems in the run config: ")
    for needle in ("train.epochs (--epochs) must be >= 1, got 0", "train.lr (--lr) must be > 0",
                   "model.dense_dropout must be in [0, 1), got 1.5", "train.scheduler"):
        assert needle in message, needle
    one = load_config(None, {"data": "d", "out": "o", "train.epochs": 0})
    with pytest.raises(UserError, match=r"^train.epochs \(--epochs\) must be >= 1, got 0$"):
        one.validate()


# ---- ingest: file lines, as an editor counts them ---------------------------------------------

def test_a_bars_csv_problem_names_the_file_line_and_the_data_row(tmp_path):
    bars, _ = bars_columns(2)
    bars["open"][15] = "abc"
    path = write_csv(tmp_path / "bars.csv", bars)
    with pytest.raises(UserError) as err:
        ingest.read_bars(path)
    message = err.value.message
    assert "non-numeric open: line 17 (data row 15: 'abc')" in message
    assert "rows count from 0" not in message
    assert open(path).read().splitlines()[16].split(",")[1] == "abc"  # line 17 really holds it


def test_blank_lines_shift_the_file_line_not_the_data_row(tmp_path):
    bars, _ = bars_columns(2)
    bars["close"][3] = "nan"
    path = tmp_path / "bars.csv"
    lines = open(write_csv(path, bars)).read().splitlines()
    lines[2:2] = ["", ""]  # two blank lines before data row 1: pyarrow skips them
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        ingest.read_bars(str(path))
    assert "NaN or inf price: line 7 (data row 3)" in err.value.message
    assert path.read_text().splitlines()[6].endswith("nan")


def test_labels_csv_problems_name_lines_and_parquet_keeps_rows(tmp_path):
    bars, labels = bars_columns(3)
    labels["label"][1] = "sideways"
    labels["start"][2] = "99999999"
    proc = run_cli("data", "ingest", "--format", "bars", "--in", write_csv(tmp_path / "bars.csv", bars),
                   "--labels", write_csv(tmp_path / "labels.csv", labels), "--out", tmp_path / "out")
    assert_user_error(proc, "labels.csv: 2 problems", "line 3 (data row 1: 'sideways')",
                      "a start that is not in the bar series", "line 4 (data row 2: '99999999')")
    # a Parquet file has no lines: its rows are data rows, counted from 0, and it says so
    table = pa.table({k: pa.array(v) for k, v in bars.items()})
    close = table.column("close").to_pylist()
    close[5] = -1.0
    pq.write_table(table.set_column(table.schema.get_field_index("close"), "close",
                                    pa.array(close)), tmp_path / "bars.parquet")
    with pytest.raises(UserError) as err:
        ingest.read_bars(str(tmp_path / "bars.parquet"))
    assert "(rows count from 0)" in err.value.message and "row 5" in err.value.message
    assert "line" not in err.value.message


# ---- a failed job's own reason ----------------------------------------------------------------

def test_the_last_error_line_of_a_jobs_logs_is_its_reason():
    from pipeline.jobs import last_error_line, ray_reason

    logs = ("epoch 1/5 | train ...\n"
            "(RayTrainWorker pid=123) error: an early worker complaint\n"
            "Traceback (most recent call last):\n"
            "error: --data /d: a windows data set, not shards: shard it first\n"
            "2026-12-01 INFO something after\n")
    assert last_error_line(logs) == "--data /d: a windows data set, not shards: shard it first"
    assert last_error_line("(RayTrainWorker pid=9) error: from a worker\n") == "from a worker"
    assert last_error_line("all fine\nerrors: 0\n") is None
    assert ray_reason("Job entrypoint command failed with exit code 2, last available logs "
                      "(truncated to 20,000 chars):\nerror: x\n") == \
        "Job entrypoint command failed with exit code 2"
