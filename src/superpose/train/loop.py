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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import method
from ..data.loader import WindowLoader, check_window, validation_windows
from ..data.mixture import MixtureLoader, Source, open_sources, source_counts
from ..data.shards import TokenDataset
from ..errors import SuperposeError, TrainingStopped
from ..files import FolderLock, write_atomic
from ..flops import flops_per_step, mfu
from ..models import build_model, parameter_counts
from ..schedule import PhaseSchedule, lr_at, rewarmup_factor
from .checkpoint import list_checkpoints, load_checkpoint, remove_partial_checkpoints, resolve_checkpoint, save_checkpoint
from .config import RunConfig
from .console import Console
from .distributed import DistInfo, any_rank, barrier, init_distributed, init_one_rank_group, shutdown, torchrun_env
from .faults import StopSignals, kill_point
from .metrics import MetricsWriter
from .state import TrainState
from .step import Prefetcher, StepInterrupted, StepResult, TrainModule, profile_steps


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
    mixed: bool = False

    @classmethod
    def open(cls, cfg: RunConfig, world_size: int) -> "RunInputs":
        mixture = cfg.data.mixture()
        datasets = open_sources([path for _, path, _ in mixture], tokenizer=cfg.data.tokenizer or None)
        data = datasets[0]
        schedule = cfg.phase_schedule()
        L, B = cfg.train.seq_len, cfg.train.batch_size
        sources = [Source(name, weight, ds.split("train")) for (name, _, weight), ds in zip(mixture, datasets)]
        for source in sources:
            for bag in sorted(set(schedule.bags())):
                check_window(source.stream, B, method.window_length(L, bag, cfg.tst.mode))
        val_windows = {source.name: torch.cat(validation_windows(ds.split("val"), B, L, cfg.eval.batches))
                       for source, ds in zip(sources, datasets)}
        # an unknown preset, a refused family, a vocabulary or tokenizer that does not fit: fail before writing
        build_model(cfg.model.build_config(data.vocab_size), device="meta")
        cfg.model.check_tokenizer(data.tokenizer, data.path)
        return cls(data, schedule, sources, val_windows, mixed=bool(cfg.data.sources))


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
    if device.type == "cuda" and not info.enabled and cfg.train.parallel == "fsdp":
        init_one_rank_group(device)  # FSDP2 on one GPU too: bf16 compute over fp32 master weights
    try:
        with ExitStack() as stack:
            refused = None
            if info.is_main:
                try:
                    stack.enter_context(FolderLock(cfg.run_dir, "run folder"))
                except SuperposeError as e:
                    refused = e
            if any_rank(refused is not None, info):
                raise refused or SuperposeError(f"run folder {cfg.run_dir} is in use by another process")
            checkpoint = _find_checkpoint(cfg, resume)  # again, now that no other writer can add one
            trainer = Trainer(cfg, inputs, checkpoint, info, device, progress)
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
    if not (source / "state.json").is_file():
        raise SuperposeError(f"checkpoint.fork_from: {source} does not exist yet; start this run once the run that "
                             f"writes it has passed that step")
    return source


class Evaluator:
    """Validation loss on the fixed held-out windows: every ``eval.every`` steps and always after the last step.

    A mixture scores each source's own windows (``val_loss/<name>``); its ``val_loss`` is their mean weighted by the
    mixture weights: the expected loss under the training mixture, whatever the sizes of the validation splits.
    """

    def __init__(self, module: TrainModule, windows: dict[str, torch.Tensor], weights: dict[str, float],
                 per_source: bool, every: int, total: int):
        self.module, self.windows, self.weights, self.per_source = module, windows, weights, per_source
        self.every, self.total = every, total
        self.last = math.nan

    def due(self, done: int, finite: bool) -> bool:
        # the last step always evaluates: after a skipped update the weights are the last good ones
        return (finite and self.every > 0 and done % self.every == 0) or done == self.total

    def __call__(self) -> dict[str, float]:
        """The metrics of one validation: ``val_loss``, and per source for a mixture."""
        losses = {name: self.module.eval_loss(windows) for name, windows in self.windows.items()}
        self.last = sum(self.weights[name] * loss for name, loss in losses.items()) / sum(self.weights.values())
        return {"val_loss": self.last} | ({f"val_loss/{name}": loss for name, loss in losses.items()}
                                          if self.per_source else {})


class NonFinitePolicy:
    """What skipped updates (non-finite loss or gradient) lead to: carry on, or stop after a checkpoint.

    The optimizer skips a bad update on the device; the counts are kept there too and read back only on logged
    steps (``sync``), so a "stop" takes effect at the first logged step after the bad one (every step at
    ``train.log_every = 1``). The weights are the last good ones either way: no bad update ever lands.
    """

    def __init__(self, policy: str, max_skips: int, state: TrainState, device: torch.device):
        self.policy, self.max_skips, self.state = policy, max_skips, state
        self._in_row = torch.tensor(state.skipped_in_row, device=device)
        self._skipped = torch.tensor(state.skipped, device=device)
        self._skipped_at_sync = state.skipped

    def record(self, finite: torch.Tensor) -> None:
        bad = (~finite).long()
        self._in_row = (self._in_row + 1) * bad
        self._skipped = self._skipped + bad

    def sync(self) -> None:
        """Read the counts back into the train state (a host-device sync: logged steps only)."""
        self.state.skipped_in_row, self.state.skipped = int(self._in_row), int(self._skipped)

    def must_stop(self) -> bool:
        new, self._skipped_at_sync = self.state.skipped > self._skipped_at_sync, self.state.skipped
        return (self.policy == "stop" and new) or self.state.skipped_in_row >= self.max_skips

    def reason(self, done: int) -> str:
        return (f"non-finite loss or gradient by step {done} ({self.state.skipped_in_row} in a row, "
                f"{self.state.skipped} in all, policy {self.policy})")


class StopRequest:
    """SIGTERM/SIGINT turned into a stop, agreed by every rank over the host network (no device sync): asked after
    every step and between micro-batches, so a long step can be abandoned for a prompt checkpoint."""

    def __init__(self, signals: StopSignals, info: DistInfo):
        self.signals, self.info = signals, info

    def requested(self) -> bool:
        return any_rank(self.signals.received is not None, self.info)

    @property
    def name(self) -> str:
        return self.signals.name or "SIGTERM"


class CheckpointCadence:
    """Phase switches, ``checkpoint.keep_steps`` and the last step keep their checkpoint forever;
    ``checkpoint.every`` and a stop write periodic ones (pruned to the newest ``checkpoint.keep``)."""

    def __init__(self, every: int, switches: set[int], total: int, keep_steps: set[int] = frozenset()):
        self.every, self.switches, self.total, self.keep_steps = every, switches, total, keep_steps

    def kind(self, done: int, stop: bool) -> str | None:
        if done in self.switches or done in self.keep_steps or done == self.total:
            return "keep"
        if stop or (self.every and done % self.every == 0):
            return "periodic"
        return None


class Throughput:
    """Step time and tokens/s over the steps since the last logged one: only a logged step waits for the device,
    so only there does wall time measure the device's work."""

    def __init__(self, state: TrainState):
        self.state = state
        self._mark = (time.perf_counter(), state.step, state.text_tokens)

    def since_last(self) -> tuple[float, int, int]:
        """Seconds, steps and text tokens since the previous call (or the start)."""
        t, step, tokens = self._mark
        self._mark = (time.perf_counter(), self.state.step, self.state.text_tokens)
        return self._mark[0] - t, self.state.step - step, self.state.text_tokens - tokens


class Trainer:
    """One run: the model, optimizer, loader and state, built (or restored) once; ``fit`` trains to the end."""

    def __init__(self, cfg: RunConfig, inputs: RunInputs, checkpoint: Path | None, info: DistInfo,
                 device: torch.device, progress: bool):
        self.cfg, self.inputs, self.info, self.device = cfg, inputs, info, device
        self.schedule = inputs.schedule
        self.module = TrainModule(cfg, inputs.data.vocab_size, device, info, init=checkpoint is None)
        self.model = self.module.model
        self.step_flops = flops_per_step(self.model.config, cfg.train.batch_size, cfg.train.seq_len)
        self.parameters = parameter_counts(self.model)
        local = cfg.local_batch_size(info.world_size)
        rows = range(info.rank * local, (info.rank + 1) * local)
        self.loader = (MixtureLoader(inputs.sources, cfg.train.batch_size, cfg.seed, rows) if inputs.mixed
                       else WindowLoader(inputs.sources[0].stream, cfg.train.batch_size, cfg.seed, rows=rows))
        self.state = TrainState()
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            saved = load_checkpoint(checkpoint, self.model, self.module.optimizer, info)
            self.state = TrainState.from_state_dict(saved, f"checkpoint {checkpoint}")
            self.loader.load_state_dict(self.state.loader)
        self.batches = Prefetcher(self.loader, device)
        self.console = Console(cfg.name, cfg.train.steps, self.state.step, progress, info.is_main)
        self.evaluator = Evaluator(self.module, inputs.val_windows, {s.name: s.weight for s in inputs.sources},
                                   inputs.mixed, cfg.eval.every, cfg.train.steps)
        self.policy = NonFinitePolicy(cfg.train.nonfinite, cfg.train.max_skips, self.state, device)
        self.cadence = CheckpointCadence(cfg.checkpoint.every, set(self.schedule.switch_steps()), cfg.train.steps,
                                         set(cfg.checkpoint.keep_steps))
        self.throughput = Throughput(self.state)
        self.config_files = {"config.toml": cfg.to_toml(), "config.json": self.model.config.to_json_string()}
        self._wall0 = time.perf_counter() - self.state.wall_time

    def fit(self) -> RunResult:
        """Train from the current step to the end, or until a stop request (then with a checkpoint)."""
        cfg, state = self.cfg, self.state
        self._write_run_files()
        writer = MetricsWriter(cfg.run_dir, resume_step=state.step if self.resumed else None, log=cfg.log,
                               config=cfg.to_dict()) if self.info.is_main else None
        stopped = None
        try:
            with StopSignals() as signals, profile_steps(cfg.train.profile_steps, cfg.run_dir / "profile") as tick:
                stop = StopRequest(signals, self.info)
                for step in range(state.step, cfg.train.steps):
                    finished = self._train_one(step, stop.requested, writer)
                    tick()
                    stopping = not finished or stop.requested()
                    kind = self.cadence.kind(state.step, stopping) if finished else None
                    if kind is not None:
                        self._snapshot(keep_always=kind == "keep")
                    if stopping and state.step < cfg.train.steps:
                        stopped = stop.name
                        self.console.say(f"{stopped}: stopped after step {state.step} with a checkpoint; "
                                         f"continue with --resume")
                        break
        finally:
            self.batches.close()
            self.console.close()
            if writer is not None:
                writer.close()
        if self.resumed and math.isnan(self.evaluator.last):  # resumed a finished run: report its last validation
            self.evaluator()
        sources = source_counts(state.loader)
        if sources:
            self.console.say("data read: " + ", ".join(
                f"{name} {c['tokens']:,} text tokens ({c['tokens'] / max(1, state.text_tokens):.1%}, "
                f"{c['windows']:,} windows, {c['epoch']} passes)" for name, c in sources.items()))
        return RunResult(cfg.run_dir, state.step, self.evaluator.last, state.text_tokens, state.wall_time, stopped,
                         sources)

    def _train_one(self, step: int, should_stop: Callable[[], bool], writer: MetricsWriter | None) -> bool:
        """Train optimizer step ``step``: read, step, account; on logged steps read back, evaluate and report.

        Returns False when a stop request arrived between micro-batches: the step was abandoned with weights and
        optimizer untouched, and the checkpoint of the step before (loader position before this batch) is written.
        """
        cfg, state = self.cfg, self.state
        bag, lr, before, epoch = self.schedule.bag_at(step), self._lr(step), self.batches.state_dict(), self.batches.epoch
        window = self.batches.get(self._window_len(step), self._window_len(step + 1))
        try:
            result = self.module.train_step(window, bag, lr, should_stop=should_stop)
        except StepInterrupted:
            state.loader = before
            self._snapshot(keep_always=False)
            return False
        state.advance(cfg.train.batch_size * window.shape[1], self.step_flops, time.perf_counter() - self._wall0)
        state.loader = self.batches.state_dict()
        self.policy.record(result.finite)
        if not self._is_logged(state.step):
            self.console.progress_only(state.step)
            kill_point("step", state.step)
            return True
        row = self._row(step, bag, lr, result)
        if self.evaluator.due(state.step, "skipped" not in row):
            row.update(self.evaluator())
        self._report(row, epoch, writer)
        kill_point("step", state.step)
        if self.policy.must_stop():
            path = self._snapshot(keep_always=True)
            raise TrainingStopped(f"{self.policy.reason(state.step)}; the last good weights are in {path}")
        return True

    def _window_len(self, step: int) -> int | None:
        """Tokens per row that step ``step`` reads; None past the last step (nothing to read ahead)."""
        if step >= self.cfg.train.steps:
            return None
        return method.window_length(self.cfg.train.seq_len, self.schedule.bag_at(step), self.cfg.tst.mode)

    def _is_logged(self, done: int) -> bool:
        """Steps that read numbers back from the device: log, eval, checkpoint, switch and last steps."""
        c = self.cfg
        return (done % c.train.log_every == 0 or done == c.train.steps or done in self.cadence.switches
                or done - 1 in self.cadence.switches or (c.eval.every > 0 and done % c.eval.every == 0)
                or (c.checkpoint.every > 0 and done % c.checkpoint.every == 0) or done in self.cadence.keep_steps)

    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(step, self.cfg.train.steps, peak=o.lr, schedule=o.lr_schedule, warmup_steps=o.warmup_steps,
                     decay_fraction=o.decay_fraction, min_ratio=o.min_lr_ratio) * rewarmup_factor(
            step, self.schedule.switch_steps(), self.cfg.tst.rewarmup_steps)

    def _row(self, step: int, bag: int, lr: float, result: StepResult) -> dict[str, Any]:
        """The metrics row of the step just trained (what metrics.jsonl, TensorBoard and W&B receive): the one
        place a step's numbers are read back from the device."""
        metrics = result.to_host()
        finite = bool(metrics.pop("finite"))
        self.policy.sync()
        seconds, steps, tokens = self.throughput.since_last()
        s, cfg = self.state, self.cfg
        row = {"step": s.step, "phase": self.schedule.stage_at(step) + 1, "bag": bag, "lr": lr,
               "train_loss": metrics.pop("loss"), **metrics, "text_tokens": s.text_tokens, "flops": s.flops,
               "wall_time": s.wall_time, "step_time": seconds / steps, "tokens_per_s": tokens / seconds,
               "positions_per_s": cfg.train.batch_size * cfg.train.seq_len * steps / seconds,
               "epoch": self.batches.epoch}
        for name, counts in source_counts(s.loader).items():  # a mixture's exact accounting, per source
            row |= {f"text_tokens/{name}": counts["tokens"], f"share/{name}": counts["tokens"] / s.text_tokens,
                    f"windows/{name}": counts["windows"], f"epoch/{name}": counts["epoch"]}
        if self.device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            utilisation = mfu(self.step_flops * steps, seconds, torch.cuda.get_device_name(self.device),
                              devices=self.info.world_size)
            if utilisation is not None:
                row["mfu"] = utilisation
        if not finite:
            row.update(skipped=1, skipped_total=s.skipped)
        return row

    def _report(self, row: dict[str, Any], epoch_before: int, writer: MetricsWriter | None) -> None:
        """Write the row and tell the user what changed: a skipped update, a new epoch, a validation, a switch."""
        done = row["step"]
        if "skipped" in row:
            self.console.say(f"step {done}: non-finite loss or gradient, update skipped "
                             f"({self.state.skipped_in_row} in a row)")
        if row["epoch"] != epoch_before:
            self.console.say(f"step {done}: epoch {epoch_before} of the training data complete, starting epoch "
                             f"{row['epoch']}")
        if "val_loss" in row:
            self.console.say(f"step {done}: validation loss {row['val_loss']:.4f}")
        self.console.phase_change(row, self.cadence.switches)
        if writer is not None:
            writer.write(row)
        self.console.progress(row)

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
                "preset": cfg.model.preset or None, "model": cfg.model.describe(),
                "family": self.model.config.model_type, "vocab_size": self.inputs.data.vocab_size, "parameters": total,
                "active_parameters": active, "flops_per_step": self.step_flops, "device": str(self.device),
                "world_size": info.world_size, "parallel": cfg.train.parallel if info.enabled else None,
                "stages": [{"bag": st.bag, "end_step": end} for st, end in zip(self.schedule.stages, self.schedule.ends)],
            } | ({"sources": [{"name": s.name, "path": str(s.stream.dataset_path), "weight": s.weight}
                              for s in self.inputs.sources]} if self.inputs.mixed else {}), indent=2))
        barrier(info)
