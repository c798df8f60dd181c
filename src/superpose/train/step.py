"""One optimizer step (micro-batching, clipping, LR) kept apart from the forward/backward maths.

The loop hands this module token windows and a bag size; it never sees the schedule, the data or the disk.
The forward maths (bag mean, multi-hot loss) live in :mod:`.objective`; here they are wrapped, stepped and clipped.

Nothing in a step reads a value back to the host: the step returns device tensors (:class:`StepResult`), a
non-finite update is skipped by the fused optimizer itself, and MoE expert load is counted on the device. The loop
reads values (one sync) on the steps it logs. :class:`Prefetcher` reads the next batch while a step runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import PreTrainedModel

from ..errors import SuperposeError
from ..models import build_model, materialize, read_pretrained, use_autocast_experts, use_causal_sdpa
from .config import RunConfig
from .distributed import (
    DistInfo,
    accumulation_context,
    any_rank,
    apply_parallelism,
    compile_blocks,
    shards,
    sum_across_ranks,
)
from .objective import LMObjective, Objective


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms or biases (the usual LLM recipe); tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class StepResult:
    """One optimizer step's numbers as device tensors, so a step never waits for the device.

    ``loss``: mean objective over the global batch (all ranks); ``grad_norm``: global norm before clipping;
    ``finite``: whether the update was applied (a non-finite loss or gradient norm skips it, on every rank alike);
    MoE models add the router loss and ``expert_load`` ``[layers, experts]`` (share of routed slots, all ranks).
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None

    def to_host(self) -> dict[str, float]:
        """The metrics row's values, read back in one transfer: call it on the steps that log, not on every step.

        ``finite`` comes back as 1.0/0.0; MoE rows add ``aux_loss``, ``expert_load_max`` (mean over layers of the
        busiest expert's load relative to uniform) and ``expert_load_cv`` (coefficient of variation over experts).
        """
        named = {"loss": self.loss, "grad_norm": self.grad_norm, "finite": self.finite.float()}
        if self.expert_load is not None:
            load = self.expert_load
            named |= {"aux_loss": self.aux_loss, "expert_load_max": (load.max(-1).values * load.shape[-1]).mean(),
                      "expert_load_cv": (load.std(-1) / load.mean(-1)).mean()}
        values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist()
        return dict(zip(named, values))


class TrainModule:
    """The model, its optimizer and the TST objective: ``train_step`` and ``eval_loss`` are all the loop calls.

    The model is built on the meta device, wrapped (FSDP2 shards the weightless shell), then each rank allocates
    only its shard on ``device`` and, when ``init``, draws ``cfg.seed``'s weights for it: the same weights as a
    single process draws, or with ``model.init_from`` copies its shard of that folder's weights
    (:meth:`_load_pretrained`). ``init=False`` (resuming) leaves the weights for the checkpoint to fill.
    ``model``: the meta-device shell start-up already built and checked (``RunInputs``), so a ``model.config`` or
    ``init_from`` is read and the model built once; None builds it from ``cfg.model`` at ``vocab_size``.
    """

    def __init__(self, cfg: RunConfig, vocab_size: int, device: torch.device, info: DistInfo = DistInfo(),
                 init: bool = True, model: PreTrainedModel | None = None):
        self.cfg, self.device, self.info = cfg, device, info
        train = cfg.train
        self.model = model if model is not None else build_model(cfg.model.build_config(vocab_size), device="meta")
        use_causal_sdpa(self.model)
        use_bf16 = train.dtype == "bf16" or (train.dtype == "auto" and device.type == "cuda")
        if train.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.sharded = shards(train.parallel)
        pretrained = cfg.model.init_from if init else ""
        seed = cfg.seed if init and not pretrained else None
        if not self.sharded:  # DDP and one process wrap real weights
            self._materialize(seed, pretrained)
        objective = LMObjective.from_config(self.model, cfg)
        self.objective = apply_parallelism(objective, self.model, train.parallel, info, device,
                                           use_bf16 and self.sharded, train.replicas)
        self.compiled = train.compile and compile_blocks(self.model, device)  # after wrapping, as torchtitan does
        if self.sharded:
            self._materialize(seed, pretrained)
        o = cfg.optim
        # fused: one kernel per step, and it skips a non-finite update on the device (``found_inf``)
        self.optimizer = torch.optim.AdamW(_decay_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        # bf16 compute: FSDP2 casts the parameters (MixedPrecisionPolicy), where autocast would only upcast ops
        # again; fp32 weights (DDP, one process) compute under autocast, the experts cast to bf16 by hand
        autocast = use_bf16 and not self.sharded
        if autocast:
            use_autocast_experts(self.model)
        self._autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        )
        self._aux_coef = objective.aux_coef

    def _materialize(self, seed: int | None, pretrained: str) -> None:
        materialize(self.model, self.device, seed)
        if pretrained:
            self._load_pretrained(pretrained)

    def _load_pretrained(self, folder: str) -> None:
        """Copy a model folder's weights into this rank's parameters (its shard under FSDP2).

        Rank 0 alone reads the folder (one full float32 copy of the model in its host memory, freed after the copy)
        and broadcasts one tensor at a time; every other rank holds at most one full tensor beside its shard. A
        folder rank 0 cannot load is one line on every rank.
        """
        weights, problem = {}, None
        if self.info.is_main:
            try:
                weights = read_pretrained(folder, self.model.config)
            except SuperposeError as e:
                problem = e
        if any_rank(problem is not None, self.info):
            raise problem or SuperposeError(f"model.init_from: rank 0 could not load {folder}")
        set_model_state_dict(self.model, weights, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=self.info.enabled))

    def loss(self, window: torch.Tensor, bag: int, mode: str) -> Objective:
        """Objective on one micro-batch of windows (the router loss and expert load too, for MoE models)."""
        with self._autocast():
            return self.objective(window.to(self.device, non_blocking=True), bag, mode)

    def train_step(self, window: torch.Tensor, bag: int, lr: float) -> StepResult:
        """Forward/backward over micro-batches of this rank's ``window`` rows, clip, step at ``lr``.

        Each rank's loss is the mean over its rows; the wrappers average gradients over ranks, so with equal rows
        per rank the update is the one a single process would make on the global batch. When the loss or the
        gradient norm is not finite the update is skipped and ``finite`` is False; what to do is the loop's policy.
        A step runs to its end: a stop request is agreed at the step boundary (the loop), once per step.
        """
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = window.split(self.cfg.micro_batch_size(self.info.world_size))
        sums = torch.zeros(2, device=self.device)  # loss, router loss: summed over micro-batches, then ranks
        loads = []
        for i, chunk in enumerate(micro):
            out = self.loss(chunk, bag, self.cfg.tst.mode)
            objective = out.loss if out.aux is None else out.loss + self._aux_coef * out.aux
            with accumulation_context(self.objective, last=i == len(micro) - 1):
                (objective / len(micro)).backward()
            sums[0] += out.loss.detach()
            if out.aux is not None:
                sums[1] += out.aux.detach()
                loads.append(out.load)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        shares = len(micro) * self.info.world_size
        load = torch.stack(loads).sum(0) if loads else None
        reduced = sum_across_ranks(sums if load is None else torch.cat([sums, load.flatten()]), self.info) / shares
        finite = torch.isfinite(reduced[0]) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()  # the fused kernel skips the update (moments, step count too)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if load is None:
            return StepResult(reduced[0], grad_norm, finite)
        return StepResult(reduced[0], grad_norm, finite, reduced[1], reduced[2:].view_as(load))

    @torch.no_grad()
    def eval_loss(self, windows: torch.Tensor) -> float:
        """Mean next-token loss over fixed held-out windows ``[N, L+1]`` (the same tensor on every rank).

        Each rank scores its contiguous share of the rows in no-grad micro-batches of ``eval_micro_batch_size``;
        the loss sums and target counts are reduced over ranks, so the result is one process's within rounding.
        Every rank runs the same number of forwards (FSDP gathers weights in each): a rank out of rows repeats one
        with weight zero. Compiled blocks run eagerly here unless a graph already fits: a no-grad forward fails the
        training graphs' grad-mode guard, and compiling it (and each eval batch size) would stall the run mid-way.
        """
        self.model.eval()
        per_rank = -(-windows.shape[0] // self.info.world_size)
        mine = windows[self.info.rank * per_rank:(self.info.rank + 1) * per_rank]
        size = self.cfg.train.eval_micro_batch_size or 2 * self.cfg.micro_batch_size(self.info.world_size)
        total, count = torch.zeros((), device=self.device, dtype=torch.float64), 0
        with torch.compiler.set_stance("eager_on_recompile") if self.compiled else contextlib.nullcontext():
            for i in range(-(-per_rank // size)):
                chunk = mine[i * size:(i + 1) * size]
                n = chunk.shape[0] * (chunk.shape[1] - 1)
                total += self.loss(chunk if n else windows[:1], 1, "both").loss.double() * n
                count += n
        total, count = sum_across_ranks(torch.stack([total, total.new_tensor(count)]), self.info).tolist()
        return total / count


class _BatchSource(Protocol):
    epoch: int

    def next_batch(self, window_len: int) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, int]: ...


class Prefetcher:
    """Reads the next step's batch in a background thread while the current step runs.

    The batch is read into pinned host memory (on CUDA) and copied to the device with ``non_blocking``, so neither
    the read nor the copy stalls the step. ``state_dict()`` is the loader position after the batches handed out so
    far (not the one read ahead), which is what a checkpoint must store.
    """

    def __init__(self, loader: _BatchSource, device: torch.device):
        self.loader, self.device = loader, device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead: tuple[int, Future[torch.Tensor]] | None = None
        self._state = loader.state_dict()
        self.epoch = loader.epoch
        """The loader's epoch after the batches handed out so far (not counting the one read ahead)."""

    def _read(self, window_len: int) -> torch.Tensor:
        batch = self.loader.next_batch(window_len)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def get(self, window_len: int, next_len: int | None = None) -> torch.Tensor:
        """This step's windows (``window_len`` tokens per row) on the device; starts reading ``next_len`` ones."""
        if self._ahead is not None and self._ahead[0] != window_len:
            raise ValueError(f"prefetched windows of {self._ahead[0]} tokens, asked for {window_len}")
        batch = self._ahead[1].result() if self._ahead is not None else self._read(window_len)
        self._state, self.epoch = self.loader.state_dict(), self.loader.epoch
        self._ahead = None if next_len is None else (next_len, self._pool.submit(self._read, next_len))
        return batch.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@contextlib.contextmanager
def profile_steps(steps: int, out_dir: Path) -> Iterator[Callable[[], None]]:
    """Profile ``steps`` optimizer steps (after one warm-up) and write a Chrome/Perfetto trace into ``out_dir``.

    Yields the function the loop calls once per step (``prof.step()``); ``steps = 0`` yields a no-op, so the loop
    has one code path. The trace (``trace-rank<r>.json``, CPU and CUDA activity, shapes and memory) opens in
    https://ui.perfetto.dev or ``chrome://tracing``.
    """
    if steps <= 0:
        yield lambda: None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    out_dir.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(out_dir / f"trace-rank{rank}.json")),
                 record_shapes=True, profile_memory=True) as prof:
        yield prof.step
