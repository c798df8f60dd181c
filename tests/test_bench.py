"""The GPU check (bench/gpu_check.sh and the scripts it runs) on a CPU: it refuses without a usable GPU, reports a
stage skipped for time without failing, and its ``--cpu`` rehearsal runs every stage at toy size and writes every
field the GPU run reports, so the check cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_env  # noqa: E402  (bench/ is not a package)
import gpu_throughput  # noqa: E402


def _check(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``bash bench/gpu_check.sh`` with this interpreter's environment as its venv (so it never installs)."""
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "VENV": sys.prefix, "OMP_NUM_THREADS": "1", **env}, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a usable GPU is what this machine has")
def test_gpu_check_refuses_loudly_without_a_usable_gpu(tmp_path: Path) -> None:
    done = _check("--out", str(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: no usable GPU: torch ")
    assert not (tmp_path / "summary.json").exists()  # nothing ran, nothing "passed"


def test_a_stage_skipped_for_time_is_reported_not_failed(tmp_path: Path) -> None:
    done = _check("--cpu", "--out", str(tmp_path), BUDGET="0")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["failed"] == []
    assert [s["status"] for s in summary["stages"]] == ["skipped"] * 4
    assert all("budget left" in s["reason"] for s in summary["stages"])
    assert all("skipped" in f["reason"] for f in summary["figures"].values())


def test_gpu_environment_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(gpu_env.subprocess, "run", missing)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    env = gpu_env.gpu_environment(torch.device("cuda", 0))
    assert env["gpu"] == "NVIDIA H200" and env["driver"] is None


def test_the_cuda_device_carries_an_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert gpu_env.bench_device("cuda") == torch.device("cuda", 3)
    assert gpu_env.bench_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("doc", ["docs/distributed.md", "bench/README.md"])
def test_documented_throughput_commands_parse(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / doc).read_text()
    commands = [part.splitlines()[0].split("`")[0].split("#")[0] for part in text.split("python bench/gpu_throughput.py ")[1:]]
    assert commands
    for command in commands:
        argv = ["bench/gpu_throughput.py", *shlex.split(command)]
        monkeypatch.setattr(sys, "argv", argv)
        gpu_throughput._parse()  # an unknown flag exits 2


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_stage_and_writes_every_field(tmp_path: Path) -> None:
    done = _check("--cpu", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["passed"] * 4 and summary["mode"] == "cpu"
    tests = json.loads((tmp_path / "tests.json").read_text())
    assert tests["cases"] and {c["outcome"] for c in tests["cases"]} <= {"skipped", "passed"}
    for name in ("throughput-llama-600m", "throughput-qwen3-moe-10b-a1b"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["command"].startswith("python bench/gpu_throughput.py configs/")  # not provenance's
        assert report["phase1_over_baseline_step_time"] > 0
        assert report["loss_path"] == "fused_eager"  # the configs' loss_chunk, compile off in the rehearsal
        for row in report["results"].values():
            for key in ("mfu", "mfu_noncausal", "peak_memory_allocated_gib", "peak_memory_reserved_gib"):
                assert key in row and row[key] is None and report["null_reasons"][key]
            assert row["step_s"] > 0 and row["loss_path"] == "fused_eager"
        assert report["flops_per_step"] < report["flops_per_step_noncausal"]
        figures = next(f for stage, f in summary["figures"].items() if name.split("-")[1] in stage)
        assert figures["phase1_over_baseline_step_time"] == report["phase1_over_baseline_step_time"]
        assert set(figures["null_reasons"]) == {"mfu", "mfu_noncausal", "peak_memory_allocated_gib",
                                                "peak_memory_reserved_gib"}
    compare = json.loads((tmp_path / "compare" / "report.json").read_text())
    assert len(compare["arms"]) == 1 and compare["family"]
    command = json.loads((tmp_path / "compare" / "gpu_command.json").read_text())
    assert command["compare_command"].split()[1:4] == ["-m", "superpose", "compare"] and command["steps"] == 20
