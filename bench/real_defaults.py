"""Old loss defaults against the new ones on a realistic, imbalanced synthetic set (issue 12).

The data: `data synth --retracement-fraction 0.15 --expansion-median 2` (15% retracements, about
3% of bars in span, like the hourly and daily series where the span head stayed at the base rate
and the type head predicted one class), sharded with a test split. For each seed it trains
twice with the same flags, `--workers 0`:

- old: `loss.span_pos_weight: 1.0`, `loss.type_class_weight: null` (the defaults before);
- new: the defaults (`auto` for both: span negatives/positives and inverse class frequency of
  the train split);

then `evaluate`s both on test and prints span probability separation, span F1 and type balanced
accuracy with their 95% bootstrap intervals beside the best naive baseline's, and whether a
collapse alarm was raised. The same data for both arms of a seed; 3 seeds by default.

    .venv/bin/python bench/real_defaults.py              # ~4 min on 2 CPU cores
    .venv/bin/python bench/real_defaults.py --seeds 1 --epochs 6 --windows 300
    .venv/bin/python bench/real_defaults.py --arms defaults   # one change per arm, ~25 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "model:\n  hidden: 32\n  head_width: 32\n"
# --arms loss: the loss defaults, old against new (a smaller model, as in the first measurement).
# --arms defaults: every other default against one change to it, on the default model: what
# the README's "why each default is what it is" table is measured with.
ARM_SETS = {
    "loss": {"old": MODEL + "loss:\n  span_pos_weight: 1.0\n  type_class_weight: null\n",
             "new": MODEL},
    "defaults": {
        "default": "",
        "hidden32": "model:\n  hidden: 32\n  head_width: 32\n",
        "lr3e-3": "train:\n  lr: 0.003\n",
        "dropout_low": "model:\n  input_dropout: 0.1\n  dense_dropout: 0.3\n",
        "epochs40": "train:\n  epochs: 40\n",
    },
}
SHOWN = ("span.prob_separation", "span.f1", "type.balanced_accuracy")


def cli(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"moola-pipeline {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def one_seed(tmp: Path, seed: int, args) -> dict:
    data = tmp / f"s{seed}"
    cli("data", "synth", "--out", tmp / f"w{seed}", "--windows", args.windows, "--seed", seed,
        "--retracement-fraction", 0.15, "--expansion-median", 2)
    cli("data", "shard", "--in", tmp / f"w{seed}", "--out", data, "--test-fraction", 0.2)
    out = {}
    for arm, text in arms(args).items():
        cfg = tmp / f"{arm}.yaml"
        cfg.write_text(text)
        run = tmp / f"{arm}{seed}"
        epochs = () if "epochs:" in text else ("--epochs", args.epochs)
        cli("train", "--workers", 0, "--data", data, "--out", run, "--config", cfg, *epochs,
            "--batch-size", 32, "--seed", seed)
        cli("evaluate", run, "--bootstrap", args.bootstrap, "--seed", seed)
        result = json.loads((run / "eval" / "test.json").read_text())
        alarms = [json.loads(line) for line in (run / "alarms.jsonl").read_text().splitlines()
                  if line.strip()] if (run / "alarms.jsonl").exists() else []
        config = (run / "config.yaml").read_text()
        out[arm] = {"metrics": {k: result["metrics"][k] for k in SHOWN if k in result["metrics"]},
                    "collapsed": sorted({a["task"] for a in alarms if a["kind"] == "collapsed"}),
                    "loss_config": [line.strip() for line in config.splitlines()
                                    if "span_pos_weight" in line or "type_class_weight" in line
                                    or line.strip().startswith("- ")][:6]}
    return out


def arms(args) -> dict[str, str]:
    chosen = ARM_SETS[args.arms]
    return {k: v for k, v in chosen.items() if not args.only or k in args.only.split(",")}


def ci(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)  # train.epochs' default
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--arms", choices=sorted(ARM_SETS), default="loss",
                        help="loss: old against new loss defaults; defaults: the other "
                             "defaults against one change each")
    parser.add_argument("--only", help="comma-separated arms of the set to run (default: all)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="moola-defaults-") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            results[seed] = one_seed(Path(tmp), seed, args)
    print(f"{args.windows} windows (15% retracement, expansion median 2 bars), test 20%, "
          f"{args.epochs} epochs, batch 32, local mode; test metrics with 95% bootstrap CI")
    print(f"{'seed':>4} {'arm':<4} {'metric':<24} {'model':<26} {'best baseline':<36} "
          f"{'lift':<26} beats baseline CI")
    for seed, arms in results.items():
        for arm, r in arms.items():
            for metric, e in r["metrics"].items():
                best = e.get("best_baseline")
                base = e["baselines"].get(best) if best else None
                beats = base is not None and base.get("high") is not None and e["low"] > base["high"]
                print(f"{seed:>4} {arm:<4} {metric:<24} {ci(e):<26} {(best or '-') + ' ' + ci(base):<36} "
                      f"{ci(e.get('lift')):<26} {'yes' if beats else 'no'}")
            print(f"{seed:>4} {arm:<4} collapse alarms raised: "
                  f"{', '.join(r['collapsed']) or 'none'}; {' '.join(r['loss_config'])}")
    print("\nmean over seeds (model value; lift):")
    for arm in arms(args):
        for metric in SHOWN:
            vals = [results[s][arm]["metrics"][metric] for s in results
                    if metric in results[s][arm]["metrics"]]
            if vals:
                print(f"  {arm:<4} {metric:<24} {statistics.fmean(v['value'] for v in vals):.3f}; "
                      f"lift {statistics.fmean(v['lift']['value'] for v in vals if v.get('lift')):+.3f}")
    print(f"\nbench time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
