"""The GPU a bench result was measured on, and the device to measure on: light (torch only), so the scripts that
only report (``gpu_check_report.py``) do not import the trainer."""

from __future__ import annotations

import subprocess

import torch


def gpu_environment(device: torch.device | None = None) -> dict[str, str | None]:
    """The GPU, its driver and the CUDA runtime torch was built with, for every result file (None where there is
    none: a CPU device, or no ``nvidia-smi`` on the PATH)."""
    if device is None:
        device = bench_device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return {"gpu": None, "driver": None, "cuda": torch.version.cuda}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        smi = []
    return {"gpu": torch.cuda.get_device_name(device), "driver": smi[0] if smi else None, "cuda": torch.version.cuda}


def bench_device(name: str) -> torch.device:
    """An indexed CUDA device (the process group's ``device_id`` must carry an index), or the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
