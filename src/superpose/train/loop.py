"""The training loop: bookkeeping only. The schedule picks the bag, the loader reads the window, the TrainModule steps.

Everything that can be wrong with the inputs (config, data, windows that do not fit, an existing run folder) is
checked before the first byte is written. The parts a step goes through (evaluation, the metrics row, the
non-finite policy, the stop request, the checkpoint cadence) are small classes below, each readable on its own;
``Trainer.fit`` is the list of what happens in a step.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import method
from ..data.loader import WindowLoader, check_window, validation_windows
from ..data.shards import TokenDataset, TokenStream, open_dataset
from ..errors import SuperposeError, TrainingStopped
from ..files import FolderLock, write_atomic
from ..flops import flops_per_step
from ..models import build_model, model_config, parameter_counts
from ..schedule import PhaseSchedule, lr_at, rewarmup_factor
from .checkpoint import list_checkpoints, load_checkpoint, remove_partial_checkpoints, resolve_checkpoint, save_checkpoint
from .config import RunConfig
from .console import Console
from .distributed import DistInfo, any_rank, barrier, init_distributed, shutdown, torchrun_env
from .faults import StopSignals, kill_point
from .metrics import MetricsWriter
from .state import TrainState
from .step import TrainModule


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_val_loss: float
    text_tokens: int
    wall_time: float
    stopped: str | None = None
    """The signal (SIGTERM, SIGINT) that stopped the run early, after its checkpoint; None when it ran to the end."""


@dataclass
class RunInputs:
    """What a run reads, opened and checked before anything is written."""

    data: TokenDataset
    schedule: PhaseSchedule
    train_stream: TokenStream
    val_windows: list[torch.Tensor]

    @classmethod
    def open(cls, cfg: RunConfig, world_size: int) -> "RunInputs":
        data = open_dataset(cfg.data.path, tokenizer=cfg.data.tokenizer or None)
        schedule = cfg.phase_schedule()
        L, B = cfg.train.seq_len, cfg.train.batch_size
        train_stream = data.split("train")
        for bag in sorted(set(schedule.bags())):
            check_window(train_stream, B, method.window_length(L, bag, cfg.tst.mode))
        val_windows = [w for batch in validation_windows(data.split("val"), B, L, cfg.eval.batches)
                       for w in batch.split(cfg.micro_batch_size(world_size))]  # the same at any world size
        model_config(cfg.model.preset, data.vocab_size, **cfg.model.overrides)  # unknown preset: fail before writing
        return cls(data, schedule, train_stream, val_windows)


def train(cfg: RunConfig, resume: bool | str | Path = False, progress: bool = True) -> RunResult:
    """Run (or resume) a training run described by ``cfg``; returns where it is and how it ended.

    ``resume``: ``True`` continues from the run folder's newest checkpoint, or starts the run when it has none yet
    (so one command serves the first start and every restart); a path resumes from that checkpoint. Under torchrun
    every rank calls this; rank 0 alone writes files and shows progress, and holds the run folder's lock.
    """
    world = torchrun_env().world_size
    cfg.validate(world)
    inputs = RunInputs.open(cfg, world)
    _find_checkpoint(cfg, resume)  # refuse bad input before the process group and the lock exist
    info, device = init_distributed(cfg.train.device)
    try:
        with ExitStack() as stack:
            refused = None
            if info.is_main:
                try:
                    stack.enter_context(FolderLock(cfg.run_dir, "run folder"))
                except SuperposeError as e:
                    refused = e
            if any_rank(refused is not None, info, device):
                raise refused or SuperposeError(f"run folder {cfg.run_dir} is in use by another process")
            checkpoint = _find_checkpoint(cfg, resume)  # again, now that no other writer can add one
            trainer = Trainer(cfg, inputs, checkpoint, info, device, progress)
            if resume is True and checkpoint is None:
                trainer.console.say(f"--resume: {cfg.run_dir} holds no checkpoint yet; starting the run from step 0")
            return trainer.fit()
    finally:
        shutdown()


def _find_checkpoint(cfg: RunConfig, resume: bool | str | Path) -> Path | None:
    """The checkpoint to resume from, None to start afresh; a fresh start into a folder holding a run is refused."""
    if resume is True:
        found = list_checkpoints(cfg.run_dir)
        return found[-1] if found else None
    if resume:
        return resolve_checkpoint(Path(resume))
    if list_checkpoints(cfg.run_dir):
        raise SuperposeError(f"run folder {cfg.run_dir} already holds a run; pass --resume to continue it or "
                             f"choose another name")
    return None


class Evaluator:
    """Validation loss on the fixed held-out windows: every ``eval.every`` steps and always after the last step."""

    def __init__(self, module: TrainModule, windows: list[torch.Tensor], every: int, total: int):
        self.module, self.windows, self.every, self.total = module, windows, every, total
        self.last = math.nan

    def due(self, done: int, finite: bool) -> bool:
        # the last step always evaluates: after a skipped update the weights are the last good ones
        return (finite and self.every > 0 and done % self.every == 0) or done == self.total

    def __call__(self) -> float:
        self.last = self.module.eval_loss(self.windows)
        return self.last


class NonFinitePolicy:
    """What a skipped update (non-finite loss or gradient) leads to: carry on, or stop after a checkpoint."""

    def __init__(self, policy: str, max_skips: int, state: TrainState):
        self.policy, self.max_skips, self.state = policy, max_skips, state

    def record(self, finite: bool) -> None:
        self.state.skipped_in_row = 0 if finite else self.state.skipped_in_row + 1
        self.state.skipped += not finite

    def must_stop(self, finite: bool) -> bool:
        return not finite and (self.policy == "stop" or self.state.skipped_in_row >= self.max_skips)

    def reason(self, done: int) -> str:
        return (f"non-finite loss or gradient at step {done} ({self.state.skipped_in_row} in a row, policy "
                f"{self.policy})")


class StopRequest:
    """SIGTERM/SIGINT turned into a stop after the current step, agreed by every rank (one all-reduce per step)."""

    def __init__(self, signals: StopSignals, info: DistInfo, device: torch.device):
        self.signals, self.info, self.device = signals, info, device

    def requested(self) -> bool:
        return any_rank(self.signals.received is not None, self.info, self.device)

    @property
    def name(self) -> str:
        return self.signals.name or "SIGTERM"


class CheckpointCadence:
    """Phase switches and the last step keep their checkpoint forever; ``checkpoint.every`` and a stop write
    periodic ones (pruned to the newest ``checkpoint.keep``)."""

    def __init__(self, every: int, switches: set[int], total: int):
        self.every, self.switches, self.total = every, switches, total

    def kind(self, done: int, stop: bool) -> str | None:
        if done in self.switches or done == self.total:
            return "keep"
        if stop or (self.every and done % self.every == 0):
            return "periodic"
        return None


def _host(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metric values as plain numbers (tensors are read back here, only on the steps that log them)."""
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


class Trainer:
    """One run: the model, optimizer, loader and state, built (or restored) once; ``fit`` trains to the end."""

    def __init__(self, cfg: RunConfig, inputs: RunInputs, checkpoint: Path | None, info: DistInfo,
                 device: torch.device, progress: bool):
        self.cfg, self.inputs, self.info, self.device = cfg, inputs, info, device
        self.schedule = inputs.schedule
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model.preset, inputs.data.vocab_size, seed=cfg.seed, device=device,
                                 **cfg.model.overrides)
        self.step_flops = flops_per_step(self.model.config, cfg.train.batch_size, cfg.train.seq_len)
        self.parameters = parameter_counts(self.model)
        self.module = TrainModule(self.model, cfg, device, info)
        local = cfg.local_batch_size(info.world_size)
        self.loader = WindowLoader(inputs.train_stream, cfg.train.batch_size, cfg.seed,
                                   lanes=range(info.rank * local, (info.rank + 1) * local))
        self.state = TrainState()
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            saved = load_checkpoint(checkpoint, self.model, self.module.optimizer, info)
            self.state = TrainState.from_state_dict(saved, f"checkpoint {checkpoint}")
            self.loader.load_state_dict(self.state.loader)
        self.console = Console(cfg.name, cfg.train.steps, self.state.step, progress, info.is_main)
        self.evaluator = Evaluator(self.module, inputs.val_windows, cfg.eval.every, cfg.train.steps)
        self.policy = NonFinitePolicy(cfg.train.nonfinite, cfg.train.max_skips, self.state)
        self.cadence = CheckpointCadence(cfg.checkpoint.every, set(self.schedule.switch_steps()), cfg.train.steps)
        self.config_files = {"config.toml": cfg.to_toml(), "config.json": self.model.config.to_json_string()}

    def fit(self) -> RunResult:
        cfg, state = self.cfg, self.state
        self._write_run_files()
        writer = MetricsWriter(cfg.run_dir, resume_step=state.step if self.resumed else None, log=cfg.log,
                               config=cfg.to_dict()) if self.info.is_main else None
        wall0 = time.perf_counter() - state.wall_time
        stopped = None
        try:
            with StopSignals() as signals:
                stop = StopRequest(signals, self.info, self.device)
                for step in range(state.step, cfg.train.steps):
                    bag, lr = self.schedule.bag_at(step), self._lr(step)
                    t0, epoch = time.perf_counter(), self.loader.epoch
                    window = self.loader.next_batch(method.window_length(cfg.train.seq_len, bag, cfg.tst.mode))
                    metrics = _host(self.module.train_step(window, bag, lr))
                    finite = metrics.pop("finite")
                    state.advance(cfg.train.batch_size * window.shape[1], self.step_flops, time.perf_counter() - wall0)
                    self.policy.record(finite)
                    state.loader = self.loader.state_dict()
                    row = self._row(step, bag, lr, metrics, window.shape[1], time.perf_counter() - t0, finite)
                    done = state.step
                    if self.evaluator.due(done, finite):
                        row["val_loss"] = self.evaluator()
                    self._report(row, epoch, writer)
                    kill_point("step", done)
                    if self.policy.must_stop(finite):
                        path = self._snapshot(keep_always=True)
                        raise TrainingStopped(f"{self.policy.reason(done)}; the last good weights are in {path}")
                    stopping = stop.requested()
                    kind = self.cadence.kind(done, stopping)
                    if kind is not None:
                        self._snapshot(keep_always=kind == "keep")
                    if stopping and done < cfg.train.steps:
                        stopped = stop.name
                        self.console.say(f"{stopped}: stopped after step {done} with a checkpoint; continue with --resume")
                        break
        finally:
            self.console.close()
            if writer is not None:
                writer.close()
        if self.resumed and math.isnan(self.evaluator.last):  # resumed a finished run: report its last validation
            self.evaluator()
        return RunResult(cfg.run_dir, state.step, self.evaluator.last, state.text_tokens, state.wall_time, stopped)

    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(step, self.cfg.train.steps, peak=o.lr, schedule=o.lr_schedule, warmup_steps=o.warmup_steps,
                     decay_fraction=o.decay_fraction, min_ratio=o.min_lr_ratio) * rewarmup_factor(
            step, self.schedule.switch_steps(), self.cfg.tst.rewarmup_steps)

    def _row(self, step: int, bag: int, lr: float, metrics: dict[str, Any], window_len: int, dt: float,
             finite: bool) -> dict[str, Any]:
        """The metrics row of the step just trained (what metrics.jsonl, TensorBoard and W&B receive)."""
        s, B = self.state, self.cfg.train.batch_size
        row = {"step": s.step, "phase": self.schedule.stage_at(step) + 1, "bag": bag, "lr": lr,
               "train_loss": metrics.pop("loss"), **metrics, "text_tokens": s.text_tokens, "flops": s.flops,
               "wall_time": s.wall_time, "step_time": dt, "tokens_per_s": B * window_len / dt,
               "positions_per_s": B * self.cfg.train.seq_len / dt, "epoch": self.loader.epoch}
        if self.device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if not finite:
            row.update(skipped=1, skipped_total=s.skipped)
        return row

    def _report(self, row: dict[str, Any], epoch_before: int, writer: MetricsWriter | None) -> None:
        """Write the row on log steps (and on eval, switch, skipped and last steps); tell the user what changed."""
        done, total = row["step"], self.cfg.train.steps
        switches = set(self.schedule.switch_steps())
        if "skipped" in row:
            self.console.say(f"step {done}: non-finite loss or gradient, update skipped "
                             f"({self.state.skipped_in_row} in a row)")
        if self.loader.epoch != epoch_before:
            self.console.say(f"step {done}: epoch {epoch_before} of the training data complete, starting epoch "
                             f"{self.loader.epoch}")
        if "val_loss" in row:
            self.console.say(f"step {done}: validation loss {row['val_loss']:.4f}")
        self.console.phase_change(row, switches)
        logged = (done % self.cfg.train.log_every == 0 or "val_loss" in row or "skipped" in row or done in switches
                  or done == total)
        if writer is not None and logged:
            writer.write(row)
        self.console.progress(row, logged)

    def _snapshot(self, keep_always: bool) -> Path:
        done = self.state.step
        meta = {"keep_always": keep_always, "phase": self.schedule.stage_at(done - 1) + 1,
                "bag": self.schedule.bag_at(done - 1)}
        return save_checkpoint(self.cfg.run_dir, self.model, self.module.optimizer,
                               {**self.state.state_dict(), **meta}, self.config_files, self.cfg.checkpoint.keep,
                               self.info)

    def _write_run_files(self) -> None:
        """The run folder is self-contained: resolved config, model config, tokenizer and what the run is."""
        cfg, info = self.cfg, self.info
        if info.is_main:
            run_dir = cfg.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(run_dir)
            for name, text in self.config_files.items():
                write_atomic(run_dir / name, text)
            self.inputs.data.tokenizer.save(str(run_dir / "tokenizer.json"))
            total, active = self.parameters
            write_atomic(run_dir / "run.json", json.dumps({
                "preset": cfg.model.preset, "vocab_size": self.inputs.data.vocab_size, "parameters": total,
                "active_parameters": active, "flops_per_step": self.step_flops, "device": str(self.device),
                "world_size": info.world_size, "parallel": cfg.train.parallel if info.enabled else None,
                "stages": [{"bag": st.bag, "end_step": end} for st, end in zip(self.schedule.stages, self.schedule.ends)],
            }, indent=2))
        barrier(info)
