#!/usr/bin/env bash
# `make demo`: synthetic 50-window data set -> shards -> (training, report once they exist).
set -euo pipefail
out=${1:-demo}
cli=.venv/bin/moola-pipeline
rm -rf "$out"
mkdir -p "$out"
$cli data synth --out "$out/windows" --windows 50 --seed 0
$cli data shard --in "$out/windows" --out "$out/shards"
$cli data inspect "$out/shards"
