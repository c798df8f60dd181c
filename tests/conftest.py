import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from superpose.cli import main
from superpose.data.prepare import prepare
from superpose.train.config import RunConfig
from superpose.train.config_load import config_from_dict
from superpose.train.loop import train


def torch_settings() -> dict:
    """torch's process-global settings that change what CPU ops compute. Plain values: test_export also runs this
    function's source in a fresh interpreter to compare the two processes."""
    return {"threads": torch.get_num_threads(), "default_dtype": str(torch.get_default_dtype()),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "grad_enabled": torch.is_grad_enabled(),
            "flush_denormal": torch.tensor([1e-38]).div(4).item() == 0.0}


_SETTERS: dict[str, Callable[[Any], Any]] = {
    "threads": torch.set_num_threads,
    "default_dtype": lambda name: torch.set_default_dtype(getattr(torch, name.removeprefix("torch."))),
    "matmul_precision": torch.set_float32_matmul_precision,
    "deterministic": torch.use_deterministic_algorithms,
    "grad_enabled": torch.set_grad_enabled,
    "flush_denormal": torch.set_flush_denormal,
}


@pytest.fixture(scope="session")
def _torch_defaults() -> tuple[dict, torch.Tensor]:
    """torch's settings and global RNG state as the session found them (before any module fixture)."""
    return torch_settings(), torch.get_rng_state()


@pytest.fixture(autouse=True)
def _restore_torch_globals(_torch_defaults):
    """Every test ends with torch's settings and global RNG as the session began, so no result depends on which tests
    ran before in this process (a thread count left by one test changed another's bitwise comparison)."""
    yield
    settings, rng = _torch_defaults
    torch.set_rng_state(rng)
    for name, value in torch_settings().items():
        if value != settings[name]:
            _SETTERS[name](settings[name])


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """A small prepared slice of the embedded corpus (the Python standard library), shared by the trainer tests."""
    out = tmp_path_factory.mktemp("data") / "embedded"
    prepare(["embedded"], out, vocab_size=512, max_bytes=400_000, val_fraction=0.05, progress=False)
    return out


def make_tiny_config(data_path, out_dir, name: str = "run", **sections) -> RunConfig:
    """A seconds-long CPU run: tiny preset, 12 steps, bag 4 for the first half, B=4, L=16."""
    data = {
        "name": name,
        "out_dir": str(out_dir),
        "model": {"preset": "tiny"},
        "data": {"path": str(data_path)},
        "tst": {"bag": 4, "ratio": 0.5},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 12, "batch_size": 4, "seq_len": 16, "device": "cpu", "log_every": 1},
        "eval": {"every": 4, "batches": 2},
        "checkpoint": {"every": 4, "keep": 2},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return config_from_dict(data)


@pytest.fixture
def tiny_config(embedded_data, tmp_path):
    """Factory of tiny run configs writing under this test's tmp_path (see make_tiny_config)."""

    def make(name: str = "run", **sections) -> RunConfig:
        return make_tiny_config(embedded_data, tmp_path / "runs", name, **sections)

    return make


_KINDS = {"tst": {}, "baseline": {"tst": {"bag": 1, "ratio": 0.0}}}
_RUNS: dict[str, Path] = {}  # module-level: the test files that import the fixture share one set of runs


@pytest.fixture(scope="session")
def trained_run(embedded_data, tmp_path_factory):
    """``get("tst" | "baseline")``: a tiny run trained once per session, shared read-only by the deploy tests."""

    def get(kind: str) -> Path:
        if kind not in _RUNS:
            out_dir = tmp_path_factory.getbasetemp() / "shared-runs"
            _RUNS[kind] = train(make_tiny_config(embedded_data, out_dir, kind, **_KINDS[kind]), progress=False).run_dir
        return _RUNS[kind]

    return get


@pytest.fixture
def tst_run(trained_run):
    return trained_run("tst")


def run_error(capsys, argv):
    """Run the CLI expecting a one-line error and exit code 2; return the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("superpose: error: ")
    return lines[0]


def torchrun(config_path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``superpose train CONFIG --quiet ARGS`` on ``nproc`` gloo ranks under torchrun; fails the test on a non-zero
    exit (with the end of its stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "superpose", "train", str(config_path), "--quiet", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
