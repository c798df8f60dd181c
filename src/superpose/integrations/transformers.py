"""TST inside a Hugging Face ``Trainer``: a pretraining script adopts it by using ``TSTTrainer`` instead of ``Trainer``.

The script's training set stays what it was: equal chunks of ``T`` consecutive tokens (``input_ids``) in text order, as
``group_texts``-style preprocessing produces them. At bag ``s`` a row of the batch is ``s`` consecutive chunks, a window
of ``T*s = (L+1)*s`` tokens for ``L = T-1`` positions; at bag 1 a row is one chunk, exactly what the plain Trainer trains
on, and the loss is the plain causal-LM loss. The pieces:

- :class:`TSTBatchSampler` picks the chunks of every batch in a seeded order that is fresh every epoch; it counts the
  batches it has produced, so the bag follows the optimizer step however far ahead the data loader prefetches.
- :class:`TSTDataCollator` stacks each row's chunks into one window and tags the batch with its bag.
- :class:`TSTCallback` places the sampler at the right batch when a run (re)starts and reports the epoch read.
- :class:`TSTTrainer` wires them together, scores batches with the trainer's own objective
  (:class:`superpose.train.objective.LMObjective`: the same bag means, loss, options and logit maps) and logs the bag.

One process or many (``torchrun``/``accelerate launch``, DDP or FSDP): every rank reads its own rows of the same global
batch, so the run is the one-process run with ``per_device_train_batch_size * world_size`` rows. Data loader workers
are supported; the script's own ``data_collator`` still serves evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ..errors import SuperposeError
from ..method import MODES, split_window
from ..models import check_trainable
from ..schedule import PhaseSchedule, Stage
from ..train.objective import LMObjective


@lru_cache(maxsize=4)
def _epoch_blocks(num_chunks: int, block: int, rows: int, seed: int, epoch: int) -> tuple[int, np.ndarray]:
    """Epoch ``epoch``'s head (chunks before its first whole group of ``rows`` blocks) and its order of blocks,
    drawn from ``(seed, epoch)``. Groups sit on stream positions that are multiples of ``rows * block``."""
    group = rows * block
    head = min(-(epoch * num_chunks) % group, num_chunks)
    return head, np.random.default_rng((seed, epoch)).permutation((num_chunks - head) // group * rows)


class TSTBatchSampler(Sampler[list[int]]):
    """Chunk indices of each batch: ``batch_size`` rows of ``bag`` consecutive chunks, ``bag`` set by the step.

    The chunks form one endless stream of positions, epoch after epoch (positions ``[e*N, (e+1)*N)`` are epoch
    ``e``). Each epoch cuts the dataset into blocks of ``K`` consecutive chunks (``K`` the first, largest bag), draws
    their order afresh from the seed and the epoch, and deals them in groups of one block per row of the global
    batch. A micro-batch reads the next ``rows * bag`` positions: within a group, row ``r`` reads the next ``bag``
    chunks of the group's block ``r``. So

    - every chunk is read exactly once per epoch, whatever the bags and wherever a resume happens;
    - a row is ``bag`` consecutive chunks (contiguous text), and at every bag a batch draws its rows from ``rows``
      blocks spread over the whole dataset (the few chunks around an epoch's end, less than a group, are read in
      text order, the corpus's end followed by its start);
    - the position is one integer, computed from the step count;
    - with ``world_size`` ranks the global batch has ``batch_size * world_size`` rows and rank ``r`` yields rows
      ``[r*batch_size, (r+1)*batch_size)`` of it, the same global batch at any world size.

    Each bag must divide the bag before it (``8 -> 4 -> 1``, every two-phase schedule), which keeps micro-batches on
    whole rows of a group. With ``whole_bags=False`` (the ``output`` objective, which reads token inputs) a row is
    one chunk at every bag. ``len`` is the bag-1 batches of one epoch, rounded down to whole optimizer steps (the
    Trainer's epoch arithmetic assumes a fixed length and accumulates within it); every iteration yields that many,
    continuing the stream.
    """

    def __init__(self, num_chunks: int, batch_size: int, schedule: PhaseSchedule, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1, whole_bags: bool = True):
        self.whole_bags = whole_bags
        bags = [self.row_chunks(bag) for bag in schedule.bags()]
        if any(before % after for before, after in zip(bags, bags[1:])):
            raise SuperposeError(f"TSTTrainer needs each bag to divide the bag before it (e.g. 8, 4, 1), got "
                                 f"{', '.join(map(str, bags))}")
        self.rows = batch_size * world_size
        if num_chunks < self.rows * bags[0]:
            raise SuperposeError(f"{num_chunks} chunks cannot fill a batch of {self.rows} rows of {bags[0]} chunks")
        self.num_chunks = num_chunks
        self.block = bags[0]
        self.own_rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.schedule = schedule
        self.grad_accum = grad_accum
        self.seed = seed
        self.seek(0)

    def row_chunks(self, bag: int) -> int:
        """Chunks in a row at this bag."""
        return bag if self.whole_bags else 1

    def chunks_read(self, step: int) -> int:
        """Stream positions (chunks, all ranks together) that ``step`` optimizer steps read."""
        total, start = 0, 0
        for stage, end in zip(self.schedule.stages, self.schedule.ends):
            total += self.row_chunks(stage.bag) * max(0, min(step, end) - start)
            start = end
        total += self.row_chunks(self.schedule.stages[-1].bag) * max(0, step - start)  # past the schedule: last bag
        return total * self.rows * self.grad_accum

    def epoch(self, step: int) -> float:
        """Epochs read after ``step`` optimizer steps: chunks read over chunks in the dataset."""
        return self.chunks_read(step) / self.num_chunks

    def seek(self, step: int) -> None:
        """Continue as a run that has completed ``step`` optimizer steps would."""
        self.micro_step, self.position = step * self.grad_accum, self.chunks_read(step)

    def bag(self) -> int:
        """Bag of the next batch."""
        return self.schedule.bag_at(self.micro_step // self.grad_accum)

    def rows_at(self, position: int, bag: int) -> np.ndarray:
        """Chunk ids ``[rows, bag]`` of the micro-batch that starts at stream ``position``."""
        group = self.rows * self.block
        start = position // group * group  # micro-batches never straddle a group: bags divide the ones before
        epoch = start // self.num_chunks
        if (start + group - 1) // self.num_chunks != epoch:  # the group around an epoch's end: text order
            return (position + np.arange(self.rows * bag).reshape(self.rows, bag)) % self.num_chunks
        head, order = _epoch_blocks(self.num_chunks, self.block, self.rows, self.seed, epoch)
        first = (start - epoch * self.num_chunks - head) // self.block  # the group's first block in the order
        offset = (position - start) // self.rows  # chunks each block of the group has given so far
        blocks = order[first: first + self.rows]
        return head + blocks[:, None] * self.block + offset + np.arange(bag)

    def _advance(self) -> list[int]:
        chunks = self.row_chunks(self.bag())
        ids = self.rows_at(self.position, chunks)[self.own_rows]
        self.position += self.rows * chunks
        self.micro_step += 1
        return ids.ravel().tolist()

    def __len__(self) -> int:
        return max(1, self.num_chunks // self.rows // self.grad_accum) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            yield self._advance()


class TSTDataCollator:
    """Stack ``batch_size * bag`` chunks into windows ``[batch_size, bag*T]``; the bag (chunks per row) rides along
    in the batch."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        chunks = torch.stack([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        return {"input_ids": chunks.view(self.batch_size, -1), "bag": len(features) // self.batch_size}


class TSTCallback(TrainerCallback):
    """Puts the sampler where the run is when training (re)starts, so a resumed run lands in the right phase, and
    reports the epoch as the share of the dataset read (the Trainer counts bag-1 batches, which undercounts TST)."""

    def __init__(self, sampler: TSTBatchSampler):
        self.sampler = sampler

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.sampler.seek(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        state.epoch = self.sampler.epoch(state.global_step)


class TSTTrainer(Trainer):
    """A ``Trainer`` that trains the first ``ratio`` of ``args.max_steps`` at ``bag`` (or follows ``stages``).

    ``stages`` takes ``[(until, bag), ...]`` as in ``superpose.schedule``. Training batches come from
    :class:`TSTBatchSampler` (seeded by ``args.data_seed`` or ``args.seed``); resuming repositions the sampler from
    the step count, so the Trainer's own batch skipping is turned off. ``total_flos`` counts the positions the model
    runs (``L`` per row at every bag), so a TST run and its baseline cost the same per step, as they do.

    ``mode``, ``weighting``, ``alpha``, ``rescale_mean``, ``loss_chunk`` and ``compile_loss`` are the trainer's
    ``tst.*`` and ``train.loss_chunk``/``train.compile`` options: a batch is scored by the trainer's own
    :class:`~superpose.train.objective.LMObjective`. In ``output`` mode a row is one chunk of ``T`` tokens, scored on
    its first ``T - bag`` positions (inputs are tokens, so no row needs ``bag`` chunks).
    """

    def __init__(self, *args: Any, bag: int = 4, ratio: float = 0.3,
                 stages: Sequence[Stage | tuple[int | float, int]] | None = None, mode: str = "both",
                 weighting: str = "uniform", alpha: float = 1.0, rescale_mean: bool = False, loss_chunk: int = 0,
                 compile_loss: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if mode not in MODES:
            raise SuperposeError(f"TSTTrainer mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.tst_mode = mode
        self._objective_options = dict(rescale_mean=rescale_mean, weighting=weighting, alpha=alpha,
                                       loss_chunk=loss_chunk, compile_loss=compile_loss)
        check_trainable(self.model)  # a family TST cannot drive (or whose logit map the loss does not know): one line
        self.tst_objective = LMObjective(self.model, **self._objective_options)
        steps = self.args.max_steps
        if steps <= 0:
            raise SuperposeError("TSTTrainer needs TrainingArguments(max_steps=...): the phase schedule counts steps")
        data = self.train_dataset
        if data is None or isinstance(data, IterableDataset) or not hasattr(type(data), "__len__"):
            raise SuperposeError("TSTTrainer needs a map-style train_dataset of equal token chunks (len and "
                                 "indexing): it reads every chunk once per epoch in a seeded order, which a streaming "
                                 "IterableDataset cannot give; materialize the chunks first (Dataset.from_generator)")
        try:
            self.tst_schedule = PhaseSchedule(stages, steps) if stages else PhaseSchedule.two_phase(bag, ratio, steps)
        except ValueError as e:
            raise SuperposeError(f"TST schedule: {e}") from None
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.tst_sampler = TSTBatchSampler(len(data), self._train_batch_size, self.tst_schedule,
                                           self.args.gradient_accumulation_steps, seed, self.args.process_index,
                                           self.args.world_size, whole_bags=mode != "output")
        self.args.ignore_data_skip = True
        self.loss_is_scaled_for_ga = False  # the loss is a per-batch mean
        self.add_callback(TSTCallback(self.tst_sampler))

    def get_train_dataloader(self) -> DataLoader:
        """Not passed through ``accelerator.prepare``: that would deal whole batches to ranks in turn, while the
        sampler already gives each rank its rows of the global batch. The Trainer moves batches to the device."""
        workers = self.args.dataloader_num_workers
        return DataLoader(self.train_dataset, batch_sampler=self.tst_sampler,
                          collate_fn=TSTDataCollator(self._train_batch_size), num_workers=workers,
                          pin_memory=self.args.dataloader_pin_memory,
                          persistent_workers=workers > 0 and self.args.dataloader_persistent_workers,
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training rows: the bag of the step just taken
            logs["bag"] = self.tst_schedule.bag_at(self.state.global_step - 1)
        super().log(logs, *args, **kwargs)

    def tst_bag(self, inputs: dict[str, Any]) -> int:
        """The bag of a training batch: its chunks per row, or in ``output`` mode (a row is one chunk) the bag of the
        step being taken (the Trainer counts ``global_step`` up after the step's last micro-batch)."""
        return self.tst_schedule.bag_at(self.state.global_step) if self.tst_mode == "output" else inputs["bag"]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's 6 * parameters * tokens, over the ``L`` positions per row the model runs, not the ``bag``
        times more tokens it reads."""
        if "bag" not in inputs:
            return super().floating_point_ops(inputs)
        positions = split_window(inputs["input_ids"], self.tst_bag(inputs), self.tst_mode)[1].shape[1]
        return super().floating_point_ops({"input_ids": inputs["input_ids"][:, :positions]})

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The TST objective on a window batch; batches without a bag (evaluation) get the plain causal-LM loss.

        The trainer's :class:`LMObjective` runs as the model's own forward (``model`` may be a DDP/FSDP wrapper
        around it), so the wrapper sees one ordinary forward with every parameter, sharded ones gathered; the
        Accelerator's autocast wraps it as it wraps the model's forward. The MoE router loss is added with the
        model's ``router_aux_loss_coef``, as the trainer adds it.
        """
        if "bag" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        if self.tst_objective.lm is not unwrapped:  # a model_init run built a new model
            self.tst_objective = LMObjective(unwrapped, **self._objective_options)
        with self.accelerator.autocast(), _forward_as(unwrapped, self.tst_objective.forward):
            out = model(inputs["input_ids"], self.tst_bag(inputs), self.tst_mode)
        loss = out.loss if out.aux is None else out.loss + self.tst_objective.aux_coef * out.aux
        return (loss, out) if return_outputs else loss


@contextmanager
def _forward_as(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module(...)`` runs ``forward`` for the duration (an instance attribute over the class's ``forward``, and
    over the Accelerator's own wrapper, which is put back after)."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved
