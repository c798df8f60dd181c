"""The loop's hooks: every policy around a training step is a :class:`Callback`, readable on its own.

:class:`~.loop.Trainer` is the step sequence; evaluation, the checkpoint cadence, the non-finite policy, throughput,
the metrics row and what the console says are callbacks here, and a run can add its own
(``train(cfg, callbacks=[...])``). The protocol follows OLMo-core's ``Callback`` (``pre_step``, ``post_step``,
``log_metrics``, ``post_checkpoint``), with one addition the loop needs: each callback names the steps on which it
needs values read back from the device (:meth:`Callback.wants_row`). Those steps are the logged steps (one sync
each); on every other step the host runs ahead of the device.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from ..data.mixture import source_counts, weighted_mean
from ..errors import TrainingStopped
from ..flops import mfu_both
from .console import Console
from .distributed import set_collective_timeout
from .metrics import MetricsWriter
from .state import TrainState
from .step import Prefetcher, StepResult, TrainModule

Row = dict[str, Any]
"""A logged step's metrics: what metrics.jsonl, TensorBoard and W&B receive."""
SaveCheckpoint = Callable[[bool], Path]
"""Writes a checkpoint of the current step (``keep_always``) and returns its folder."""


class Callback:
    """A hook into the step sequence; every method is optional. Within a step the trainer calls, for each callback
    in its list order: ``pre_step``, then (after the update) ``post_step``, then on a logged step ``log_metrics``,
    then ``end_step``. A step is named by ``done``, the number of steps done after it (1-based)."""

    def wants_row(self, done: int) -> bool:
        """Whether this callback needs the metrics row (values read back from the device) after step ``done``."""
        return False

    def pre_train(self) -> None:
        """Once, when the run folder is ready and before the first step of this process."""

    def pre_step(self, step: int) -> None:
        """Before step ``step`` (0-based, the steps done so far) reads its batch."""

    def post_step(self, done: int, result: StepResult) -> None:
        """After every update, with its values still on the device: read nothing back here."""

    def log_metrics(self, row: Row) -> None:
        """On a logged step, with its row. A callback may add keys for those after it in the list."""

    def end_step(self, done: int) -> None:
        """Last in every step, after the row is written: checkpoints and policy stops go here."""

    def post_checkpoint(self, path: Path) -> None:
        """After a checkpoint is complete at ``path``: at once when written in place, or (``checkpoint.async``) once
        the next checkpoint, a stop or the end of the run has waited for it."""

    def close(self) -> None:
        """Once at the end of the run, however it ends."""


class Throughput(Callback):
    """Step time, tokens/s, positions/s and (on CUDA) MFU over a window of training steps only; peak memory.

    A window opens when a step starts after a logged step and closes at the next logged step's read-back, the
    only place the host has waited for the device. So it leaves out evaluation, checkpoint writes and the reporting
    of the rows, and it never holds the first step of the process (compilation, allocator and kernel warm-up; on
    CUDA that step is waited for once, so none of its device time runs into the next window). A logged row whose
    window holds no step (the first step of a process, when it logs) has no throughput keys.
    """

    def __init__(self, state: TrainState, batch_size: int, seq_len: int, model_config: PretrainedConfig,
                 device: torch.device, world_size: int):
        self.state, self.positions, self.device = state, batch_size * seq_len, device
        self._mark: tuple[float, int, int] | None = None
        self._warm = False
        # MFU is inversely proportional to the step time: both figures at 1 s per step, scaled per window
        self._mfu_at_1s = {} if device.type != "cuda" else {
            key: value for key, value in mfu_both(model_config, batch_size, seq_len, 1.0,
                                                  torch.cuda.get_device_name(device), world_size).items()
            if value is not None}

    def pre_step(self, step: int) -> None:
        if self._warm and self._mark is None:
            self._mark = (time.perf_counter(), self.state.step, self.state.text_tokens)

    def post_step(self, done: int, result: StepResult) -> None:
        if not self._warm:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once per process: the warm-up step ends here
            self._warm = True

    def log_metrics(self, row: Row) -> None:
        if self.device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self._mark is None:
            return
        (start, step, tokens), self._mark = self._mark, None
        seconds, steps = time.perf_counter() - start, self.state.step - step
        row |= {"step_time": seconds / steps, "tokens_per_s": (self.state.text_tokens - tokens) / seconds,
                "positions_per_s": self.positions * steps / seconds}
        row |= {key: value * steps / seconds for key, value in self._mfu_at_1s.items()}


class SourceCounts(Callback):
    """A data mixture's exact accounting per source in every row: text tokens, share, windows and passes."""

    def __init__(self, state: TrainState):
        self.state = state

    def log_metrics(self, row: Row) -> None:
        for name, counts in source_counts(self.state.loader).items():
            row |= {f"text_tokens/{name}": counts["tokens"], f"share/{name}": counts["tokens"] / self.state.text_tokens,
                    f"windows/{name}": counts["windows"], f"epoch/{name}": counts["epoch"]}


class NonFinitePolicy(Callback):
    """What skipped updates (non-finite loss or gradient) lead to: carry on, or stop after a checkpoint.

    The optimizer skips a bad update on the device; the counts are kept there too and read back only on logged
    steps, so a "stop" takes effect at the first logged step after the bad one (every step at
    ``train.log_every = 1``). The weights are the last good ones either way: no bad update ever lands.
    """

    def __init__(self, policy: str, max_skips: int, state: TrainState, device: torch.device, console: Console,
                 save: SaveCheckpoint):
        self.policy, self.max_skips, self.state, self.console, self.save = policy, max_skips, state, console, save
        self._in_row = torch.tensor(state.skipped_in_row, device=device)
        self._skipped = torch.tensor(state.skipped, device=device)
        self._skipped_at_check = state.skipped
        self._synced = False

    def post_step(self, done: int, result: StepResult) -> None:
        bad = (~result.finite).long()
        self._in_row = (self._in_row + 1) * bad
        self._skipped = self._skipped + bad

    def log_metrics(self, row: Row) -> None:
        """Read the counts back into the train state (a checkpoint of this step holds them) and mark a skip."""
        self.state.skipped_in_row, self.state.skipped = int(self._in_row), int(self._skipped)
        self._synced = True
        if self.state.skipped_in_row:  # this step's update was the skipped one
            row |= {"skipped": 1, "skipped_total": self.state.skipped}
            self.console.say(f"step {row['step']}: non-finite loss or gradient, update skipped "
                             f"({self.state.skipped_in_row} in a row)")

    def end_step(self, done: int) -> None:
        if not self._synced:
            return
        self._synced = False
        new, self._skipped_at_check = self.state.skipped > self._skipped_at_check, self.state.skipped
        if (self.policy == "stop" and new) or self.state.skipped_in_row >= self.max_skips:
            path = self.save(True)
            raise TrainingStopped(f"non-finite loss or gradient by step {done} ({self.state.skipped_in_row} in a "
                                  f"row, {self.state.skipped} in all, policy {self.policy}); the last good weights "
                                  f"are in {path}")


class EpochLine(Callback):
    """Says when a logged step's batch began a new pass over the training data."""

    def __init__(self, batches: Prefetcher, console: Console):
        self.batches, self.console = batches, console
        self._before = batches.epoch

    def pre_step(self, step: int) -> None:
        self._before = self.batches.epoch

    def log_metrics(self, row: Row) -> None:
        if row["epoch"] != self._before:
            self.console.say(f"step {row['step']}: epoch {self._before} of the training data complete, starting "
                             f"epoch {row['epoch']}")


class Evaluator(Callback):
    """Validation loss on the fixed held-out windows: every ``eval.every`` steps and always after the last step.

    A mixture scores each source's own windows (``val_loss/<name>``); its ``val_loss`` is their mean weighted by the
    mixture weights: the expected loss under the training mixture, whatever the sizes of the validation splits.
    """

    def __init__(self, module: TrainModule, windows: dict[str, torch.Tensor], weights: dict[str, float],
                 per_source: bool, every: int, total: int, console: Console):
        self.module, self.windows, self.weights, self.per_source = module, windows, weights, per_source
        self.every, self.total, self.console = every, total, console
        self.last = math.nan

    def _periodic(self, done: int) -> bool:
        return self.every > 0 and done % self.every == 0

    def wants_row(self, done: int) -> bool:
        return self._periodic(done) or done == self.total

    def log_metrics(self, row: Row) -> None:
        done = row["step"]
        # the last step always evaluates: after a skipped update the weights are the last good ones
        if (self._periodic(done) and "skipped" not in row) or done == self.total:
            row |= self.evaluate()
            self.console.say(f"step {done}: validation loss {row['val_loss']:.4f}")

    def evaluate(self) -> dict[str, float]:
        """The metrics of one validation: ``val_loss``, and per source for a mixture."""
        losses = {name: self.module.eval_loss(windows) for name, windows in self.windows.items()}
        self.last = weighted_mean(losses, self.weights)
        return {"val_loss": self.last} | ({f"val_loss/{name}": loss for name, loss in losses.items()}
                                          if self.per_source else {})


class PhaseSwitchLine(Callback):
    """At the first step of a new phase: the bag change and the loss jump it caused (the switch spike)."""

    def __init__(self, switches: set[int], console: Console):
        self.switches, self.console = switches, console
        self._previous: Row | None = None

    def wants_row(self, done: int) -> bool:
        return done in self.switches or done - 1 in self.switches

    def log_metrics(self, row: Row) -> None:
        previous, self._previous = self._previous, row
        if previous is None or row["step"] - 1 not in self.switches:
            return
        spike = row["train_loss"] - previous["train_loss"]
        self.console.say(f"step {row['step']}: phase {previous['phase']} -> {row['phase']} (bag {previous['bag']} "
                         f"-> {row['bag']}), train loss {previous['train_loss']:.3f} -> {row['train_loss']:.3f} "
                         f"({spike:+.3f} nat)")


class MetricsLog(Callback):
    """Every logged row to metrics.jsonl, TensorBoard and W&B (rank 0 opens the writer; ``open_writer`` is None on
    the other ranks, which still log on the same steps): every ``train.log_every`` steps and after the last."""

    def __init__(self, every: int, total: int, open_writer: Callable[[], MetricsWriter] | None):
        self.every, self.total, self.open_writer = every, total, open_writer
        self.writer: MetricsWriter | None = None

    def wants_row(self, done: int) -> bool:
        return done % self.every == 0 or done == self.total

    def pre_train(self) -> None:
        self.writer = self.open_writer() if self.open_writer is not None else None

    def log_metrics(self, row: Row) -> None:
        if self.writer is not None:
            self.writer.write(row)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ConsoleProgress(Callback):
    """The progress bar on every step, and a logged row's numbers on it (or as a line off a terminal)."""

    def __init__(self, console: Console):
        self.console = console

    def post_step(self, done: int, result: StepResult) -> None:
        self.console.progress_only(done)

    def log_metrics(self, row: Row) -> None:
        self.console.progress(row)

    def close(self) -> None:
        self.console.close()


class CheckpointCadence(Callback):
    """Phase switches, ``checkpoint.keep_steps`` and the last step keep their checkpoint forever;
    ``checkpoint.every`` writes periodic ones (pruned to the newest ``checkpoint.keep``). A checkpoint holds the
    non-finite counts read back on its step, so its steps are logged steps."""

    def __init__(self, every: int, switches: set[int], total: int, keep_steps: set[int], save: SaveCheckpoint):
        self.every, self.switches, self.total, self.keep_steps, self.save = every, switches, total, keep_steps, save

    def kind(self, done: int) -> str | None:
        if done in self.switches or done in self.keep_steps or done == self.total:
            return "keep"
        return "periodic" if self.every and done % self.every == 0 else None

    def wants_row(self, done: int) -> bool:
        return self.kind(done) is not None

    def end_step(self, done: int) -> None:
        kind = self.kind(done)
        if kind is not None:
            self.save(kind == "keep")


class CollectiveTimeout(Callback):
    """After the first step of the process, every collective may wait at most ``seconds``
    (:func:`~superpose.train.distributed.set_collective_timeout`): a rank that hangs later fails the job in minutes,
    while start-up and compilation, which may legitimately take long on one rank, keep torch's default."""

    def __init__(self, seconds: int):
        self.seconds, self._set = seconds, False

    def end_step(self, done: int) -> None:
        if not self._set:
            set_collective_timeout(self.seconds)
            self._set = True


class GarbageCollection(Callback):
    """Python's cyclic collector run by every rank at the same steps, and not automatically in between.

    Left to itself, a rank collects whenever its own allocations cross a threshold, and the others then wait for it
    at the next collective: at scale a different straggler every few steps. Collecting the young generations every
    ``every`` steps on all ranks at once costs the same work without the stragglers (torchtitan does the same).
    """

    def __init__(self, every: int):
        self.every, self._was_enabled = every, gc.isenabled()

    def pre_train(self) -> None:
        gc.disable()
        gc.collect()

    def end_step(self, done: int) -> None:
        if done % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self._was_enabled:
            gc.enable()
