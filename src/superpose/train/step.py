"""One optimizer step (micro-batching, clipping, LR) kept apart from the forward/backward maths.

The loop hands this module token windows and a bag size; it never sees the schedule, the data or the disk.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from .. import method
from .config import RunConfig


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms or biases (the usual LLM recipe); tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainModule:
    """The model, its optimizer and the TST objective: ``train_step`` and ``eval_loss`` are all the loop calls."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device):
        self.model = model
        self.cfg = cfg
        self.device = device
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            _decay_groups(model, o.weight_decay),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=device.type == "cuda",
        )
        use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
        self._autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )
        self.forward_model = torch.compile(model) if cfg.train.compile else model
        self._aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)

    def _weights(self, bag: int) -> torch.Tensor | None:
        w = method.target_weights(bag, self.cfg.tst.weighting, self.cfg.tst.alpha)
        return None if w is None else w.to(self.device)

    def loss(self, window: torch.Tensor, bag: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Objective on one micro-batch of windows; also returns the MoE router loss when the model has one."""
        aux: list[torch.Tensor] = []

        def forward(inputs_embeds: torch.Tensor) -> torch.Tensor:
            out = self.forward_model(inputs_embeds=inputs_embeds, use_cache=False)
            if getattr(out, "aux_loss", None) is not None:
                aux.append(out.aux_loss)
            return out.logits

        with self._autocast():
            loss = method.tst_loss(
                forward, self.model.get_input_embeddings(), window.to(self.device), bag, mode, self._weights(bag),
                self.cfg.tst.rescale_mean,
            )
        return loss, (aux[0] if aux else None)

    def train_step(self, window: torch.Tensor, bag: int, lr: float) -> dict[str, float]:
        """Forward/backward over micro-batches of ``window`` ([batch, window_len]), clip, step at ``lr``.

        When the loss or the gradient norm is not finite the update is skipped and ``finite`` is False; what to do
        about it is the loop's policy.
        """
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = window.split(self.cfg.micro_batch_size)
        total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device)
        for chunk in micro:
            loss, aux = self.loss(chunk, bag, self.cfg.tst.mode)
            objective = loss if aux is None else loss + self._aux_coef * aux
            (objective / len(micro)).backward()
            total += loss.detach() / len(micro)
            if aux is not None:
                aux_total += aux.detach() / len(micro)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        finite = bool(torch.isfinite(total) and torch.isfinite(grad_norm))
        if finite:  # a non-finite loss or gradient never reaches the weights or the optimizer state
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": total.item(), "grad_norm": grad_norm.item(), "finite": finite}
        if self._aux_coef:
            metrics["aux_loss"] = aux_total.item()
        return metrics

    @torch.no_grad()
    def eval_loss(self, windows: list[torch.Tensor]) -> float:
        """Mean next-token loss over fixed held-out windows of L+1 tokens (bag 1: plain next-token prediction)."""
        self.model.eval()
        total, count = 0.0, 0
        for window in windows:
            loss, _ = self.loss(window, 1, "both")
            n = window.shape[0] * (window.shape[1] - 1)
            total += loss.item() * n
            count += n
        return total / count
