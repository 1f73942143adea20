"""Balance alarms: the signs of a task that is not learning, from the metrics records alone.

The old runs found a starving task after twenty epochs by hand (countdown at 91% of the loss,
span F1 stuck at 0, pointer silenced). These checks read the per-epoch records and say so at
the epoch it becomes visible:

- starving: a task's gradient share on the shared encoder stayed below `starve_share` for
  `starve_checks` consecutive epochs (or the GradientProbe itself lists it as starving);
- log-variance at its bound: a learned s = log sigma^2 sat at the clamp from the run config
  (`loss.weighting_options.clamp`) for `logvar_epochs` epochs; without a clamp, |s| beyond
  `logvar_limit` (a weight of e^6 ~ 400x or 1/400x means that task owns or has left the loss);
- plateau: a task's val loss has not improved for `plateau_epochs` epochs while another task's
  has, i.e. the others are learning and this one is not;
- non-finite: NaN or inf in any train or val loss;
- collapsed: a head's val predictions do not depend on the input (the old runs' type head
  predicting one class, span head at the base rate, pointer at the window center): type gives
  one class to >= `collapse_type_share` of the val windows; span probability separation stays
  below `collapse_span_separation` once `collapse_after_epochs` epochs are done; the predicted
  pointer center and length vary by less than `collapse_pointer_bars` across windows.

`Alarm.epoch` counts from 0, like the records (alarms.jsonl is a machine record); the messages
count epochs from 1, like everything else a person reads.

`AlarmChecker` is incremental (the live sink feeds it one record per epoch); `replay()` runs it
over a whole run for the report. Both use the same code, so the report shows what the run printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from pipeline.report.run import epochs_text, number, shown_epoch


@dataclass
class AlarmConfig:
    starve_share: float = 0.05     # the GradientProbe's own default
    starve_checks: int = 3
    logvar_clamp: tuple[float, float] | None = None
    logvar_tolerance: float = 1e-3
    logvar_limit: float = 6.0
    logvar_epochs: int = 2
    plateau_epochs: int = 5
    plateau_min_delta: float = 0.01  # relative improvement that counts (1%: not noise)
    collapse_type_share: float = 0.95      # one class for at least this share of val windows
    collapse_span_separation: float = 0.01  # mean p in-span minus out-of-span below this ...
    collapse_after_epochs: int = 2          # ... once this many epochs are done
    collapse_pointer_bars: float = 1.0      # predicted center and length vary less (std, bars)

    @classmethod
    def from_run_config(cls, config: dict | None, **overrides) -> "AlarmConfig":
        """Thresholds from a resolved run config: the clamp of the weighting, the probe's
        starving threshold, and an optional `alarms:` mapping with any field above."""
        if hasattr(config, "to_dict"):  # a TrainConfig rather than its dict
            config = config.to_dict()
        config = config or {}
        values: dict = {}
        options = ((config.get("loss") or {}).get("weighting_options") or {})
        if options.get("clamp") is not None:
            values["logvar_clamp"] = tuple(float(c) for c in options["clamp"])
        extra = config.get("alarms") or (config.get("report") or {}).get("alarms") or {}
        names = {f.name for f in fields(cls)}
        values.update({k: v for k, v in extra.items() if k in names})
        values.update(overrides)
        return cls(**values)


@dataclass
class Alarm:
    kind: str      # starving | logvar_bound | plateau | nonfinite | collapsed
    task: str
    epoch: int
    message: str

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.task

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "kind": self.kind, "task": self.task, "message": self.message}


@dataclass
class AlarmChecker:
    config: AlarmConfig = field(default_factory=AlarmConfig)
    history: list[dict] = field(default_factory=list)
    _low_share: dict[str, int] = field(default_factory=dict)
    _at_bound: dict[str, int] = field(default_factory=dict)
    _best_val: dict[str, tuple[float, int]] = field(default_factory=dict)  # task -> (loss, epoch)

    def check(self, record: dict) -> list[Alarm]:
        """Add one epoch's record; return every alarm active at this epoch."""
        self.history.append(record)
        epoch = int(record.get("epoch", len(self.history) - 1))
        return (self._nonfinite(record, epoch) + self._collapsed(record, epoch)
                + self._starving(record, epoch) + self._logvar(record, epoch)
                + self._plateau(record, epoch))

    def _collapsed(self, record: dict, epoch: int) -> list[Alarm]:
        c, out, when = self.config, [], f"(epoch {shown_epoch(epoch)})"
        share = number((record.get("type") or {}).get("top_class_share"))
        if share is not None and share >= c.collapse_type_share:
            out.append(Alarm("collapsed", "type", epoch,
                             f"type collapsed: one class for {share:.0%} of val windows {when}; "
                             f"its predictions do not depend on the input (try "
                             f"loss.type_class_weight: auto)"))
        sep = number((record.get("span") or {}).get("prob_separation"))
        if sep is not None and sep < c.collapse_span_separation and epoch + 1 >= c.collapse_after_epochs:
            out.append(Alarm("collapsed", "span", epoch,
                             f"span collapsed: probability separation {sep:.3g} < "
                             f"{c.collapse_span_separation:g} {when}: in-span and other bars get "
                             f"the same probability (try loss.span_pos_weight: auto)"))
        pointer = record.get("pointer") or {}
        spread = [number(pointer.get(k)) for k in ("center_std_bars", "length_std_bars")]
        if all(v is not None for v in spread) and max(spread) < c.collapse_pointer_bars:
            out.append(Alarm("collapsed", "pointer", epoch,
                             f"pointer collapsed: predicted center and length vary by "
                             f"{max(spread):.2g} bars across val windows {when}: one answer for "
                             f"every window"))
        return out

    def _nonfinite(self, record: dict, epoch: int) -> list[Alarm]:
        out = []
        for split in ("train", "val"):
            for task, value in sorted((record.get(split) or {}).items()):
                v = number(value)
                if v is not None and not math.isfinite(v):
                    out.append(Alarm("nonfinite", task, epoch,
                                     f"{task}: {split} loss is {v} at epoch {shown_epoch(epoch)}"))
        return out

    def _starving(self, record: dict, epoch: int) -> list[Alarm]:
        c, out = self.config, []
        shares = record.get("grad_share") or {}
        for task, value in shares.items():
            share = number(value)
            if share is None:
                continue
            self._low_share[task] = self._low_share.get(task, 0) + 1 if share < c.starve_share else 0
        probe_says = set(record.get("starving") or [])
        for task in sorted(set(self._low_share) | probe_says):
            n = self._low_share.get(task, 0)
            if n >= c.starve_checks or task in probe_says:
                share = number(shares.get(task))
                figure = f"{share:.3g}" if share is not None else "n/a"
                how_long = (f"< {c.starve_share:g} for {epochs_text(n)}" if n >= c.starve_checks else
                            "below the gradient probe's threshold for its last checks")
                out.append(Alarm("starving", task, epoch,
                                 f"{task} is starving: gradient share on the shared encoder "
                                 f"{figure}, {how_long} (epoch {shown_epoch(epoch)}); its loss "
                                 f"barely moves the encoder"))
        return out

    def _logvar(self, record: dict, epoch: int) -> list[Alarm]:
        c, out = self.config, []
        for task, value in sorted((record.get("log_vars") or {}).items()):
            s = number(value)
            if s is None:
                continue
            if c.logvar_clamp is not None:
                lo, hi = c.logvar_clamp
                bound = lo if abs(s - lo) <= c.logvar_tolerance else \
                    hi if abs(s - hi) <= c.logvar_tolerance else None
                what = f"its clamp {bound:g}" if bound is not None else ""
            else:
                bound = s if abs(s) >= c.logvar_limit else None
                what = f"|s| >= {c.logvar_limit:g} (no clamp configured)"
            self._at_bound[task] = self._at_bound.get(task, 0) + 1 if bound is not None else 0
            if self._at_bound[task] >= c.logvar_epochs:
                out.append(Alarm("logvar_bound", task, epoch,
                                 f"{task}: log-variance s = {s:.3g} stuck at {what} for "
                                 f"{epochs_text(self._at_bound[task])} (weight exp(-s) = "
                                 f"{math.exp(-s):.3g})"))
        return out

    def _plateau(self, record: dict, epoch: int) -> list[Alarm]:
        c = self.config
        improved_at = {}
        for task, value in (record.get("val") or {}).items():
            v = number(value)
            if task == "total" or v is None or not math.isfinite(v):
                continue
            best = self._best_val.get(task)
            if best is None or v < best[0] - c.plateau_min_delta * abs(best[0]):
                self._best_val[task] = (v, epoch)
            improved_at[task] = self._best_val[task][1]
        out = []
        for task, last in sorted(improved_at.items()):
            stalled = epoch - last
            others = [t for t, e in improved_at.items() if t != task and epoch - e < c.plateau_epochs]
            if stalled >= c.plateau_epochs and others:
                out.append(Alarm("plateau", task, epoch,
                                 f"{task}: val loss has not improved for {epochs_text(stalled)} "
                                 f"(best {self._best_val[task][0]:.4g} at epoch "
                                 f"{shown_epoch(last)}) while "
                                 f"{', '.join(sorted(others))} improved"))
        return out


def replay(records: list[dict], config: AlarmConfig | None = None) -> list[tuple[Alarm, Alarm]]:
    """Every distinct alarm of a run as (first raised, latest state), in order of first raise.

    The latest state is the alarm at the last epoch it was active; the report marks whether it
    is still active at the end of the run."""
    checker = AlarmChecker(config or AlarmConfig())
    first: dict[tuple, Alarm] = {}
    latest: dict[tuple, Alarm] = {}
    for record in records:
        for alarm in checker.check(record):
            first.setdefault(alarm.key, alarm)
            latest[alarm.key] = alarm
    return [(first[k], latest[k]) for k in first]


def describe_thresholds(config: AlarmConfig) -> str:
    clamp = (f"clamp {list(config.logvar_clamp)}" if config.logvar_clamp
             else f"|s| >= {config.logvar_limit:g} (no clamp)")
    return (f"starving: share < {config.starve_share:g} for "
            f"{epochs_text(config.starve_checks)}; "
            f"log-variance: {clamp} for {epochs_text(config.logvar_epochs)}; plateau: "
            f"{epochs_text(config.plateau_epochs)} without val improvement while another task "
            f"improves; collapsed: one type class >= {config.collapse_type_share:.0%}, span "
            f"separation < {config.collapse_span_separation:g} from epoch "
            f"{config.collapse_after_epochs}, pointer spread < {config.collapse_pointer_bars:g} "
            f"bar; any NaN/inf loss")


__all__ = ["Alarm", "AlarmChecker", "AlarmConfig", "replay", "describe_thresholds"]
