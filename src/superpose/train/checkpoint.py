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
from ..files import commit_dir, file_sha256, first_line, restore_set_aside, temp_sibling
from .distributed import DistInfo, barrier, is_sharded, merge_across_ranks
from .faults import kill_point
from .state import TrainState

PREFIX = "step-"
FULL = StateDictOptions(full_state_dict=True)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder, read from its name (see :func:`checkpoint_name`)."""
    return int(Path(path).name[len(PREFIX):])


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
    config_files: dict[str, str],
    keep: int,
    info: DistInfo = DistInfo(),
) -> Path:
    """Write a checkpoint atomically (every rank takes part), then drop periodic ones beyond the newest ``keep``.

    ``state`` goes to ``state.json`` with the SHA-256 of every weight and optimizer file added (verified on load);
    ``state["keep_always"]`` marks checkpoints (phase switches, the final one) that pruning never removes.
    ``config_files`` (name -> text: the run config, the model's transformers config) are written beside.
    """
    folder = Path(run_dir) / "checkpoints"
    final = folder / checkpoint_name(state["step"])
    tmp = folder / f".tmp-{final.name}"
    if info.is_main:
        temp_sibling(final, unique=False)  # a name every rank computes
    barrier(info)
    try:
        _write_weights(tmp, model, optimizer, state["step"], info)
        checksums = _checksums(tmp, info)
        if info.is_main:
            for name, text in config_files.items():
                (tmp / name).write_text(text)
            # state.json is written last: its presence marks a complete checkpoint
            (tmp / "state.json").write_text(json.dumps({**state, "sha256": checksums}, indent=2))
            commit_dir(tmp, final, replace=True)  # a rerun past a resumed step replaces that step's checkpoint
            _prune(folder, keep)
    except (OSError, SafetensorError, RuntimeError) as e:  # a full or read-only disk: nothing complete was touched
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SuperposeError(f"writing checkpoint {final.name} failed: {first_line(e)}; the last complete "
                             f"checkpoint in {folder} is intact: free space, then continue with --resume") from None
    barrier(info)
    return final


def _write_weights(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                   info: DistInfo) -> None:
    """Weights and optimizer state: safetensors + optimizer.pt from one unsharded process, else a DCP folder that
    every rank writes its shards into (FSDP2 on one GPU shards too)."""
    sharded = info.enabled or is_sharded(model)
    if sharded:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    kill_point("checkpoint", step)
    if not sharded:
        torch.save(get_optimizer_state_dict(model, optimizer), tmp / "optimizer.pt")
    barrier(info)


def _weight_files(path: Path) -> list[str]:
    """The weight and optimizer files of a checkpoint, relative to it, in a fixed order."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.name not in ("state.json", "config.toml", "config.json"))


def _checksums(path: Path, info: DistInfo) -> dict[str, str]:
    """SHA-256 of every weight/optimizer file; under torchrun each rank hashes its share of the files."""
    names = _weight_files(path)
    return merge_across_ranks({n: file_sha256(path / n) for n in names[info.rank::info.world_size]}, info)


def verify_checkpoint(path: Path, state: dict[str, Any], info: DistInfo = DistInfo()) -> None:
    """Compare every file with the SHA-256 recorded when it was written and name the first damaged one.

    Checkpoints written before checksums were recorded load unverified.
    """
    recorded = state.get("sha256")
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise SuperposeError(f"checkpoint {path}: state.json field sha256 is corrupt")
    names = sorted(recorded)
    bad = {n: "" for n in names[info.rank::info.world_size]
           if not (path / n).is_file() or file_sha256(path / n) != recorded[n]}
    bad_names = sorted(merge_across_ranks(bad, info))
    if bad_names:
        raise SuperposeError(f"checkpoint {path}: {bad_names[0]} is damaged (its SHA-256 differs from the one "
                             f"recorded when it was written); resume from an earlier checkpoint")


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Clean up after a process killed while writing a checkpoint (see :func:`superpose.files.restore_set_aside`)."""
    restore_set_aside(Path(run_dir) / "checkpoints")


def _prune(folder: Path, keep: int) -> None:
    periodic = [p for p in list_checkpoints(folder.parent) if not read_state(p).get("keep_always")]
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
    return SuperposeError(f"checkpoint {path} does not match the model or is corrupt: {first_line(e)}")


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json`` as a table; anything else is a one-line error."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise SuperposeError(f"checkpoint {path}: state.json is corrupt") from None
    if not isinstance(state, dict):
        raise SuperposeError(f"checkpoint {path}: state.json holds {type(state).__name__}, not a table")
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: DistInfo = DistInfo()) -> dict[str, Any]:
    """Restore model (and optimizer) in place, whatever layout and world size wrote it; return the saved state.

    Works on plain, DDP and FSDP2-sharded models alike. Missing or damaged files (checked against the recorded
    SHA-256), shape mismatches and an optimizer state that does not cover the model are one-line errors.
    """
    return _load(path, model, optimizer, info)[0]


def resume_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      info: DistInfo = DistInfo()) -> TrainState:
    """:func:`load_checkpoint` for a run that continues: the train state, from the one parse of state.json that
    also checks the optimizer state against it."""
    return _load(path, model, optimizer, info)[1]


def _load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
          info: DistInfo) -> tuple[dict[str, Any], TrainState | None]:
    """Restore in place; the saved state as a table, and parsed as a :class:`TrainState` when an optimizer is
    restored too (a weights-only load, e.g. for export, does not need it)."""
    path = resolve_checkpoint(path)
    sharded = (path / "dcp").is_dir()
    needed = ["state.json"] + (["dcp/.metadata"] if sharded else ["model.safetensors"])
    if optimizer is not None and not sharded:
        needed.append("optimizer.pt")
    for name in needed:
        if not (path / name).is_file():
            raise SuperposeError(f"checkpoint {path} is missing {name}")
    state = read_state(path)
    progress = TrainState.from_state_dict(state, f"checkpoint {path}") if optimizer is not None else None
    verify_checkpoint(path, state, info)
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
                _check_optimizer_covers(path, optim_sd, progress)
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
                saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
                if not isinstance(saved, dict) or not {"state", "param_groups"} <= saved.keys():
                    raise SuperposeError(f"checkpoint {path}: optimizer.pt does not hold an optimizer state")
                _check_optimizer_covers(path, saved, progress)
                set_optimizer_state_dict(model, optimizer, saved, options=FULL)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, AssertionError, SafetensorError,
            pickle.UnpicklingError, CheckpointException) as e:
        raise _mismatch(path, e) from None
    return state, progress


def _check_optimizer_covers(path: Path, saved: dict[str, Any], progress: TrainState | None) -> None:
    """After any completed update AdamW holds moments for every parameter; an empty or partial saved state would
    load (torch fills the gaps with zeros) and resume with different updates from the next step on."""
    if progress is None or progress.step - progress.skipped == 0:
        return
    names = [n for group in saved["param_groups"] for n in group["params"]]
    if not all("exp_avg" in saved["state"].get(n, {}) for n in names):
        updates = progress.step - progress.skipped
        raise SuperposeError(f"checkpoint {path}: the optimizer state holds no moments for some parameters after "
                             f"{updates} updates; it does not belong to this run or is damaged")
