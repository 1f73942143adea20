#!/usr/bin/env bash
# The one prepared device check: on the GPU machine (no network), from the repo root,
#
#     bash bench/device_check.sh [BUDGET_S]          # default 540: ends within that many seconds
#
# through the device tool's `run` with carry [".whl"] (made here by bench/device_bundle.py) and
# a timeout_s a little above BUDGET_S. Steps, each under `timeout`, each logged to $OUT:
#   1. install .whl/*.whl into /tmp/site (pip --no-index --no-deps: nothing else is installed)
#      and put /tmp/site and the repo root on PYTHONPATH; a local Ray's raylet inherits the
#      driver's environment (ray/_private/services.py start_ray_process copies os.environ) and
#      starts its workers with it, so Ray's workers see both too;
#   2. env.txt: nvidia-smi, Python, torch, CUDA, cuDNN, NCCL, GPU, versions of the carried
#      wheels and of the image packages Ray needs, unmet requirements of the carried wheels, and
#      an import check (ray.train.torch, pipeline.cli, pipeline.train.loop);
#   3. smoke.txt: a tiny `data build`, then `python3 -m pipeline.cli train` with --workers 0 and
#      with --workers 1 --gpus-per-worker 1 (a local Ray, Ray Train V2, TorchTrainer), 1 epoch;
#   4. gpu_step.txt: bench/gpu_step.py with one Ray worker (local mode if only the --workers 0
#      smoke passed): on CUDA fp32 and bf16 at batches 32,256,2048,8192; on CPU --quick;
#   5. gpu_step_graphs_off.txt, if time is left: the same at batch 32 and 256 with --graphs off;
#   6. bench/gpu_ddp.py, only with 2 or more GPUs and time left;
# then summary.txt, also printed last. Exit 0 when steps 1-4 passed, else 1.
# Every process it starts carries DEVICE_CHECK_ID in its environment; between steps and at the
# end those processes (Ray's raylet, GCS and workers included) are ended, and no others.
# For a CPU rehearsal elsewhere: PYTHON, WHEELS (default .whl), SITE (default /tmp/site) and OUT
# (default /tmp/device-check-out) can be set; TMPDIR also moves Ray's session directory.
set -u -o pipefail

BUDGET=${1:-540}
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "usage: bash bench/device_check.sh [BUDGET_S]" >&2; exit 2; }
T0=$SECONDS
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/device-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
export PYTHONUNBUFFERED=1
export DEVICE_CHECK_ID="device-check-$$-$RANDOM$RANDOM"

SUMMARY=()
FAILED=0
left() { echo $((BUDGET - (SECONDS - T0))); }
note() { SUMMARY+=("$1"); echo "== $1 [$((SECONDS - T0)) s]"; }
fail() { FAILED=1; note "$1"; }
why() {  # a step's exit status in words
    case $1 in
        0) echo "ok" ;;
        124 | 137) echo "TIMED OUT" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}

reap() {  # end every process that carries this run's DEVICE_CHECK_ID (Ray's included)
    local p pids=()
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p == "$$" ]] && continue
        grep -qxzF "DEVICE_CHECK_ID=$DEVICE_CHECK_ID" "/proc/$p/environ" 2>/dev/null && pids+=("$p")
    done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        sleep 0.5
        kill -0 "${pids[@]}" 2>/dev/null || break
    done
    kill -KILL "${pids[@]}" 2>/dev/null
    echo "(ended ${#pids[@]} leftover process(es) of this check)"
}

finish() {
    reap
    rm -rf "$WORK"
    {
        echo "==== device check summary ($((SECONDS - T0)) s of $BUDGET s budget)"
        printf '  %s\n' "${SUMMARY[@]}"
        if ((FAILED)); then echo "RESULT: FAILED"; else echo "RESULT: ok"; fi
        echo "logs: $OUT"
    } | tee "$OUT/summary.txt"
    exit "$FAILED"
}

# A step: run "$@" under a timeout of $1 seconds (at most what is left less $RESERVE), output
# appended to the log $2, and its exit status in $RC.
RESERVE=20  # covers timeout -k 10 and reap after a step that ran to its limit
step() {
    local limit=$1 log=$2
    shift 2
    local room=$(($(left) - RESERVE))
    ((limit > room)) && limit=$room
    if ((limit < 5)); then
        RC=124
        echo "(no time left for: $*)" | tee -a "$log"
        return
    fi
    echo "\$ $* (timeout ${limit} s)" | tee -a "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    RC=${PIPESTATUS[0]}
    reap
}

# 1. install ---------------------------------------------------------------------------------
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if ((${#wheels[@]} == 0)); then
    fail "install: FAILED: no wheels in $WHEELS (run python3 bench/device_bundle.py on the dev machine and carry .whl)"
    finish
fi
if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "${wheels[@]}"; then
    fail "install: FAILED (pip install --target $SITE)"
    finish
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
note "install: ok, ${#wheels[@]} wheels into $SITE"

# 2. environment -----------------------------------------------------------------------------
{
    echo "# $(date -u +%FT%TZ) $(uname -srm)"
    if command -v nvidia-smi >/dev/null; then
        timeout 30 nvidia-smi
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found"
    fi
} >"$OUT/env.txt" 2>&1
BUNDLE="$WHEELS/BUNDLE.txt" timeout 120 "$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md
import os
import platform
import sys

print(f"python {sys.version.split()[0]} at {sys.executable}")
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "n/a"
    p = torch.cuda.get_device_properties(0)
    print(f"NCCL {nccl}; {torch.cuda.device_count()} GPU(s): {p.name}, {p.total_memory / 2**30:.1f} GiB, "
          f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("CUDA: not available (CPU rehearsal)")

carried = []
bundle = os.environ.get("BUNDLE", "")
if os.path.exists(bundle):
    carried = [l.split()[0] for l in open(bundle) if l.strip() and not l.startswith("#")]
image = ["numpy", "pyarrow", "pandas", "click", "rich", "pyyaml", "protobuf", "msgpack", "filelock",
         "fsspec", "packaging", "requests", "attrs", "typing-extensions", "aiohttp",
         "grpcio", "psutil", "matplotlib", "tensorboard", "prometheus-client", "cloudpickle"]
for title, names in (("carried", carried), ("image", image)):
    found = []
    for n in names:
        try:
            d = md.distribution(n)
            where = "site" if str(d.locate_file("")).startswith(os.environ["PYTHONPATH"].split(":")[0]) else "image"
            found.append(f"{n} {d.version}" + (f" ({where})" if title == "image" and where != "image" else ""))
        except md.PackageNotFoundError:
            found.append(f"{n} MISSING")
    print(f"{title}: " + ", ".join(found))

# The carried wheels were installed with --no-deps: check their requirements against what is here.
from packaging.requirements import Requirement
unmet = []
for n in carried:
    try:
        reqs = md.distribution(n).requires or []
    except md.PackageNotFoundError:
        unmet.append(f"{n}: not installed")
        continue
    extras = [""] + (["train"] if n.lower() == "ray" else [])
    for text in reqs:
        r = Requirement(text)
        if r.marker is not None and not any(r.marker.evaluate({"extra": e}) for e in extras):
            continue
        try:
            have = md.version(r.name)
        except md.PackageNotFoundError:
            unmet.append(f"{n} needs {r}: missing")
            continue
        if r.specifier and not r.specifier.contains(have, prereleases=True):
            unmet.append(f"{n} needs {r}: have {have}")
print("UNMET " + "; ".join(unmet) if unmet else "requirements of the carried wheels: all met")

import ray, ray.train, ray.train.torch  # noqa: E401
from ray.train.torch import TorchTrainer  # noqa: F401
import pipeline.cli, pipeline.train.loop, pipeline.train.trainer  # noqa: E401,F401
print(f"imports ok: ray {ray.__version__} from {os.path.dirname(ray.__file__)}; "
      f"pipeline from {os.path.dirname(pipeline.cli.__file__)}")
EOF
RC=$?
cat "$OUT/env.txt"
if ((RC != 0)); then
    fail "environment/imports: FAILED (exit $RC; see env.txt)"
    finish
fi
env_line=$(grep -m1 '^torch ' "$OUT/env.txt")
gpu_line=$(grep -m1 -E '^NCCL |^CUDA: not' "$OUT/env.txt")
smi=$(grep -m1 -A1 '^name, driver_version' "$OUT/env.txt" | tail -n +2)
note "environment: $env_line; $gpu_line${smi:+; nvidia-smi: $smi}"
grep -q '^UNMET ' "$OUT/env.txt" && note "WARNING: $(grep -m1 '^UNMET ' "$OUT/env.txt")"
CUDA=0
NGPU=0
if grep -q '^NCCL ' "$OUT/env.txt"; then
    CUDA=1
    NGPU=$(sed -n 's/^NCCL [^;]*; \([0-9]*\) GPU.*/\1/p' "$OUT/env.txt" | head -1)
fi

# 3. smoke: the CLI in local mode and with one Ray worker --------------------------------------
SMOKE="$OUT/smoke.txt"
: >"$SMOKE"
step 60 "$SMOKE" "$PY" -m pipeline.cli data build --out "$WORK/data" --windows 200
if ((RC != 0)); then
    fail "smoke data build: $(why $RC) (see smoke.txt)"
    finish
fi
SMOKE_OK=(1 1)
for workers in 0 1; do
    t=$SECONDS
    step 150 "$SMOKE" "$PY" -m pipeline.cli train --data "$WORK/data" --out "$WORK/run-w$workers" \
        --workers "$workers" --gpus-per-worker "$CUDA" --epochs 1 --batch-size 32
    SMOKE_OK[$workers]=$RC
    epochs=0
    [[ -f $WORK/run-w$workers/metrics.jsonl ]] && epochs=$(wc -l <"$WORK/run-w$workers/metrics.jsonl")
    label="smoke train --workers $workers --gpus-per-worker $CUDA"
    if ((RC == 0)); then
        note "$label: ok ($((SECONDS - t)) s, $epochs epoch record)"
    else
        fail "$label: $(why $RC) after $((SECONDS - t)) s (see smoke.txt)"
    fi
done

# 4. bench/gpu_step.py -----------------------------------------------------------------------
if ((CUDA)); then
    BENCH=(--batches 32,256,2048,8192)
else
    BENCH=(--quick)
fi
BENCH_WORKERS=1
if ((SMOKE_OK[1] != 0 && SMOKE_OK[0] == 0)); then
    BENCH_WORKERS=0
    note "gpu_step: using local mode (--workers 0): the one-worker smoke failed"
fi
if ((SMOKE_OK[0] != 0 && SMOKE_OK[1] != 0)); then
    fail "gpu_step: skipped: both smoke runs failed"
    finish
fi
: >"$OUT/gpu_step.txt"
t=$SECONDS
step 100000 "$OUT/gpu_step.txt" "$PY" bench/gpu_step.py "${BENCH[@]}" --workers "$BENCH_WORKERS"
rows=$(grep -cE '^ +[0-9]+ +(fp32|bf16) ' "$OUT/gpu_step.txt")
if ((RC == 0)); then
    note "gpu_step ${BENCH[*]} --workers $BENCH_WORKERS: ok ($((SECONDS - t)) s, $rows rows)"
else
    fail "gpu_step ${BENCH[*]} --workers $BENCH_WORKERS: $(why $RC) after $((SECONDS - t)) s, $rows rows (see gpu_step.txt)"
fi

# 5. --graphs off, if time is left --------------------------------------------------------------
if ((CUDA && RC == 0 && $(left) >= 150)); then
    : >"$OUT/gpu_step_graphs_off.txt"
    t=$SECONDS
    step 100000 "$OUT/gpu_step_graphs_off.txt" "$PY" bench/gpu_step.py --batches 32,256 \
        --graphs off --workers "$BENCH_WORKERS"
    note "gpu_step --batches 32,256 --graphs off: $(why $RC) after $((SECONDS - t)) s (optional)"
else
    note "gpu_step --graphs off: skipped ($(left) s left, CUDA $CUDA)"
fi

# 6. bench/gpu_ddp.py needs 2+ GPUs -------------------------------------------------------------
if ((NGPU >= 2 && $(left) >= 200)); then
    : >"$OUT/gpu_ddp.txt"
    step 100000 "$OUT/gpu_ddp.txt" "$PY" bench/gpu_ddp.py --gpus "$NGPU"
    note "gpu_ddp --gpus $NGPU: $(why $RC) (optional)"
else
    note "gpu_ddp: skipped ($NGPU GPU(s), $(left) s left)"
fi

finish
