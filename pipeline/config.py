"""One typed run config: dataclasses, loaded from YAML and overridden by CLI flags.

`TrainConfig` drives every part of a training run (data, model, loss, optimisation, cluster), the
way torchtitan's single job config does. A YAML file gives any subset of the keys, CLI flags
override single dotted keys (`train.epochs`), and anything unknown or of the wrong type is a
`UserError` naming the key and where it came from: every such key of a file in one error, an
unknown one with a "did you mean" suggestion (difflib). The resolved config is written to
`OUT/config.yaml` through `redact()`, so a credential that slipped into a URI or an address never
reaches a file.

This module imports no torch and no Ray: the CLI loads and checks a config before paying for them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from pipeline.errors import UserError

TASKS = ("type", "pointer", "span", "countdown")


@dataclass
class ModelSection:
    """JadeCompact hyper-parameters; `pipeline.model.JadeConfig` adds n_features (from the data)."""
    hidden: int = 96
    num_layers: int = 1
    input_dropout: float = 0.3
    # PyTorch's LSTM dropout acts only between stacked layers, so it applies only when
    # num_layers > 1 (the original model silently ignored its 0.7 with one layer).
    recurrent_dropout: float = 0.7
    dense_dropout: float = 0.6
    num_classes: int = 3
    head_width: int = 64
    tasks: tuple[str, ...] = TASKS


@dataclass
class LossSection:
    """Per-task losses and the weighting between them; `pipeline.reducer.LossConfig` adds the checks."""
    countdown_scale: str = "unit"
    # auto: span negatives / positives of the train split (manifest label_counts); the old runs
    # got span F1 > 0 only with 13.1, and at 1.0 a head on 3-7% in-span bars stays at the base rate
    span_pos_weight: float | str = "auto"
    # auto: inverse class frequency of the train split (mean weight 1); null: unweighted
    type_class_weight: list[float] | str | None = "auto"
    pointer_delta: float = 0.08
    countdown_delta: float = 1.0
    weighting: str = "uncertainty"
    weighting_options: dict = field(default_factory=dict)


@dataclass
class TrainSection:
    epochs: int = 20
    batch_size: int = 32          # global: each of W workers takes batch_size / W
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Own AdamW rate for the log-variances (None: same as lr). At lr 1e-3 they move ~0.025 in
    # 25 steps, so short runs stay at their initial weights; bench/balance.py measured the
    # countdown falling 35-45% by epoch 5 on 3 of 3 seeds at 0.05, a 3-seed mean of -17.4% at lr
    # (the users' criterion is > 20%).
    weighting_lr: float | None = 0.05
    grad_clip: float = 1.0        # max global grad norm; 0 turns clipping off
    scheduler: str = "constant"   # "constant" or "cosine" (over epochs * steps per epoch)
    seed: int = 0
    checkpoint_every_steps: int = 0   # 0: only at the end of each epoch
    keep_checkpoints: int = 3         # newest is always kept, then the best by best_metric
    best_metric: str = "val_loss"     # a key of the metrics record; dotted for nested keys
    best_mode: str = "min"            # "min" or "max"
    early_stop_patience: int = 0      # epochs without improvement before stopping; 0 = never
    # Per-task gradient norms cost ~one extra backward per task; the record needs one reading
    # per epoch (its last batch). N > 0 also measures every N steps. `probe: false` turns the
    # diagnostics off (benchmarks): the record then has no grad_* figures and no starving alarm.
    probe: bool = True
    probe_every: int = 0
    # "bf16": the model's forward under bf16 autocast (meant for GPUs; losses, reducer and
    # optimiser state stay fp32). Not part of config_hash: a resume may switch it.
    precision: str = "fp32"
    # CUDA graphs (pipeline/train/step.py): "auto" captures the step on a single CUDA worker
    # (small batches are launch-bound: one launch per step instead of hundreds), "on" also under
    # DDP, "off" never. Full batches only; the last smaller batch and probe steps run eagerly.
    # YAML reads a bare on/off as true/false: both spellings are accepted.
    cuda_graphs: str | bool = "auto"


@dataclass
class ClusterSection:
    address: str | None = None    # None: start a local Ray; "auto" or HOST:PORT joins a cluster
    workers: int = 2              # 0 = Ray Train local mode (in-process)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    shared_fs: bool = False       # OUT is mounted at the same path on every node


@dataclass
class AlarmsSection:
    """Balance-alarm thresholds, the fields of `pipeline.report.alarms.AlarmConfig` (same defaults;
    a test keeps them equal). The log-variance clamp is not here: the alarm takes it from
    loss.weighting_options.clamp, the bound the weighting really applies."""
    starve_share: float = 0.05
    starve_checks: int = 3
    logvar_tolerance: float = 1e-3
    logvar_limit: float = 6.0
    logvar_epochs: int = 2
    plateau_epochs: int = 5
    plateau_min_delta: float = 0.01
    collapse_type_share: float = 0.95
    collapse_span_separation: float = 0.01
    collapse_after_epochs: int = 2
    collapse_pointer_bars: float = 1.0


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    run_id: str = ""              # unique per run; set when the run is created
    fold: int | None = None       # train on this cross-validation fold of the data (issue 13)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    alarms: AlarmsSection = field(default_factory=AlarmsSection)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def validate(self) -> "TrainConfig":
        """Checks across keys, all of them: one UserError lists every value to change, each
        naming its flag or key (a user fixing them one run at a time would pay a run each)."""
        problems: list[str] = []
        self._validate_run(problems.append)
        self._validate_sizes(problems.append)
        if len(problems) == 1:
            raise UserError(problems[0])
        if problems:
            raise UserError(f"{len(problems)} problems in the run config: " + "; ".join(problems))
        return self

    def _validate_run(self, bad) -> None:
        t, c, m = self.train, self.cluster, self.model
        if not self.data:
            bad("no data: pass --data URI (a shard directory with manifest.json)")
        if not self.out:
            bad("no output: pass --out URI (the run directory)")
        for flag, uri in (("--data", self.data), ("--out", self.out)):
            _check_uri(bad, flag, uri)
        if self.fold is not None and self.fold < 0:  # against the data's folds: check_fold
            bad(f"fold (--fold) must be >= 0 (a fold of the data's manifest), got {self.fold}")
        if t.seed < 0:
            bad(f"train.seed (--seed) must be >= 0, got {t.seed}")
        _positive(bad, "train.epochs (--epochs)", t.epochs)
        _positive(bad, "train.batch_size (--batch-size)", t.batch_size)
        _above_zero(bad, "train.lr (--lr)", t.lr)
        if c.workers < 0:
            bad(f"cluster.workers (--workers) must be >= 0, got {c.workers}")
        world = max(c.workers, 1)
        if t.batch_size % world:
            bad(f"--batch-size {t.batch_size} is the global batch and must be divisible by "
                f"--workers {c.workers}: use a multiple of {world}")
        if c.max_failures < 0:
            bad(f"cluster.max_failures (--max-failures) must be >= 0, got {c.max_failures}")
        if c.workers == 0 and c.max_failures:
            bad("--max-failures needs worker processes: local mode (--workers 0) "
                "cannot restart itself; use --workers 1 or more")
        if t.best_mode not in ("min", "max"):
            bad(f"train.best_mode must be 'min' or 'max', got {t.best_mode!r}")
        if t.precision not in ("fp32", "bf16"):
            bad(f"train.precision must be 'fp32' or 'bf16', got {t.precision!r}")
        if isinstance(t.cuda_graphs, bool):
            t.cuda_graphs = "on" if t.cuda_graphs else "off"
        if t.cuda_graphs not in ("auto", "on", "off"):
            bad(f"train.cuda_graphs must be 'auto', 'on' or 'off', got {t.cuda_graphs!r}")
        if t.cuda_graphs == "on" and c.workers and not c.gpus_per_worker:
            bad("train.cuda_graphs 'on' needs GPU workers: set cluster.gpus_per_worker "
                "(--gpus-per-worker) > 0, or use 'auto'")
        if t.scheduler not in ("constant", "cosine"):
            bad(f"train.scheduler must be 'constant' or 'cosine', got {t.scheduler!r}")
        for key in ("checkpoint_every_steps", "early_stop_patience", "grad_clip", "probe_every"):
            if getattr(t, key) < 0:
                bad(f"train.{key} must be >= 0, got {getattr(t, key)}")
        _positive(bad, "train.keep_checkpoints", t.keep_checkpoints)
        unknown = [x for x in m.tasks if x not in TASKS]
        if unknown or not m.tasks:
            bad(f"model.tasks {list(m.tasks)}: choose one or more of {list(TASKS)}")

    def _validate_sizes(self, bad) -> None:
        """Sizes, rates and probabilities: a zero or negative one fails deep inside torch or
        Ray otherwise, with a traceback instead of the key's name."""
        t, c, m, lo, a = self.train, self.cluster, self.model, self.loss, self.alarms
        for key in ("hidden", "num_layers", "head_width"):
            _positive(bad, f"model.{key}", getattr(m, key))
        if m.num_classes < 2:
            bad(f"model.num_classes must be >= 2, got {m.num_classes}")
        for key in ("input_dropout", "recurrent_dropout", "dense_dropout"):
            _fraction(bad, f"model.{key}", getattr(m, key))
        if lo.countdown_scale not in ("unit", "raw"):
            bad(f"loss.countdown_scale must be 'unit' or 'raw', got {lo.countdown_scale!r}")
        if lo.span_pos_weight != "auto":
            _above_zero(bad, "loss.span_pos_weight (a number or auto)", lo.span_pos_weight)
        for key in ("pointer_delta", "countdown_delta"):
            _above_zero(bad, f"loss.{key}", getattr(lo, key))
        w = lo.type_class_weight
        if isinstance(w, str) and w != "auto":
            bad(f"loss.type_class_weight must be auto, null or a list of weights, got {w!r}")
        elif isinstance(w, list) and (len(w) != m.num_classes or any(x < 0 for x in w)):
            bad(f"loss.type_class_weight needs {m.num_classes} weights >= 0 (model.num_classes), "
                f"got {w}")
        if t.weight_decay < 0:
            bad(f"train.weight_decay must be >= 0, got {t.weight_decay}")
        if t.weighting_lr is not None:
            _above_zero(bad, "train.weighting_lr", t.weighting_lr)
        if c.gpus_per_worker < 0:
            bad(f"cluster.gpus_per_worker (--gpus-per-worker) must be >= 0, "
                f"got {c.gpus_per_worker}")
        _above_zero(bad, "cluster.cpus_per_worker", c.cpus_per_worker)
        _fraction(bad, "alarms.starve_share", a.starve_share)
        for key in ("starve_checks", "logvar_epochs", "plateau_epochs"):
            _positive(bad, f"alarms.{key}", getattr(a, key))
        _above_zero(bad, "alarms.logvar_limit", a.logvar_limit)
        for key in ("logvar_tolerance", "plateau_min_delta"):
            if getattr(a, key) < 0:
                bad(f"alarms.{key} must be >= 0, got {getattr(a, key)}")


def check_resources(cfg: TrainConfig, cpus: float, gpus: float, where: str) -> None:
    """Refuse a run the machine or cluster cannot hold, before Ray starts workers that would
    wait for resources forever or crash. `where` says whose resources these are."""
    c = cfg.cluster
    need_cpus = c.workers * c.cpus_per_worker
    if need_cpus > cpus:
        raise UserError(f"--workers {c.workers} x cluster.cpus_per_worker {c.cpus_per_worker:g} "
                        f"needs {need_cpus:g} CPUs but {where} has {cpus:g}: use --workers "
                        f"{int(cpus // c.cpus_per_worker)} or fewer")
    need_gpus = max(c.workers, 1) * c.gpus_per_worker
    if need_gpus > gpus:
        have = "no GPU" if not gpus else f"{gpus:g} GPUs"
        raise UserError(f"--gpus-per-worker {c.gpus_per_worker:g} needs {need_gpus:g} GPUs but "
                        f"{where} has {have}: use --gpus-per-worker 0 (CPU) or a GPU machine")


def check_batch_fits(cfg: TrainConfig, splits: dict) -> None:
    """A global batch larger than the train split would be one short batch per epoch: almost
    certainly a wrong flag or the wrong data set."""
    n = splits.get("train") or 0
    if cfg.train.batch_size > n:
        raise UserError(f"--batch-size {cfg.train.batch_size} is larger than the train split of "
                        f"{cfg.data} ({n} windows): use a batch of at most {n}")


def _check_uri(bad, flag: str, uri: str) -> None:
    if uri.startswith("s3://"):
        bucket = uri[len("s3://"):].split("/", 1)[0]
        if not bucket:
            bad(f"{flag} {uri}: an S3 URI needs a bucket, like s3://my-bucket/prefix")


# Each check reports through `bad(message)`, so validate() can list every problem at once.
def _above_zero(bad, name: str, value) -> None:
    if isinstance(value, str) or not value > 0:
        bad(f"{name} must be > 0, got {value}")


def _fraction(bad, name: str, value) -> None:
    if not 0 <= value < 1:
        bad(f"{name} must be in [0, 1), got {value}")


def _positive(bad, name: str, value) -> None:
    if value < 1:
        bad(f"{name} must be >= 1, got {value}")


def _plain(obj):
    """Tuples to lists, recursively, so the dict is YAML/JSON friendly."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- building from dicts

def _type_ok(value, tp) -> tuple[bool, Any]:
    """(accepted, value converted to the field type) for the few types our config uses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return True, None
                continue
            ok, conv = _type_ok(value, arm)
            if ok:
                return True, conv
        return False, value
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return True, tuple(value)
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    if origin is list:  # list[float]: numbers only
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return True, [float(v) for v in value]
        return False, value
    raise TypeError(f"config field type {tp} not handled")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls, data: dict, where: str):
    """`cls` built from `data`; every unknown key and wrong type in `data` is reported at
    once, in one UserError naming `where` (a file, "command line"), with "did you mean"."""
    problems: list[str] = []
    built = _build_section(cls, data, "", problems)
    if problems:
        if len(problems) == 1:
            raise UserError(f"{where}: {problems[0]}")
        raise UserError(f"{where}: {len(problems)} problems: " + "; ".join(problems))
    return built


def _build_section(cls, data, prefix: str, problems: list[str]):
    """One section (or the top level); appends to `problems` and builds with what is valid."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'the config'} must be a mapping, "
                        f"got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            problems.append(f"unknown key {prefix}{name} ({_suggest(name, prefix, names)})")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build_section(tp, value, f"{prefix}{name}.", problems)
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            problems.append(f"{prefix}{name} must be {_type_name(tp)}, "
                            f"got {type(value).__name__} {value!r}")
        elif isinstance(conv, float) and not math.isfinite(conv):  # --lr nan, `lr: .inf`
            problems.append(f"{prefix}{name} must be a finite number, got {conv}")
        else:
            kwargs[name] = conv
    return cls(**kwargs)


def _dotted_keys(cls=None, prefix: str = "") -> list[str]:
    """Every leaf key of the config, dotted (`train.epochs`)."""
    out = []
    for f in dataclasses.fields(cls or TrainConfig):
        tp = typing.get_type_hints(cls or TrainConfig)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _dotted_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _suggest(name: str, prefix: str, names: list[str]) -> str:
    """"did you mean ..." from the same section, else the same key in another section (a
    top-level `epochs:` means `train.epochs`), else the section's keys."""
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    leaves = _dotted_keys()
    elsewhere = [k for k in leaves if k.rsplit(".", 1)[-1] == name]
    elsewhere = elsewhere or difflib.get_close_matches(str(name), leaves, n=1, cutoff=0.75)
    if elsewhere:
        return f"did you mean {elsewhere[0]}?"
    return f"known under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "weighting_options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _nest(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    from pipeline import storage
    text = storage.read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run config must be a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                base: dict | None = None) -> TrainConfig:
    """Defaults <- `base` (a saved config) <- YAML file <- CLI overrides (dotted keys; None = unset)."""
    merged: dict = dict(base or {})
    if base is not None:
        _build(TrainConfig, merged, "saved config")
    if path:
        from_file = read_yaml(path)
        _build(TrainConfig, from_file, path)  # names the file in errors
        merged = _merge(merged, from_file)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if flags:
        _build(TrainConfig, _nest(flags), "command line")
        merged = _merge(merged, _nest(flags))
    return _build(TrainConfig, merged, path or "config")


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False)


# Train keys that decide the optimisation: a resumed run may not change them.
OPTIMISATION_KEYS = ("batch_size", "lr", "weight_decay", "weighting_lr", "grad_clip", "scheduler",
                     "seed")


def config_hash(cfg: TrainConfig) -> str:
    """Hash of what decides the optimisation; epochs, cluster and stopping may change on resume."""
    d = cfg.to_dict()
    keep = {"model": d["model"], "loss": d["loss"],
            "train": {k: d["train"][k] for k in OPTIMISATION_KEYS}}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def resume_conflicts(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Dotted keys that may not change when a run is resumed."""
    a, b = saved.to_dict(), new.to_dict()
    keys = [f"model.{k}" for k in a["model"]] + [f"loss.{k}" for k in a["loss"]]
    keys += [f"train.{k}" for k in OPTIMISATION_KEYS]
    keys += ["data", "fold"]
    out = []
    for key in keys:
        sec, _, name = key.partition(".")
        va = a[sec][name] if name else a[sec]
        vb = b[sec][name] if name else b[sec]
        if va != vb:
            out.append(f"{key} ({va!r} -> {vb!r})")
    return out


# ---------------------------------------------------------------- secrets

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
              "RUNPOD_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
MASK = "***"
_SECRET_KEY = re.compile(r"(secret|token|password|passwd|api_?key|access_?key|credential)", re.I)


def _redact_str(text: str) -> str:
    # Any credential value from the environment, wherever it appears.
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, MASK)
    # user:password@ in URIs, and secret-looking query parameters (s3://b/p?secret_key=...).
    if "://" in text:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, MASK if _SECRET_KEY.search(k) else v) for k, v in pairs],
                              safe="*")
        text = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return text


def redact(obj: Any) -> Any:
    """A copy of a config dict (or any JSON-like value) with credentials masked."""
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "")
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _redact_str(obj)
    return obj
