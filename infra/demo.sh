#!/usr/bin/env bash
# `make demo`: 50 synthetic windows -> shards -> 5 epochs on 2 local Ray workers -> report.
# About a minute on 2 cores; the last line says where the report is.
set -euo pipefail
out=${1:-demo}
cli=${MOOLA_CLI:-.venv/bin/moola-pipeline}  # the tests run it with their interpreter
rm -rf "$out"
mkdir -p "$out"
$cli data synth --out "$out/windows" --windows 50 --seed 0
$cli data shard --in "$out/windows" --out "$out/shards"
$cli data inspect "$out/shards"
# Global batch 8 = 4 per worker; a local Ray instance is started and stopped by the command.
$cli train --data "$out/shards" --out "$out/run" --workers 2 --epochs 5 --batch-size 8 --seed 0
echo "report: $(cd "$out/run" && pwd)/report.html"
