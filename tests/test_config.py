"""The run config: YAML + flags merge, typed errors naming the key, redaction of secrets."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import (TrainConfig, config_hash, load_config, redact, resume_conflicts,
                             to_yaml)
from pipeline.errors import UserError


def write(tmp_path, text: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_yaml_and_flags_merge(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  lr: 0.01\nmodel:\n  hidden: 32\n")
    cfg = load_config(path, {"train.epochs": 3, "train.seed": None, "data": "d", "out": "o"})
    assert cfg.train.epochs == 3          # flag beats file
    assert cfg.train.lr == 0.01           # file beats default
    assert cfg.train.seed == 0            # None flag = not given
    assert cfg.model.hidden == 32
    assert cfg.model.num_layers == 1      # default kept inside a partly given section
    assert isinstance(cfg.train.lr, float)


def test_int_accepted_for_float_and_tasks_become_tuple(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\nmodel:\n  tasks: [span, type]\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.tasks == ("span", "type")


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert "train.epoch" in err.value.message and "run.yaml" in err.value.message


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(UserError, match="unknown key optimiser"):
        load_config(write(tmp_path, "optimiser: {}\n"))


@pytest.mark.parametrize("text,key", [
    ("train:\n  epochs: three\n", "train.epochs"),
    ("train:\n  epochs: 2.5\n", "train.epochs"),
    ("train:\n  lr: true\n", "train.lr"),
    ("cluster:\n  workers: '2'\n", "cluster.workers"),
    ("model:\n  tasks: span\n", "model.tasks"),
    ("train: 5\n", "train"),
])
def test_wrong_type_names_key(tmp_path, text, key):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text))
    assert key in err.value.message


def test_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in err.value.message


def test_validate_batch_divisible_by_workers():
    cfg = load_config(None, {"data": "d", "out": "o", "train.batch_size": 10, "cluster.workers": 3})
    with pytest.raises(UserError) as err:
        cfg.validate()
    assert "--batch-size 10" in err.value.message and "--workers 3" in err.value.message
    load_config(None, {"data": "d", "out": "o", "train.batch_size": 12,
                       "cluster.workers": 3}).validate()
    load_config(None, {"data": "d", "out": "o", "train.batch_size": 7,
                       "cluster.workers": 0}).validate()


@pytest.mark.parametrize("override,needle", [
    ({"train.epochs": 0}, "--epochs"),
    ({"cluster.workers": -1}, "--workers"),
    ({"train.best_mode": "up"}, "best_mode"),
    ({"cluster.workers": 0, "cluster.max_failures": 2}, "--max-failures"),
    ({"model.tasks": ["span", "colour"]}, "model.tasks"),
])
def test_validate_errors(override, needle):
    cfg = load_config(None, {"data": "d", "out": "o", **override})
    with pytest.raises(UserError) as err:
        cfg.validate()
    assert needle in err.value.message


def test_redact_masks_env_secrets_uri_userinfo_and_secret_keys(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-abcdef")
    data = {
        "data": "s3://bucket/p?access_key=AKIA&secret_key=zzz&region=eu",
        "out": "s3://user:pw@host/bucket/x",
        "note": "key is sekrit-value-123 and tok-abcdef",
        "weighting_options": {"api_key": "k", "alpha": 1.5},
    }
    text = repr(redact(data))
    for secret in ("sekrit-value-123", "tok-abcdef", "zzz", "AKIA", ":pw@"):
        assert secret not in text
    out = redact(data)
    assert "region=eu" in out["data"] and out["weighting_options"]["alpha"] == 1.5
    assert out["out"].endswith("host/bucket/x")


def test_yaml_round_trip_and_hash(monkeypatch, tmp_path):
    cfg = load_config(None, {"data": "d", "out": "o", "train.epochs": 4})
    saved = yaml.safe_load(to_yaml(cfg))
    again = load_config(None, None, base=saved)
    assert again == cfg
    longer = load_config(None, {"train.epochs": 9}, base=saved)
    assert config_hash(longer) == config_hash(cfg)        # epochs may change on resume
    assert resume_conflicts(cfg, longer) == []
    other = load_config(None, {"train.lr": 0.5}, base=saved)
    assert config_hash(other) != config_hash(cfg)
    assert any(c.startswith("train.lr") for c in resume_conflicts(cfg, other))


def test_config_is_a_dataclass_tree():
    cfg = TrainConfig()
    assert cfg.to_dict()["model"]["tasks"] == ["type", "pointer", "span", "countdown"]
