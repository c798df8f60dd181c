#!/usr/bin/env bash
# One GPU, one command, about 10 minutes on one H100/H200, from a fresh clone: the CUDA test cases, the trainer's
# throughput on two paper shapes (MFU, memory, phase-1/baseline step time, the loss path) and a short
# TST-vs-baseline compare in the time left. Every stage writes JSON under OUT with the GPU name, driver, torch and
# transformers versions; OUT/summary.json lists every stage as passed, failed, timed_out or skipped.
#
#   bash bench/gpu_check.sh                   # GPU: makes .venv if missing (CUDA torch + superpose[dev,bench])
#   bash bench/gpu_check.sh --cpu --out DIR   # rehearsal: every stage on the CPU at toy size, the installed .venv
#
# Exit status: 2 when no GPU is usable (one line says why), 1 when a stage failed or ran past its time limit, 0
# otherwise; a stage skipped because the budget is spent is reported in summary.json, not failed.
# Environment: VENV (the environment, default .venv), PYTHON (the interpreter that makes it, default python3), BUDGET
# (seconds for the stages after the install; default 540 on a GPU, 900 for the rehearsal). On a machine that already
# has CUDA PyTorch and no network, point VENV at that environment (e.g. VENV=/opt/torch/.venv): nothing is installed,
# superpose runs from src/, and a package it lacks is named before any stage starts (carry it as a wheel).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
OUT=bench/results/gpu
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        *) echo "gpu_check: error: unknown argument $1 (usage: gpu_check.sh [--cpu] [--out DIR])" >&2; exit 2 ;;
    esac
    shift
done
VENV=${VENV:-.venv}
PY=$VENV/bin/python

if [ "$MODE" = gpu ] && [ ! -x "$PY" ]; then  # a fresh clone: make the environment (an existing .venv is kept)
    echo "== install: $VENV with the CUDA build of torch, then superpose[dev,bench]"
    # plain `pip install torch` is the CUDA build on Linux x86_64 (README's torch==2.13.0 pins the CPU build)
    "${PYTHON:-python3}" -m venv "$VENV" && "$VENV/bin/pip" install torch && "$VENV/bin/pip" install -e '.[dev,bench]' \
        || { echo "gpu_check: error: install failed (remove $VENV and run again)" >&2; exit 2; }
fi
if [ "$MODE" = cpu ] && [ ! -x "$PY" ]; then
    echo "gpu_check: error: --cpu uses the installed $VENV and there is none (see README: set up)" >&2
    exit 2
fi
if [ "$MODE" = gpu ]; then
    "$PY" - <<'PY' || exit 2
import sys
import torch
why = None
if torch.version.cuda is None:
    why = f"torch {torch.__version__} is a CPU build: pip install --force-reinstall torch (the CUDA build) in it"
elif not torch.cuda.is_available():
    why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: no device, or a driver older than "
           f"CUDA {torch.version.cuda}")
else:
    try:
        (torch.ones(1, device="cuda") + 1).item()
    except RuntimeError as e:
        why = f"a CUDA operation fails on {torch.cuda.get_device_name()}: {str(e).splitlines()[0]}"
if why:
    print(f"gpu_check: error: no usable GPU: {why}", file=sys.stderr)
    sys.exit(2)
PY
fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's superpose, installed or not
"$PY" - <<'PY' || exit 2
import importlib.util
import sys
need = ["superpose", "torch", "transformers", "tokenizers", "datasets", "safetensors", "tomli_w", "numpy", "pyarrow",
        "tensorboard", "matplotlib", "pytest", "hypothesis", "tqdm"]
missing = [name for name in need if importlib.util.find_spec(name) is None]
if missing:
    print(f"gpu_check: error: {sys.executable} lacks {', '.join(missing)} (pip install -e '.[dev,bench]' there, or "
          f"carry wheels on a machine without a network)", file=sys.stderr)
    sys.exit(2)
PY

if [ "$MODE" = gpu ]; then
    BUDGET=${BUDGET:-540}
    DEVICE=(--device cuda)
    LLAMA=(--layers 0)
    MOE=(--layers 4)
    COMPARE=(--max-bytes 30000000)
    LIMIT_TESTS=180 LIMIT_THROUGHPUT=150
else  # toy shapes, nothing compiled (compiling on a 2-core CPU would take minutes); the same scripts and paths
    BUDGET=${BUDGET:-900}
    DEVICE=(--device cpu --toy --steps 2 --warmup 1 --set train.compile=false)
    LLAMA=(--layers 2)
    MOE=(--layers 2)
    COMPARE=(--toy --max-steps 20 --data "$OUT/data")
    LIMIT_TESTS=300 LIMIT_THROUGHPUT=300
fi
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
START=$SECONDS
status=0

# stage NAME MIN_S LIMIT_S FILE -- COMMAND...: run COMMAND for at most LIMIT_S (and the budget left), skip it when
# less than MIN_S of the budget is left; one line per stage in stages.tsv.
stage() {
    local name=$1 min=$2 limit=$3 file=$4; shift 5
    local left=$((BUDGET - (SECONDS - START))) t0=$SECONDS code
    if [ "$left" -lt "$min" ]; then
        echo "== $name: skipped (${left}s of the ${BUDGET}s budget left, needs ${min}s)"
        printf '%s\tskipped\t0\t\t%s\t%s\n' "$name" "${left}s of the ${BUDGET}s budget left, needs ${min}s" "$file" \
            >> "$OUT/stages.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s, $((SECONDS - START))s used)"
    timeout --kill-after=15 "$limit" "$@"
    code=$?
    local state=passed reason=
    if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then state=timed_out reason="killed after ${limit}s"
    elif [ "$code" -ne 0 ]; then state=failed reason="exit $code"; fi
    [ "$state" = passed ] || status=1
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$state" "$((SECONDS - t0))" "$code" "$reason" "$file" >> "$OUT/stages.tsv"
}

stage "CUDA test cases" 60 "$LIMIT_TESTS" tests.json -- "$PY" bench/gpu_check_report.py tests "$OUT" --mode "$MODE"
stage "throughput: llama-600m, bag 1 vs 4" 60 "$LIMIT_THROUGHPUT" throughput-llama-600m.json -- \
    "$PY" bench/gpu_throughput.py configs/llama-600m-8gpu.toml "${LLAMA[@]}" --bag 4 "${DEVICE[@]}" \
    --out "$OUT/throughput-llama-600m.json"
stage "throughput: qwen3-moe-10b-a1b, bag 1 vs 16" 60 "$LIMIT_THROUGHPUT" throughput-qwen3-moe-10b-a1b.json -- \
    "$PY" bench/gpu_throughput.py configs/qwen3-moe-10b-a1b-8gpu.toml "${MOE[@]}" --accumulation 2 "${DEVICE[@]}" \
    --out "$OUT/throughput-qwen3-moe-10b-a1b.json"
left=$((BUDGET - (SECONDS - START)))
stage "TST vs baseline compare" 90 "$left" compare/report.json -- \
    "$PY" bench/gpu_compare.py --budget "$((left - 15))" "${COMPARE[@]}" --out "$OUT/compare"

"$PY" bench/gpu_check_report.py summary "$OUT" --mode "$MODE" --budget "$BUDGET" --elapsed "$((SECONDS - START))" \
    || status=1
exit $status
