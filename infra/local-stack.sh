#!/usr/bin/env bash
# The local development stack (SeaweedFS S3 + a token-auth Ray head, both on loopback).
#   eval "$(infra/local-stack.sh up)"    # start it; export its AWS_* / RAY_* variables
#   infra/local-stack.sh env             # print them again
#   infra/local-stack.sh down [--wipe]   # stop both (--wipe: also delete the S3 data)
# A thin wrapper over `moola-pipeline stack`, using the repo's venv when there is one.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cli="$here/.venv/bin/moola-pipeline"
[ -x "$cli" ] || cli=moola-pipeline
case "${1:-}" in
  up|down|env) exec "$cli" stack "$@" ;;
  *) echo "usage: $0 up|down|env [--dir DIR] [--num-cpus N] [--wipe]" >&2; exit 2 ;;
esac
