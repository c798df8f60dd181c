"""Checkpoints: written to a temporary folder and renamed into place, so none is ever half-written.

A checkpoint folder ``step-NNNNNNN`` holds ``state.json`` (step, loader position, counters; written last) and the
resolved ``config.toml``, plus the weights and optimizer state in one of two layouts:

- one process: ``model.safetensors`` (the unwrapped Hugging Face model) and ``optimizer.pt`` (the optimizer state
  keyed by parameter name: tensors and numbers only, loaded with ``weights_only=True``);
- several processes: ``dcp/``, a ``torch.distributed.checkpoint`` of the same two state dicts, written by every rank
  in parallel and readable at any world size (DCP's own metadata file is pickled: load only checkpoints you made).

Either layout loads into either kind of run: state dicts are keyed by parameter name, never by position or rank.
"""

from __future__ import annotations

import json
import os
import pickle  # only for its exception type: nothing here unpickles (optimizer.pt loads with weights_only=True)
import shutil
import warnings
from pathlib import Path
from typing import Any, Container

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..errors import SuperposeError
from .distributed import DistInfo, barrier
from .faults import kill_point

PREFIX = "step-"
FULL = StateDictOptions(full_state_dict=True)


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
    info: DistInfo = DistInfo(),
) -> Path:
    """Write a checkpoint atomically (every rank takes part), then drop periodic ones beyond the newest ``keep``.

    ``state["keep_always"]`` marks checkpoints (phase switches, the final one) that pruning never removes.
    """
    folder = Path(run_dir) / "checkpoints"
    final = folder / checkpoint_name(state["step"])
    tmp = folder / f".tmp-{final.name}"
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    if info.enabled:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    kill_point("checkpoint", state["step"])
    if not info.enabled:
        torch.save(get_optimizer_state_dict(model, optimizer), tmp / "optimizer.pt")
    if info.is_main:
        (tmp / "config.toml").write_text(config_toml)
        (tmp / "state.json").write_text(json.dumps(state, indent=2))  # written last: its presence marks completeness
        old = folder / f".old-{final.name}"
        if final.exists():  # a rerun past a resumed step: set the old copy aside until the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
        _prune(folder, keep)
    barrier(info)
    return final


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file so a reader sees the old or the new content, never half of one."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Clean up after a process killed while writing a checkpoint: drop half-written folders, and put back a
    checkpoint that was set aside for replacement if its replacement never landed."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for tmp in folder.glob(".tmp-*"):
            shutil.rmtree(tmp)
        for old in folder.glob(".old-*"):
            final = folder / old.name.removeprefix(".old-")
            if final.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, final)


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


def _tied_twin_loaded(model: torch.nn.Module, key: str, weights: Container[str]) -> bool:
    """True when ``key`` names a tied parameter (e.g. the LM head) that safetensors saved under its twin's name."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return any(key in group and any(n in weights for n in group) for group in names.values())


def _mismatch(path: Path, e: BaseException) -> SuperposeError:
    """One line for a checkpoint that cannot be loaded into this model (wrong shapes, or a corrupt file)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return SuperposeError(f"checkpoint {path} does not match the model or is corrupt: {first}")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model (and optimizer) in place, whatever layout and world size wrote it; return the saved state.

    Works on plain, DDP and FSDP2-sharded models alike. Shape mismatches and missing files are one-line errors.
    """
    path = resolve_checkpoint(path)
    sharded = (path / "dcp").is_dir()
    needed = ["state.json"] + (["dcp/.metadata"] if sharded else ["model.safetensors"])
    if optimizer is not None and not sharded:
        needed.append("optimizer.pt")
    for name in needed:
        if not (path / name).is_file():
            raise SuperposeError(f"checkpoint {path} is missing {name}")
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp

            model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (
                get_model_state_dict(model), None)
            metadata = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
            saved = {k.removeprefix("model.") for k in metadata if k.startswith("model.")}
            missing = [k for k in model_sd if k not in saved and not _tied_twin_loaded(model, k, saved)]
            unexpected = sorted(saved - model_sd.keys())
            if missing or unexpected:
                raise SuperposeError(f"checkpoint {path} does not match the model: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
            model_sd = {k: v for k, v in model_sd.items() if k in saved}  # a tied head may be saved once
            content = {"model": model_sd} | ({"optim": optim_sd} if optimizer is not None else {})
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                dcp.load(content, checkpoint_id=str(path / "dcp"))
            loose = StateDictOptions(strict=False)  # keys were checked above; a tied twin fills the head
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=loose)
            else:
                set_model_state_dict(model, model_sd, options=loose)
        else:
            weights = load_file(str(path / "model.safetensors"))
            result = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            missing = [k for k in result.missing_keys if not _tied_twin_loaded(model, k, weights)]
            if missing or result.unexpected_keys:
                raise SuperposeError(f"checkpoint {path} does not match the model: missing {missing[:3]}, "
                                     f"unexpected {list(result.unexpected_keys)[:3]}")
            if optimizer is not None:
                state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
                set_optimizer_state_dict(model, optimizer, state, options=FULL)
    except (RuntimeError, ValueError, KeyError, AssertionError, SafetensorError, pickle.UnpicklingError,
            CheckpointException) as e:
        raise _mismatch(path, e) from None
    try:
        state = json.loads((path / "state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise SuperposeError(f"checkpoint {path}: state.json is corrupt") from None
    needed_keys = ("step", "loader", "text_tokens", "flops", "wall_time") if optimizer is not None else ()
    missing_keys = [k for k in needed_keys if k not in state]  # a resume needs them; export only the weights
    if missing_keys:
        raise SuperposeError(f"checkpoint {path}: state.json lacks {', '.join(missing_keys)}")
    return state
