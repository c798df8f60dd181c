"""TST inside a Hugging Face ``Trainer``: a pretraining script adopts it by using ``TSTTrainer`` instead of ``Trainer``.

The script's training set stays what it was: equal chunks of ``T`` consecutive tokens (``input_ids``) in text order, as
``group_texts``-style preprocessing produces them. At bag ``s`` a row of the batch is ``s`` consecutive chunks, a window
of ``T*s = (L+1)*s`` tokens for ``L = T-1`` positions; at bag 1 a row is one chunk, exactly what the plain Trainer trains
on, and the loss is the plain causal-LM loss. The pieces:

- :class:`TSTBatchSampler` picks the chunks of every batch; it counts the batches it has produced, so the bag follows
  the optimizer step however far ahead the data loader prefetches.
- :class:`TSTDataCollator` stacks each row's chunks into one window and tags the batch with its bag.
- :class:`TSTCallback` places the sampler at the right batch when a run resumes.
- :class:`TSTTrainer` wires them together, scores batches with :func:`superpose.method.tst_loss` and logs the bag.

Single process (one device, any gradient accumulation); the script's own ``data_collator`` still serves evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ..errors import SuperposeError
from ..method import tst_loss
from ..schedule import PhaseSchedule, Stage


class TSTBatchSampler(Sampler[list[int]]):
    """Chunk indices of each batch: ``batch_size`` rows of ``bag`` consecutive chunks, ``bag`` set by the step.

    The chunks are cut into ``batch_size`` lanes read front to back (as :class:`superpose.data.loader.WindowLoader`
    reads tokens), so every chunk is read once per pass whatever the bag and the position is one integer. ``len`` is
    the batches of one pass at bag 1, and every iteration yields that many (wrapping around the lanes) because the
    Trainer's epoch and step arithmetic assumes a fixed length.
    """

    def __init__(self, num_chunks: int, batch_size: int, schedule: PhaseSchedule, grad_accum: int = 1):
        self.lane_len = num_chunks // batch_size
        if self.lane_len < max(schedule.bags()):
            raise SuperposeError(f"{num_chunks} chunks cannot fill a batch of {batch_size} rows of "
                                 f"{max(schedule.bags())} chunks")
        self.batch_size = batch_size
        self.schedule = schedule
        self.grad_accum = grad_accum
        self.seek(0)

    def seek(self, step: int) -> None:
        """Continue as a run that has completed ``step`` optimizer steps would."""
        self.micro_step, self.offset = 0, 0
        while self.micro_step < step * self.grad_accum:
            self._advance()

    def bag(self) -> int:
        """Bag of the next batch."""
        return self.schedule.bag_at(self.micro_step // self.grad_accum)

    def _advance(self) -> list[int]:
        bag = self.bag()
        if self.offset + bag > self.lane_len:  # a lane tail shorter than a row starts the next pass
            self.offset = 0
        start = self.offset
        self.offset += bag
        self.micro_step += 1
        return [lane * self.lane_len + start + k for lane in range(self.batch_size) for k in range(bag)]

    def __len__(self) -> int:
        return self.lane_len

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            yield self._advance()


class TSTDataCollator:
    """Stack ``batch_size * bag`` chunks into windows ``[batch_size, bag*T]``; the bag rides along in the batch."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        chunks = torch.stack([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        return {"input_ids": chunks.view(self.batch_size, -1), "bag": len(features) // self.batch_size}


class TSTCallback(TrainerCallback):
    """Puts the sampler where the run is when training (re)starts, so a resumed run lands in the right phase."""

    def __init__(self, sampler: TSTBatchSampler):
        self.sampler = sampler

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.sampler.seek(state.global_step)


class TSTTrainer(Trainer):
    """A ``Trainer`` that trains the first ``ratio`` of ``args.max_steps`` at ``bag`` (or follows ``stages``).

    ``stages`` takes ``[(until, bag), ...]`` as in ``superpose.schedule``. Training batches come from
    :class:`TSTBatchSampler` in text order (the plain Trainer shuffles chunks); resuming repositions the sampler from
    the step count, so the Trainer's own batch skipping is turned off.
    """

    def __init__(self, *args: Any, bag: int = 4, ratio: float = 0.3,
                 stages: Sequence[Stage | tuple[int | float, int]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        steps = self.args.max_steps
        if steps <= 0:
            raise SuperposeError("TSTTrainer needs TrainingArguments(max_steps=...): the phase schedule counts steps")
        try:
            self.tst_schedule = PhaseSchedule(stages, steps) if stages else PhaseSchedule.two_phase(bag, ratio, steps)
        except ValueError as e:
            raise SuperposeError(f"TST schedule: {e}") from None
        self.tst_sampler = TSTBatchSampler(len(self.train_dataset), self._train_batch_size, self.tst_schedule,
                                           self.args.gradient_accumulation_steps)
        self.args.ignore_data_skip = True
        self.loss_is_scaled_for_ga = False  # tst_loss is a per-batch mean
        self.add_callback(TSTCallback(self.tst_sampler))

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(self.train_dataset, batch_sampler=self.tst_sampler,
                            collate_fn=TSTDataCollator(self._train_batch_size),
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training rows: the bag of the step just taken
            logs["bag"] = self.tst_schedule.bag_at(self.state.global_step - 1)
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The TST objective on a window batch; batches without a bag (evaluation) get the plain causal-LM loss."""
        if "bag" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = []

        def forward(inputs_embeds: torch.Tensor) -> torch.Tensor:
            outputs.append(model(inputs_embeds=inputs_embeds, use_cache=False))
            return outputs[-1].logits

        unwrapped = self.accelerator.unwrap_model(model)
        loss = tst_loss(forward, unwrapped.get_input_embeddings(), inputs["input_ids"], inputs["bag"])
        aux = getattr(outputs[0], "aux_loss", None)  # MoE router balance, as the model adds it to its own loss
        if aux is not None:
            loss = loss + unwrapped.config.router_aux_loss_coef * aux
        return (loss, outputs[0]) if return_outputs else loss
