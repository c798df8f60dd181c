"""Checkpoints: written to a temporary folder and renamed into place, so none is ever half-written.

A checkpoint folder ``step-NNNNNNN`` holds ``state.json`` (step, loader position, counters), the resolved
``config.toml`` and the model's ``config.json``, plus the weights and optimizer state in one of two layouts:

- one process: ``model.safetensors`` (the unwrapped Hugging Face model) and ``optimizer.pt`` (the optimizer state
  keyed by parameter name: tensors and numbers only, loaded with ``weights_only=True``);
- several processes: ``dcp/``, a ``torch.distributed.checkpoint`` of the same two state dicts, written by every rank
  in parallel and readable at any world size (DCP's own metadata file is pickled: load only checkpoints you made).

Either layout loads into either kind of run: state dicts are keyed by parameter name, never by position or rank.
A DCP checkpoint is written in the background by default (``checkpoint.async``, :class:`BackgroundCheckpoints`):
training waits only for the copy of its state to CPU memory.

``manifest.sha256``, written last, holds the SHA-256 of every other file (the format of ``sha256sum -c``, under a
header line with the SHA-256 of the lines below it). Every reader (resume, export, generate, eval) verifies the
whole checkpoint against it first: a file missing, changed or not listed, or a missing or damaged manifest, is one
line naming the checkpoint. A checkpoint without a manifest is refused, whatever else it holds (those of
earlier versions, whose ``state.json`` recorded checksums of the weights alone, included), so deleting it cannot
turn verification off.
"""

from __future__ import annotations

import hashlib
import json
import pickle  # only for its exception type: nothing here unpickles (optimizer.pt loads with weights_only=True)
import re
import shutil
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Container, Iterator, Mapping

import torch
import torch.distributed as dist
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
from ..files import commit_dir, file_sha256, first_line, restore_set_aside, temp_sibling, write_atomic
from .distributed import DistInfo, barrier, is_sharded, merge_across_ranks
from .faults import kill_point
from .state import TrainState

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PREFIX = "step-"
FULL = StateDictOptions(full_state_dict=True)
MANIFEST = "manifest.sha256"
_NAME = re.compile(r"step-\d+")
_HEADER = "# superpose checkpoint manifest: the lines below hash to "
_HEADER_LINE = re.compile(re.escape(_HEADER) + r"([0-9a-f]{64})")
_ENTRY = re.compile(r"([0-9a-f]{64})  ([^\n]+)")
FIXED_ON_RESUME = ("lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip")
"""``[optim]`` keys a resumed run must keep: they define the update itself. (The optimizer state saved with the
weights would silently override a changed ``beta``/``eps``/``weight_decay``, and a changed ``lr`` would silently
rescale every later update.) The LR schedule's length may change: a compare baseline forks from a constant-LR trunk
and decays, an extended trunk trains longer."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder, read from its name (see :func:`checkpoint_name`)."""
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoints, oldest first. A folder ``step-N`` appears only by the rename that ends a complete write
    (a kill leaves ``.tmp-step-N``, never listed), so every one is listed, a damaged one included: reading it
    names the damage instead of silently resuming from an older one."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=checkpoint_step)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint folder (complete or damaged), not a run folder or an export."""
    path = Path(path)
    markers = (MANIFEST, "state.json", "optimizer.pt", "dcp")
    return (path.is_dir() and not (path / "checkpoints").is_dir()
            and (bool(_NAME.fullmatch(path.name)) or any((path / m).exists() for m in markers)))


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config_files: dict[str, str],
    keep: int,
    info: DistInfo = DistInfo(),
    background: BackgroundCheckpoints | None = None,
) -> Path:
    """Write a checkpoint atomically (every rank takes part), then drop periodic ones beyond the newest ``keep``.

    ``state`` goes to ``state.json``; ``state["keep_always"]`` marks checkpoints (phase switches, the final one)
    that pruning never removes. ``config_files`` (name -> text: the run config, the model's transformers config) are
    written beside. The manifest comes last, once every rank's files are complete: each rank hashed a share of the
    weight files it helped write, rank 0 adds its small files. With ``background`` (a DCP checkpoint, see
    :func:`writes_dcp`) this returns once every rank has copied its state to CPU memory, and the checkpoint appears
    at the returned path when its thread has finished it (:class:`BackgroundCheckpoints`).
    """
    if background is not None:
        background.wait()  # at most one in flight
    folder = Path(run_dir) / "checkpoints"
    final = folder / checkpoint_name(state["step"])
    tmp = folder / f".tmp-{final.name}"
    if info.is_main:
        temp_sibling(final, unique=False)  # a name every rank computes
    barrier(info)
    files = {**config_files, "state.json": json.dumps(state, indent=2)}  # this step's, whenever they are written
    with _writing(tmp, final, info):
        if background is not None:
            background.start(tmp, final, model, optimizer, files, keep)
            return final
        _write_weights(tmp, model, optimizer, state["step"], info)
        _seal(tmp, final, files, keep, info, lambda part: merge_across_ranks(part, info))
    barrier(info)
    return final


@contextmanager
def _writing(tmp: Path, final: Path, info: DistInfo) -> Iterator[None]:
    """A write that fails (a full or read-only disk) is one line; nothing complete was touched."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError, CheckpointException) as e:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SuperposeError(f"writing checkpoint {final.name} failed: {first_line(e)}; the last complete "
                             f"checkpoint in {final.parent} is intact: free space, then continue with --resume"
                             ) from None


def writes_dcp(model: torch.nn.Module, info: DistInfo) -> bool:
    """Whether this run's checkpoints are DCP folders: several processes, or FSDP2 shards on one (one GPU)."""
    return info.enabled or is_sharded(model)


def background_checkpoints(enabled: bool, model: torch.nn.Module, info: DistInfo, device: torch.device,
                           on_complete: Callable[[Path], None]) -> BackgroundCheckpoints | None:
    """``checkpoint.async``'s writer where it applies: DCP checkpoints under a process group (every multi-process
    run, FSDP2 on one GPU); None where checkpoints are written in place."""
    if not (enabled and writes_dcp(model, info) and dist.is_initialized()):
        return None
    return BackgroundCheckpoints(info, device.type == "cuda", on_complete)


def _write_weights(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                   info: DistInfo) -> None:
    """Weights and optimizer state: safetensors + optimizer.pt from one unsharded process, else a DCP folder that
    every rank writes its shards into (FSDP2 on one GPU shards too)."""
    sharded = writes_dcp(model, info)
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


def _seal(tmp: Path, final: Path, files: Mapping[str, str], keep: int, info: DistInfo,
          merge: Callable[[dict[str, str]], dict[str, str]]) -> None:
    """Complete a checkpoint whose weights every rank has written: each rank hashes its share of the files (``merge``
    gathers the checksums), rank 0 writes ``files``, the manifest, renames the folder into place and prunes."""
    names = checkpoint_files(tmp)
    checksums = merge({n: file_sha256(tmp / n) for n in names[info.rank::info.world_size]})
    if info.is_main:
        for name, text in files.items():
            (tmp / name).write_text(text)
        kill_point("manifest", checkpoint_step(final))
        write_manifest(tmp, checksums)
        commit_dir(tmp, final, replace=True)  # a rerun past a resumed step replaces that step's checkpoint
        _prune(final.parent, keep)


class BackgroundCheckpoints:
    """``checkpoint.async``: DCP checkpoints finished by a thread of every rank while training goes on.

    :func:`save_checkpoint` copies this rank's shards to CPU memory (all that training waits for: DCP's
    ``async_save``, into buffers kept from one checkpoint to the next, pinned on a GPU); DCP's thread then writes
    them, and ours hashes this rank's share of the files, gathers the checksums, and on rank 0 writes the manifest,
    renames ``.tmp-step-N`` into place and prunes, so a crash before the end leaves the previous checkpoint the
    newest one. The threads' collectives go over a gloo group of their own: one group's collectives must never be
    issued from two threads at once, and training's never use this one. At most one is in flight: a new checkpoint,
    a stop and the end of the run (leaving the ``with`` block) wait for it. ``on_complete`` (a path) runs in the
    thread that waited, once the checkpoint is complete on every rank.
    """

    def __init__(self, info: DistInfo, pinned: bool, on_complete: Callable[[Path], None] = lambda path: None):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.info, self.on_complete = info, on_complete
        self._group = dist.new_group(backend="gloo")  # every rank builds it at the same point: start-up
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=False))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="superpose-checkpoint")
        self._pending: tuple[Path, Future[None]] | None = None

    def start(self, tmp: Path, final: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              files: Mapping[str, str], keep: int) -> None:
        """Stage this rank's state and hand the rest to the threads (every rank calls this, in step)."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        written = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"),
                                 process_group=self._group, async_stager=self._stager)
        self._pending = (final, self._thread.submit(self._finish, written, tmp, final, files, keep))

    def _finish(self, written: Future[Any], tmp: Path, final: Path, files: Mapping[str, str], keep: int) -> None:
        """The rest of a checkpoint, in the background: DCP's write, the seal, then a barrier, so the checkpoint is
        complete for every rank once this rank's future resolves."""
        with _writing(tmp, final, self.info):
            written.result()
            kill_point("checkpoint", checkpoint_step(final))
            _seal(tmp, final, files, keep, self.info, self._merge)
            dist.barrier(group=self._group)

    def _merge(self, part: dict[str, str]) -> dict[str, str]:
        return merge_across_ranks(part, self.info, self._group)

    @property
    def in_flight(self) -> Path | None:
        """The checkpoint being written, if any."""
        return self._pending[0] if self._pending is not None else None

    def wait(self) -> Path | None:
        """Block until the checkpoint in flight (if any) is complete and return its path; a failed one raises its
        one-line error here."""
        if self._pending is None:
            return None
        (final, future), self._pending = self._pending, None
        future.result()
        self.on_complete(final)
        return final

    def __enter__(self) -> BackgroundCheckpoints:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        """Wait for the checkpoint in flight. When the run is failing anyway, that error is the one reported: a
        checkpoint that failed too was never renamed into place, so --resume takes the one before."""
        try:
            with suppress(*(() if kind is None else (Exception,))):
                self.wait()
        finally:
            self._thread.shutdown(wait=True)
            self._stager.close()


def checkpoint_files(path: Path) -> list[str]:
    """Every file of a checkpoint but its manifest, relative to it (``/``-separated), in a fixed order."""
    path = Path(path)
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(path: Path, checksums: Mapping[str, str] | None = None) -> None:
    """Write the manifest of the checkpoint folder ``path`` atomically: ``checksums`` (name -> SHA-256, as the
    ranks computed them while writing), and every other file hashed here."""
    known = checksums or {}
    sums = {n: known.get(n) or file_sha256(Path(path) / n) for n in checkpoint_files(path)}
    body = "".join(f"{sums[n]}  {n}\n" for n in sorted(sums))
    digest = hashlib.sha256(body.encode()).hexdigest()
    write_atomic(Path(path) / MANIFEST, f"{_HEADER}{digest}\n{body}")


def read_manifest(path: Path) -> dict[str, str]:
    """The SHA-256 of every file of a checkpoint as its manifest records it; a missing or damaged manifest is one
    line (never 'unverified')."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise SuperposeError(f"checkpoint {path} is damaged or incomplete: it has no {MANIFEST} (the checksums of "
                             f"its files, written last; checkpoints of superpose versions without one are refused "
                             f"too); use another checkpoint")
    try:
        header, _, body = file.read_bytes().decode("utf-8").partition("\n")
    except UnicodeDecodeError:
        header = body = ""
    match = _HEADER_LINE.fullmatch(header)
    entries = [_ENTRY.fullmatch(line) for line in body.split("\n")[:-1]]
    if (not match or hashlib.sha256(body.encode()).hexdigest() != match[1] or not body.endswith("\n")
            or not all(entries) or len({e[2] for e in entries}) != len(entries)):
        raise SuperposeError(f"checkpoint {path}: {MANIFEST} is damaged (its lines do not hash to the SHA-256 in "
                             f"its header, or are not 'SHA-256  name'); use another checkpoint")
    return {e[2]: e[1] for e in entries}


def verify_checkpoint(path: Path, info: DistInfo = DistInfo()) -> None:
    """Check every file of a checkpoint against its manifest and name the first problem: a file missing, one the
    manifest does not list, or one whose SHA-256 differs. Under torchrun each rank hashes a share of the files."""
    recorded = read_manifest(path)
    present = checkpoint_files(path)
    missing = sorted(set(recorded) - set(present))
    if missing:
        raise SuperposeError(f"checkpoint {path} is missing {missing[0]}")
    unlisted = sorted(set(present) - set(recorded))
    if unlisted:
        raise SuperposeError(f"checkpoint {path}: {unlisted[0]} is not in its {MANIFEST} (added after the "
                             f"checkpoint was written); use another checkpoint")
    bad = {n: "" for n in present[info.rank::info.world_size] if file_sha256(Path(path) / n) != recorded[n]}
    bad_names = sorted(merge_across_ranks(bad, info))
    if bad_names:
        raise SuperposeError(f"checkpoint {path}: {bad_names[0]} is damaged (its SHA-256 differs from the one "
                             f"recorded when it was written); use an earlier checkpoint")


def check_resume_config(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse to resume with a changed :data:`FIXED_ON_RESUME` key; ``config`` is the run's config as tables, the
    checkpoint's own ``config.toml`` (verified) says what it was trained with."""
    try:
        saved = tomllib.loads((Path(path) / "config.toml").read_text()).get("optim", {})
    except FileNotFoundError:
        raise SuperposeError(f"checkpoint {path} is missing config.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SuperposeError(f"checkpoint {path}: config.toml is corrupt: {first_line(e)}") from None
    now = config.get("optim", {})
    for key in FIXED_ON_RESUME:
        if isinstance(saved, dict) and key in saved and saved[key] != now.get(key):
            raise SuperposeError(f"--resume: optim.{key} is {now.get(key)!r} but checkpoint {path} was trained with "
                                 f"{saved[key]!r}; a resumed run keeps the optimizer's settings: set optim.{key} = "
                                 f"{saved[key]!r}, or start a new run from an export (model.init_from)")


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Clean up after a process killed while writing a checkpoint (see :func:`superpose.files.restore_set_aside`)."""
    restore_set_aside(Path(run_dir) / "checkpoints")


def _prune(folder: Path, keep: int) -> None:
    periodic = [p for p in list_checkpoints(folder.parent) if not _kept_always(p)]
    for old in periodic[:-keep]:
        shutil.rmtree(old)


def _kept_always(path: Path) -> bool:
    """A phase-switch or final checkpoint, or one whose state cannot be read (nothing unread is deleted)."""
    try:
        return bool(read_state(path).get("keep_always"))
    except (OSError, SuperposeError):
        return True


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if is_checkpoint(path):
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
                    info: DistInfo = DistInfo(), verified: bool = False) -> dict[str, Any]:
    """Restore model (and optimizer) in place, whatever layout and world size wrote it; return the saved state.

    Works on plain, DDP and FSDP2-sharded models alike. The checkpoint is verified against its manifest first
    (``verified``: the caller did that already, e.g. export before reading its ``config.json``); shape mismatches
    and an optimizer state that does not cover the model are one-line errors.
    """
    path = resolve_checkpoint(path)
    if not verified:
        verify_checkpoint(path, info)
    return _load(path, model, optimizer, info)[0]


def resume_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      config: Mapping[str, Any], info: DistInfo = DistInfo()) -> TrainState:
    """:func:`load_checkpoint` for a run that continues with ``config`` (its tables): verified, the update rule
    unchanged (:func:`check_resume_config`), then the train state from the one parse of state.json that also
    checks the optimizer state against it."""
    path = resolve_checkpoint(path)
    verify_checkpoint(path, info)
    check_resume_config(path, config)
    return _load(path, model, optimizer, info)[1]


def _load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
          info: DistInfo) -> tuple[dict[str, Any], TrainState | None]:
    """Restore a verified checkpoint in place; the saved state as a table, and parsed as a :class:`TrainState` when
    an optimizer is restored too (a weights-only load, e.g. for export, does not need it)."""
    sharded = (path / "dcp").is_dir()
    needed = ["state.json"] + (["dcp/.metadata"] if sharded else ["model.safetensors"])
    if optimizer is not None and not sharded:
        needed.append("optimizer.pt")
    for name in needed:
        if not (path / name).is_file():
            raise SuperposeError(f"checkpoint {path} is missing {name}")
    state = read_state(path)
    progress = TrainState.from_state_dict(state, f"checkpoint {path}") if optimizer is not None else None
    try:
        if sharded:
            _load_sharded(path, model, optimizer, progress)
        else:
            _load_single(path, model, optimizer, progress)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, AssertionError, SafetensorError,
            pickle.UnpicklingError, CheckpointException) as e:
        raise _mismatch(path, e) from None
    return state, progress


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                  progress: TrainState | None) -> None:
    """A ``dcp/`` checkpoint into any model, at any world size (each rank reads the pieces of its shards)."""
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


def _load_single(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 progress: TrainState | None) -> None:
    """``model.safetensors`` (+ ``optimizer.pt``, tensors and numbers only) into any model."""
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
