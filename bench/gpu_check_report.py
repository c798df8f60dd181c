"""The JSON files ``bench/gpu_check.sh`` writes beside each stage's own: ``tests.json`` from pytest's JUnit XML, and
``summary.json``: every stage's outcome (passed, failed, timed_out, skipped) and the figures the check exists for
(MFU both ways, peak memory, the phase-1/baseline step-time ratio, the loss path), each null with its reason when the
stage gave none. The exit status is the check's: 1 when a stage failed or timed out, 0 otherwise (a stage skipped for
time is reported, not failed).

    python bench/gpu_check_report.py tests OUT --mode gpu       # runs tests/test_gpu.py, writes OUT/tests.json
    python bench/gpu_check_report.py summary OUT --mode gpu --budget 540
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gpu_env import gpu_environment
from superpose.provenance import provenance

FIGURES = ("mfu", "mfu_noncausal", "peak_memory_allocated_gib", "peak_memory_reserved_gib")
"""Per bag, from each throughput stage's JSON."""


def test_cases(xml: Path) -> list[dict[str, Any]]:
    """One row per test case of a JUnit XML file (none when pytest was stopped before writing it)."""
    if not xml.is_file():
        return []
    rows = []
    for case in ET.parse(xml).iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        message = next((c.get("message") for c in case if c.tag in ("failure", "error", "skipped")), None)
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "seconds": float(case.get("time", 0)),
                     "outcome": outcome, "message": message})
    return rows


def run_tests(out: Path, mode: str) -> int:
    """Run ``tests/test_gpu.py`` and write ``tests.json``. A failing case fails the stage, and so, on a GPU, does a
    run where no CUDA case passed (every one skipped: it measured nothing)."""
    xml = out / "tests.xml"
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                           f"--junitxml={xml}"], check=False).returncode
    cases = test_cases(xml)
    passed = sum(c["outcome"] == "passed" for c in cases)
    bad = sum(c["outcome"] in ("failure", "error") for c in cases)
    (out / "tests.json").write_text(json.dumps({**provenance(), **gpu_environment(), "mode": mode, "passed": passed,
                               "skipped": sum(c["outcome"] == "skipped" for c in cases), "failed": bad,
                               "cases": cases}, indent=2))
    print(f"{passed} of {len(cases)} CUDA cases passed -> {out / 'tests.json'}")
    if mode == "gpu" and not passed:
        print("gpu_check: error: no CUDA test case ran on this GPU", file=sys.stderr)
        return 1
    return 1 if bad or not cases or code not in (0, 5) else 0  # 5: pytest collected nothing


def _stages(out: Path) -> list[dict[str, Any]]:
    """The stage records the shell appended to ``stages.tsv``: name, status, seconds, exit code, reason, file."""
    rows = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, seconds, code, reason, file = line.split("\t")
        rows.append({"name": name, "status": status, "seconds": int(seconds), "exit_code": int(code) if code else None,
                     "reason": reason or None, "file": file or None})
    return rows


def _figures(stage: dict[str, Any], out: Path) -> dict[str, Any]:
    """A throughput stage's figures, null with a reason where it gave none (a skipped or failed stage, a CPU)."""
    path = out / stage["file"]
    if not path.is_file():
        return {"reason": f"stage {stage['status']}: no {stage['file']}"}
    data = json.loads(path.read_text())
    null = data.get("null_reasons", {})
    per_bag = {bag: {key: row.get(key) for key in (*FIGURES, "step_s", "loss_path")}
               for bag, row in data["results"].items()}
    return {"phase1_over_baseline_step_time": data["phase1_over_baseline_step_time"], "loss_path": data["loss_path"],
            "bags": per_bag, "null_reasons": {k: v for k, v in null.items() if k in FIGURES}}


def write_summary(out: Path, mode: str, budget: int, elapsed: int) -> int:
    """``summary.json`` of every stage; the check's exit status."""
    stages = _stages(out)
    figures = {s["name"]: _figures(s, out) for s in stages if s["name"].startswith("throughput")}
    failed = [s["name"] for s in stages if s["status"] in ("failed", "timed_out")]
    summary = {**provenance(), **gpu_environment(), "mode": mode, "budget_s": budget, "elapsed_s": elapsed,
               "status": "failed" if failed else "passed", "failed": failed,
               "skipped": [s["name"] for s in stages if s["status"] == "skipped"], "stages": stages,
               "figures": figures}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for s in stages:
        print(f"  {s['name']:<40} {s['status']:<9} {s['seconds']:>4} s  {s['reason'] or ''}")
    print(f"gpu_check: {summary['status']} -> {out / 'summary.json'}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    tests = sub.add_parser("tests")
    tests.add_argument("out", type=Path)
    summary = sub.add_parser("summary")
    summary.add_argument("out", type=Path)
    summary.add_argument("--budget", type=int, required=True)
    summary.add_argument("--elapsed", type=int, default=0)
    for parser in (tests, summary):
        parser.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    args = p.parse_args()
    if args.what == "tests":
        return run_tests(args.out, args.mode)
    return write_summary(args.out, args.mode, args.budget, args.elapsed)


if __name__ == "__main__":
    sys.exit(main())
