"""The training loop: bookkeeping only. The schedule picks the bag, the loader reads the window, the TrainModule steps.

Everything that can be wrong with the inputs (config, data, windows that do not fit, an existing run folder) is
checked before the first byte is written, and what was checked (the datasets, the schedule, the model shell) is
handed on rather than opened again. ``Trainer.fit`` is the list of what happens in a step; every policy around it
(evaluation, checkpoints, the non-finite policy, throughput, the metrics row, the console's lines) is a callback
(train/callbacks.py), and a run can add its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .. import method
from ..data.loader import WindowLoader, check_window, validation_windows
from ..data.mixture import MixtureLoader, Source, open_sources, source_counts
from ..data.shards import Share, TokenDataset
from ..errors import SuperposeError
from ..files import FolderLock, write_atomic
from ..flops import flops_per_step
from ..models.memory import check_fits
from ..models import build_model, parameter_counts
from ..schedule import PhaseSchedule, lr_at, rewarmup_factor
from .callbacks import (
    Callback,
    CheckpointCadence,
    CollectiveTimeout,
    ConsoleProgress,
    EpochLine,
    Evaluator,
    GarbageCollection,
    MetricsLog,
    NonFinitePolicy,
    PhaseSwitchLine,
    Row,
    SourceCounts,
    Throughput,
)
from .checkpoint import (
    background_checkpoints,
    list_checkpoints,
    remove_partial_checkpoints,
    resolve_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from .config import RunConfig
from .console import Console
from .distributed import (DistInfo, any_rank, barrier, init_distributed, init_one_rank_group, merge_across_ranks,
                          resolve_device, shutdown, torchrun_env)
from .faults import StopSignals, kill_point
from .metrics import MetricsWriter
from .state import TrainState
from .step import Prefetcher, StepResult, TrainModule, profile_steps


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_val_loss: float
    text_tokens: int
    wall_time: float
    stopped: str | None = None
    """The signal (SIGTERM, SIGINT) that stopped the run early, after its checkpoint; None when it ran to the end."""
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    """A mixture's accounting per source name: windows, text tokens and passes completed (empty for data.path)."""


@dataclass
class RunInputs:
    """What a run reads, opened and checked before anything is written."""

    data: TokenDataset
    """The (first) dataset: its tokenizer and vocabulary are the run's; a mixture's sources all share them."""
    schedule: PhaseSchedule
    sources: list[Source]
    """``data.path`` as one source, or the ``data.sources`` of a mixture (``mixed``), each with its train stream."""
    val_windows: dict[str, torch.Tensor]
    """Per source name, ``[N, L+1]`` held-out windows of its own validation split, the same at any world size
    (TrainModule.eval_loss splits them over ranks)."""
    model: PreTrainedModel
    """The model shell on the meta device at the data's vocabulary: its config read (a ``model.config`` or
    ``init_from``) and the model built once, to refuse a bad one here; TrainModule wraps this same shell."""
    mixed: bool = False
    datasets: list[TokenDataset] = field(default_factory=list)
    """Every source's dataset, verified by :meth:`verify` once the ranks can share the work."""

    @classmethod
    def open(cls, cfg: RunConfig, schedule: PhaseSchedule, world_size: int) -> "RunInputs":
        """Open and check what ``cfg`` (validated, with ``schedule`` from its validation) reads on ``world_size``
        ranks; the model must fit them."""
        mixture = cfg.data.mixture()
        datasets = open_sources([path for _, path, _ in mixture], tokenizer=cfg.data.tokenizer or None, verify=False)
        data = datasets[0]
        L, B = cfg.train.seq_len, cfg.train.batch_size
        sources = [Source(name, weight, ds.split("train")) for (name, _, weight), ds in zip(mixture, datasets)]
        for source in sources:
            for bag in sorted(set(schedule.bags())):
                check_window(source.stream, B, method.window_length(L, bag, cfg.tst.mode))
        val_windows = {source.name: torch.cat(validation_windows(ds.split("val"), B, L, cfg.eval.batches))
                       for source, ds in zip(sources, datasets)}
        # an unknown preset, a refused family, a vocabulary or tokenizer that does not fit: fail before writing
        model = build_model(cfg.model.build_config(data.vocab_size), device="meta")
        check_fits(model, resolve_device(cfg.train.device), world_size, cfg.train.parallel == "fsdp")
        cfg.model.check_tokenizer(data.tokenizer, data.path)
        return cls(data, schedule, sources, val_windows, model, mixed=bool(cfg.data.sources), datasets=datasets)

    def verify(self, info: DistInfo) -> None:
        """Check the shards' sha256 once per job: each rank hashes its share (none that a restart finds unchanged),
        every rank judges all of them (data/shards.py, TokenDataset.verify)."""
        share = Share(info.rank, info.world_size, lambda part: merge_across_ranks(part, info))
        for dataset in self.datasets:
            dataset.verify(share)


def train(cfg: RunConfig, resume: bool | str | Path = False, progress: bool = True,
          callbacks: Sequence[Callback] = ()) -> RunResult:
    """Run (or resume) a training run described by ``cfg``; returns where it is and how it ended.

    ``resume``: ``True`` continues from the run folder's newest checkpoint, or starts the run when it has none yet
    (so one command serves the first start and every restart); a path resumes from that checkpoint. Under torchrun
    every rank calls this; rank 0 alone writes files and shows progress, and holds the run folder's lock.
    ``callbacks`` run after the run's own (train/callbacks.py), in order; under torchrun give every rank the same.
    """
    world = torchrun_env().world_size
    inputs = RunInputs.open(cfg, cfg.validate(world), world)
    _find_checkpoint(cfg, resume)  # refuse bad input before the process group and the lock exist
    info, device = init_distributed(cfg.train.device)
    if device.type == "cuda" and not info.enabled and cfg.train.parallel == "fsdp":
        init_one_rank_group(device)  # FSDP2 on one GPU too: bf16 compute over fp32 master weights
    try:
        with ExitStack() as stack:
            inputs.verify(info)  # before anything is written; every rank raises the same one-line error
            refused = None
            if info.is_main:
                try:
                    stack.enter_context(FolderLock(cfg.run_dir, "run folder"))
                except SuperposeError as e:
                    refused = e
            if any_rank(refused is not None, info):
                raise refused or SuperposeError(f"run folder {cfg.run_dir} is in use by another process")
            checkpoint = _find_checkpoint(cfg, resume)  # again, now that no other writer can add one
            trainer = Trainer(cfg, inputs, checkpoint, info, device, progress, callbacks)
            if resume is True and checkpoint is None:
                trainer.console.say(f"--resume: {cfg.run_dir} holds no checkpoint yet; starting the run from step 0")
            result = trainer.fit()
            del trainer  # the wrapped model (DDP's reducer holds the group) goes before the group does
            return result
    finally:
        shutdown()


def _find_checkpoint(cfg: RunConfig, resume: bool | str | Path) -> Path | None:
    """The checkpoint to resume from, None to start afresh; a fresh start into a folder holding a run is refused.
    A run with ``checkpoint.fork_from`` starts from that checkpoint until it has one of its own."""
    if resume is True:
        found = list_checkpoints(cfg.run_dir)
        return found[-1] if found else _fork_source(cfg)
    if resume:
        return resolve_checkpoint(Path(resume))
    if list_checkpoints(cfg.run_dir):
        raise SuperposeError(f"run folder {cfg.run_dir} already holds a run; pass --resume to continue it or "
                             f"choose another name")
    return _fork_source(cfg)


def _fork_source(cfg: RunConfig) -> Path | None:
    """``checkpoint.fork_from``, which must be complete: a fork started before its source exists is refused."""
    if not cfg.checkpoint.fork_from:
        return None
    source = Path(cfg.checkpoint.fork_from)
    if not source.is_dir():  # renamed into place complete: reading it verifies it
        raise SuperposeError(f"checkpoint.fork_from: {source} does not exist yet; start this run once the run that "
                             f"writes it has passed that step")
    return source


class Trainer:
    """One run: the model, optimizer, loader and state, built (or restored) once; ``fit`` is the step sequence and
    ``callbacks`` (:func:`run_callbacks`, then the caller's) are everything that happens around it."""

    def __init__(self, cfg: RunConfig, inputs: RunInputs, checkpoint: Path | None, info: DistInfo,
                 device: torch.device, progress: bool, callbacks: Sequence[Callback] = ()):
        self.cfg, self.inputs, self.info, self.device = cfg, inputs, info, device
        self.schedule, self.resumed = inputs.schedule, checkpoint is not None
        self.module = TrainModule(cfg, inputs.data.vocab_size, device, info, init=checkpoint is None,
                                  model=inputs.model)
        self.step_flops = flops_per_step(self.module.model.config, cfg.train.batch_size, cfg.train.seq_len)
        self.state = TrainState() if checkpoint is None else resume_checkpoint(
            checkpoint, self.module.model, self.module.optimizer, cfg.to_dict(), info)
        self.batches = Prefetcher(_open_loader(cfg, inputs, info, self.state.loader), device)
        self.console = Console(cfg.name, cfg.train.steps, self.state.step, progress, info.is_main)
        self.evaluator = Evaluator(self.module, inputs.val_windows, {s.name: s.weight for s in inputs.sources},
                                   inputs.mixed, cfg.eval.every, cfg.train.steps, self.console)
        self.callbacks = run_callbacks(self) + list(callbacks)
        self.config_files = {"config.toml": cfg.to_toml(), "config.json": self.module.model.config.to_json_string()}
        self.background = background_checkpoints(cfg.checkpoint.async_, self.module.model, info, device,
                                                 self._checkpointed)
        self._wall0, self.saved_at = time.perf_counter() - self.state.wall_time, -1

    def fit(self) -> RunResult:
        """Train to the end (or ``train.stop_at``), or until a stop request (then with a checkpoint)."""
        _write_run_files(self)
        stopped, end = None, self.cfg.train.stop_at or self.cfg.train.steps
        with _running(self) as (signals, tick):
            for step in range(self.state.step, end):
                self._step(step)
                tick()
                # the ranks agree once per step, over the host network: a stop needs this step's checkpoint
                if any_rank(signals.received is not None, self.info) and self.state.step < end:
                    stopped = _stop(self, signals)
                    break
        return _run_result(self, stopped)

    def _step(self, step: int) -> None:
        """Optimizer step ``step`` through the callbacks: pre_step, the update, post_step, the row where one is
        wanted (the one read-back from the device), end_step."""
        for callback in self.callbacks:
            callback.pre_step(step)
        cfg, schedule = self.cfg, self.schedule
        bag, lr = schedule.bag_at(step), _lr(cfg, schedule, step)
        window = self.batches.get(_window_len(cfg, schedule, step), _window_len(cfg, schedule, step + 1))
        result = self.module.train_step(window, bag, lr)
        self.state.advance(cfg.train.batch_size * window.shape[1], self.step_flops, time.perf_counter() - self._wall0)
        self.state.loader, done = self.batches.state_dict(), self.state.step
        for callback in self.callbacks:
            callback.post_step(done, result)
        if self.is_logged(done):
            row = _row(self, step, bag, lr, result)
            for callback in self.callbacks:
                callback.log_metrics(row)
        kill_point("step", done)
        for callback in self.callbacks:
            callback.end_step(done)

    def is_logged(self, done: int) -> bool:
        """Steps that read numbers back from the device: those some callback wants a row on."""
        return any(callback.wants_row(done) for callback in self.callbacks)

    def checkpoint(self, keep_always: bool, wait: bool = False) -> Path:
        """A checkpoint of the current step (every rank takes part); ``post_checkpoint`` once it is complete: at once,
        or (``checkpoint.async``) when waited for (``wait``, the next checkpoint, a stop, the end of the run)."""
        done, s = self.state.step, self.schedule
        meta = {"keep_always": keep_always, "phase": s.stage_at(done - 1) + 1, "bag": s.bag_at(done - 1)}
        path = save_checkpoint(self.cfg.run_dir, self.module.model, self.module.optimizer,
                               {**self.state.state_dict(), **meta}, self.config_files, self.cfg.checkpoint.keep,
                               self.info, self.background)
        self.saved_at = done
        if self.background is None:
            self._checkpointed(path)
        elif wait:
            self.background.wait()
        return path

    def _checkpointed(self, path: Path) -> None:
        for callback in self.callbacks:
            callback.post_checkpoint(path)


def _stop(trainer: Trainer, signals: StopSignals) -> str:
    """A stop every rank agreed on: this step's checkpoint, complete before the process ends; returns the signal."""
    stopped = signals.name or "SIGTERM"  # or another rank's signal (SLURM sends SIGTERM)
    if trainer.saved_at != trainer.state.step:
        trainer.checkpoint(keep_always=False)
    if trainer.background is not None:
        trainer.background.wait()
    trainer.console.say(f"{stopped}: stopped after step {trainer.state.step} with a checkpoint; continue with --resume")
    return stopped


@contextmanager
def _running(trainer: Trainer) -> Iterator[tuple[StopSignals, Callable[[], None]]]:
    """What a run holds open while it trains (closed however it ends): the prefetch thread, the callbacks, the
    signal handlers and the profiler; the callbacks' ``pre_train`` once all are in place."""
    with ExitStack() as stack:
        stack.callback(trainer.batches.close)
        for callback in trainer.callbacks:
            stack.callback(callback.close)
        signals = stack.enter_context(StopSignals())
        tick = stack.enter_context(profile_steps(trainer.cfg.train.profile_steps, trainer.cfg.run_dir / "profile"))
        if trainer.background is not None:  # the end of the run waits for the checkpoint in flight
            stack.enter_context(trainer.background)
        for callback in trainer.callbacks:
            callback.pre_train()
        yield signals, tick


def _row(trainer: Trainer, step: int, bag: int, lr: float, result: StepResult) -> Row:
    """The step's own numbers, read back in one transfer; the callbacks add theirs (throughput, validation, ...)."""
    metrics = result.to_host()
    del metrics["finite"]  # the non-finite policy reads its own counts
    s = trainer.state
    return {"step": s.step, "phase": trainer.schedule.stage_at(step) + 1, "bag": bag, "lr": lr,
            "train_loss": metrics.pop("loss"), **metrics, "text_tokens": s.text_tokens, "flops": s.flops,
            "wall_time": s.wall_time, "world_size": trainer.info.world_size, "epoch": trainer.batches.epoch}


def _open_loader(cfg: RunConfig, inputs: RunInputs, info: DistInfo, position: dict) -> WindowLoader | MixtureLoader:
    """This rank's rows of every global batch, from ``position`` (a checkpoint's, or empty for a fresh start)."""
    local = cfg.local_batch_size(info.world_size)
    rows = range(info.rank * local, (info.rank + 1) * local)
    loader = (MixtureLoader(inputs.sources, cfg.train.batch_size, cfg.seed, rows) if inputs.mixed
              else WindowLoader(inputs.sources[0].stream, cfg.train.batch_size, cfg.seed, rows=rows))
    if position:
        loader.load_state_dict(position)
    return loader


def _window_len(cfg: RunConfig, schedule: PhaseSchedule, step: int) -> int | None:
    """Tokens per row that step ``step`` reads; None past the last step (nothing to read ahead)."""
    if step >= cfg.train.steps:
        return None
    return method.window_length(cfg.train.seq_len, schedule.bag_at(step), cfg.tst.mode)


def _lr(cfg: RunConfig, schedule: PhaseSchedule, step: int) -> float:
    o = cfg.optim
    return lr_at(step, cfg.train.steps, peak=o.lr, schedule=o.lr_schedule, warmup_steps=o.warmup_steps,
                 decay_fraction=o.decay_fraction, min_ratio=o.min_lr_ratio) * rewarmup_factor(
        step, schedule.switch_steps(), cfg.tst.rewarmup_steps)


def _run_result(trainer: Trainer, stopped: str | None) -> RunResult:
    """Where the run is and how it ended; a mixture's data accounting said once at the end."""
    state, evaluator, sources = trainer.state, trainer.evaluator, source_counts(trainer.state.loader)
    if trainer.resumed and math.isnan(evaluator.last):  # resumed a finished run: report its last validation
        evaluator.evaluate()
    if sources:
        trainer.console.say("data read: " + ", ".join(
            f"{name} {c['tokens']:,} text tokens ({c['tokens'] / max(1, state.text_tokens):.1%}, "
            f"{c['windows']:,} windows, {c['epoch']} passes)" for name, c in sources.items()))
    return RunResult(trainer.cfg.run_dir, state.step, evaluator.last, state.text_tokens, state.wall_time, stopped,
                     sources)


def run_callbacks(trainer: Trainer) -> list[Callback]:
    """The run's own callbacks, in the order they see a step: throughput first (its window closes at the
    read-back), the row's other parts, the lines and sinks that report it, the checkpoint cadence last."""
    t, cfg, total = trainer, trainer.cfg, trainer.cfg.train.steps
    switches = set(t.schedule.switch_steps())
    resume_step = t.state.step if t.resumed else None
    writer = (lambda: MetricsWriter(cfg.run_dir, resume_step=resume_step, log=cfg.log, config=cfg.to_dict())
              ) if t.info.is_main else None
    return [
        Throughput(t.state, cfg.train.batch_size, cfg.train.seq_len, t.module.model.config, t.device,
                   t.info.world_size),
        *([SourceCounts(t.state)] if t.inputs.mixed else []),
        NonFinitePolicy(cfg.train.nonfinite, cfg.train.max_skips, t.state, t.device, t.console,
                        partial(t.checkpoint, wait=True)),  # its error names the checkpoint: complete first
        EpochLine(t.batches, t.console),
        t.evaluator,
        PhaseSwitchLine(switches, t.console),
        MetricsLog(cfg.train.log_every, total, writer),
        ConsoleProgress(t.console),
        CheckpointCadence(cfg.checkpoint.every, switches, total, {*cfg.checkpoint.keep_steps, cfg.train.stop_at} - {0},
                          t.checkpoint),
        *([CollectiveTimeout(cfg.train.collective_timeout)] if cfg.train.collective_timeout else []),
        *([GarbageCollection(cfg.train.gc_every)] if cfg.train.gc_every else []),
    ]


def _write_run_files(trainer: Trainer) -> None:
    """The run folder is self-contained: resolved config, model config, tokenizer and what the run is."""
    cfg, info, inputs, schedule = trainer.cfg, trainer.info, trainer.inputs, trainer.schedule
    if info.is_main:
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        for name, text in trainer.config_files.items():
            write_atomic(run_dir / name, text)
        inputs.data.tokenizer.save(str(run_dir / "tokenizer.json"))
        total, active = parameter_counts(trainer.module.model)
        model = trainer.module.model
        write_atomic(run_dir / "run.json", json.dumps({
            "preset": cfg.model.preset or None, "model": cfg.model.describe(), "family": model.config.model_type,
            "vocab_size": inputs.data.vocab_size, "parameters": total, "active_parameters": active,
            "flops_per_step": trainer.step_flops, "device": str(trainer.device), "world_size": info.world_size,
            "parallel": cfg.train.parallel if info.enabled else None,
            "stages": [{"bag": st.bag, "end_step": end} for st, end in zip(schedule.stages, schedule.ends)],
        } | ({"sources": [{"name": s.name, "path": str(s.stream.dataset_path), "weight": s.weight}
                          for s in inputs.sources]} if inputs.mixed else {}), indent=2))
    barrier(info)
