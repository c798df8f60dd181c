"""Where a result came from, recorded beside it: every report.json and bench result carries this."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit superpose runs from (``-dirty`` with uncommitted changes); None unless this file is tracked by
    the enclosing git checkout (an install inside another project's repository is not a superpose checkout)."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", Path(__file__).name).returncode != 0:
            return None
        out = git("describe", "--always", "--dirty", "--abbrev=12")
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(command: str | None = None) -> dict[str, Any]:
    """Where and with what a result was made: date, command, package versions, commit, Python, CPU and GPU models.

    ``command`` defaults to this process's command line.
    """
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": {name: _version(name) for name in ("superpose", "torch", "transformers")},
        "commit": _git_commit(),
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
