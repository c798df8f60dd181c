#!/usr/bin/env bash
# One GPU, one command, under 8 minutes on one H100/H200: the CUDA test cases, the trainer's throughput on two paper
# shapes (MFU, memory, phase-1/baseline step time) and a short TST-vs-baseline compare in the time left. Every stage
# writes JSON under bench/results/gpu/ with the GPU name, driver, torch and transformers versions; a failing stage is
# reported and the next one still runs (exit code 1 at the end).
#
#   bash bench/gpu_check.sh            # PYTHON=... to choose the interpreter (default .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results/gpu
BUDGET=${BUDGET:-470}  # seconds for everything; the compare gets what the first two stages leave
mkdir -p "$OUT"
status=0
stage() { echo "== $1 ($((SECONDS))s)"; }

stage "CUDA test cases"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/tests.xml" || status=1
"$PY" - "$OUT" <<'PY' || status=1
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_throughput import gpu_environment
from superpose.compare.report import provenance
out = Path(sys.argv[1])
cases = [{"test": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time", 0)),
          "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed"),
          "message": next((child.get("message") for child in c if child.tag in ("failure", "error")), None)}
         for c in ET.parse(out / "tests.xml").iter("testcase")]
(out / "tests.json").write_text(json.dumps({**provenance(), **gpu_environment(), "cases": cases}, indent=2))
print(f"{sum(c['outcome'] == 'passed' for c in cases)} of {len(cases)} CUDA cases passed -> {out / 'tests.json'}")
PY

stage "throughput: llama-600m (all 32 layers), bag 1 vs 4"
"$PY" bench/gpu_throughput.py configs/llama-600m-8gpu.toml --bag 4 --out "$OUT/throughput-llama-600m.json" || status=1

stage "throughput: qwen3-moe-10b-a1b with 4 of its 24 layers, bag 1 vs 16"
"$PY" bench/gpu_throughput.py configs/qwen3-moe-10b-a1b-8gpu.toml --layers 4 --accumulation 2 \
    --out "$OUT/throughput-qwen3-moe-10b-a1b-4layers.json" || status=1

left=$((BUDGET - SECONDS))
stage "TST vs baseline compare in the ${left}s left"
if [ "$left" -gt 90 ]; then
    "$PY" bench/gpu_compare.py --budget "$left" --max-bytes 30000000 --out "$OUT/compare" || status=1
else
    echo "skipped: only ${left}s left"; status=1
fi
stage "done, exit $status"
exit $status
