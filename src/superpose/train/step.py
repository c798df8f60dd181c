"""One optimizer step (micro-batching, clipping, LR) kept apart from the forward/backward maths.

The loop hands this module token windows and a bag size; it never sees the schedule, the data or the disk.
``LMObjective`` puts the model and the TST objective in one module, so a distributed wrapper (FSDP2, DDP) sees the
bag mean and the loss inside its forward, and the same code runs on one process or many.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from .. import method
from ..losses import chunked_multi_hot_cross_entropy
from .config import RunConfig
from .distributed import (
    DistInfo,
    apply_parallelism,
    decoder_layers,
    mean_across_ranks,
    set_gradient_sync,
)


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms or biases (the usual LLM recipe); tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def expert_load(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Share of routed token slots each expert received, per layer: ``[layers, experts]`` (uniform = 1/experts)."""
    loads = []
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        loads.append(torch.bincount(chosen, minlength=logits.shape[-1]).float() / chosen.numel())
    return torch.stack(loads)


class LMObjective(torch.nn.Module):
    """A Hugging Face causal LM under the TST objective: windows in, (loss, router aux loss, expert load) out.

    The backbone (``lm.model``) runs on ``L`` positions of bag means; the head and the multi-hot loss follow, either
    on full logits or fused and chunked (``loss_chunk``) so ``[B*L, V]`` logits are never held at once.
    """

    def __init__(self, lm: torch.nn.Module, cfg: RunConfig):
        super().__init__()
        self.lm = lm
        self.tst = cfg.tst
        self.loss_chunk = cfg.train.loss_chunk
        self.num_experts = int(getattr(lm.config, "num_experts", 0) or 0)

    def forward(self, window: torch.Tensor, bag: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        input_ids, targets = method.split_window(window, bag, mode)
        x = method.embed_inputs(self.lm.get_input_embeddings(), input_ids, bag, mode, self.tst.rescale_mean)
        extra = {"output_router_logits": True} if self.num_experts else {}
        out = self.lm.model(inputs_embeds=x, use_cache=False, **extra)
        w = None if mode == "input" else method.target_weights(bag, self.tst.weighting, self.tst.alpha)
        if self.loss_chunk:
            head = self.lm.get_output_embeddings()
            loss = chunked_multi_hot_cross_entropy(out.last_hidden_state, head.weight, targets,
                                                   chunk_size=self.loss_chunk, weights=w, bias=head.bias)
        else:
            loss = method.multi_hot_cross_entropy(self.lm.get_output_embeddings()(out.last_hidden_state), targets,
                                                  weights=w)
        if not self.num_experts:
            return loss, None, None
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            load_balancing_loss_func,
        )

        top_k = self.lm.config.num_experts_per_tok
        aux = load_balancing_loss_func(out.router_logits, self.num_experts, top_k, None)
        with torch.no_grad():
            load = expert_load(out.router_logits, top_k)
        return loss, aux, load


class TrainModule:
    """The model, its optimizer and the TST objective: ``train_step`` and ``eval_loss`` are all the loop calls."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device, info: DistInfo = DistInfo()):
        self.model = model
        self.cfg = cfg
        self.device = device
        self.info = info
        use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
        if cfg.train.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.compile:  # per block: every block sees [B, L, d] in every phase, so it compiles once
            for block in decoder_layers(model):
                block.compile()
        self.objective = apply_parallelism(LMObjective(model, cfg), model, cfg.train.parallel, info, device,
                                           use_bf16 and info.enabled and cfg.train.parallel == "fsdp")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            _decay_groups(model, o.weight_decay),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=device.type == "cuda",
        )
        self._autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )
        self._aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)

    def loss(self, window: torch.Tensor, bag: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Objective on one micro-batch of windows; also returns the MoE router loss when the model has one."""
        with self._autocast():
            loss, aux, load = self.objective(window.to(self.device), bag, mode)
        self._load = load
        return loss, aux

    def train_step(self, window: torch.Tensor, bag: int, lr: float) -> dict[str, Any]:
        """Forward/backward over micro-batches of this rank's ``window`` rows, clip, step at ``lr``.

        Each rank's loss is the mean over its rows; the wrappers average gradients over ranks, so with equal rows
        per rank the update is the one a single process would make on the global batch. When the loss or the
        gradient norm is not finite the update is skipped and ``finite`` is False; what to do is the loop's policy.
        """
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = window.split(self.cfg.micro_batch_size(self.info.world_size))
        total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device)
        loads = []
        for i, chunk in enumerate(micro):
            set_gradient_sync(self.objective, i == len(micro) - 1)
            loss, aux = self.loss(chunk, bag, self.cfg.tst.mode)
            objective = loss if aux is None else loss + self._aux_coef * aux
            (objective / len(micro)).backward()
            total += loss.detach() / len(micro)
            if aux is not None:
                aux_total += aux.detach() / len(micro)
                loads.append(self._load)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        total = mean_across_ranks(total, self.info)
        finite = bool(torch.isfinite(total) and torch.isfinite(grad_norm))
        if finite:  # a non-finite loss or gradient never reaches the weights or the optimizer state
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, Any] = {"loss": total.item(), "grad_norm": grad_norm.item(), "finite": finite}
        if loads:
            load = mean_across_ranks(torch.stack(loads).mean(0), self.info)  # [layers, experts]
            metrics["aux_loss"] = mean_across_ranks(aux_total, self.info).item()
            metrics["expert_load_max"] = (load.max(-1).values * load.shape[-1]).mean().item()
            metrics["expert_load_cv"] = (load.std(-1) / load.mean(-1)).mean().item()
        return metrics

    @torch.no_grad()
    def eval_loss(self, windows: list[torch.Tensor]) -> float:
        """Mean next-token loss over fixed held-out windows of L+1 tokens (bag 1: plain next-token prediction).

        Every rank evaluates the same windows (FSDP needs all ranks in each forward), so no reduction is needed.
        """
        self.model.eval()
        total, count = 0.0, 0
        for window in windows:
            loss, _ = self.loss(window, 1, "both")
            n = window.shape[0] * (window.shape[1] - 1)
            total += loss.item() * n
            count += n
        return total / count
