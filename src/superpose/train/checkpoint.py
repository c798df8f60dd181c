"""Single-process checkpoints: written to a temporary folder and renamed into place, so none is ever half-written.

A checkpoint folder ``step-NNNNNNN`` holds ``model.safetensors`` (the unwrapped model), ``optimizer.pt`` (tensors and
numbers only, loaded with ``weights_only=True``), ``state.json`` (step, loader position, counters) and the resolved
``config.toml``. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ..errors import SuperposeError
from .faults import kill_point

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config_toml: str,
    keep: int,
) -> Path:
    """Write a checkpoint atomically, then drop periodic checkpoints beyond the newest ``keep``.

    ``state["keep_always"]`` marks checkpoints (phase switches, the final one) that pruning never removes.
    """
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(state["step"])
    tmp = folder / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    kill_point("checkpoint", state["step"])
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "config.toml").write_text(config_toml)
    (tmp / "state.json").write_text(json.dumps(state, indent=2))  # written last: its presence marks completeness
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(folder, keep)
    return final


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file so a reader sees the old or the new content, never half of one."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete temporary folders left by a process killed while writing a checkpoint."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for tmp in folder.glob(".tmp-*"):
            shutil.rmtree(tmp)


def _prune(folder: Path, keep: int) -> None:
    periodic = [p for p in list_checkpoints(folder.parent) if not json.loads((p / "state.json").read_text()).get("keep_always")]
    for old in periodic[:-keep]:
        shutil.rmtree(old)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise SuperposeError(f"no checkpoint found in {path}")
    return found[-1]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model (and optimizer) in place; return the saved state. Shape mismatches are one-line errors."""
    path = resolve_checkpoint(path)
    for name in ("model.safetensors", "state.json") + (("optimizer.pt",) if optimizer is not None else ()):
        if not (path / name).is_file():
            raise SuperposeError(f"checkpoint {path} is missing {name}")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as e:
        raise SuperposeError(f"checkpoint {path} does not match the model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise SuperposeError(f"checkpoint {path} does not match the model: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())
