"""The TST objective as one module: a causal LM, the bag mean and the multi-hot loss, windows in, loss out.

A distributed wrapper (FSDP2, DDP) wraps this module, so the bag mean and the loss run inside its forward, and the
trainer and ``TSTTrainer`` score a batch through the same code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import method
from ..losses import chunked_multi_hot_cross_entropy
from ..models import moe_shape, router_aux_loss
from ..models.configs import logit_map
from .config import RunConfig


def expert_load(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Share of routed token slots each expert received, per layer: ``[layers, experts]`` (uniform = 1/experts).

    Counted with ``scatter_add`` into a fixed-size tensor, so no data-dependent shape and no host sync (``bincount``
    must read its maximum back to size its output).
    """
    loads = []
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.zeros(logits.shape[-1], device=logits.device).scatter_add_(
            0, chosen, torch.ones_like(chosen, dtype=torch.float32))
        loads.append(counts / chosen.numel())
    return torch.stack(loads)


class Objective(NamedTuple):
    """One micro-batch's objective: the TST loss, and for MoE models the router loss and expert load."""

    loss: torch.Tensor
    aux: torch.Tensor | None = None
    load: torch.Tensor | None = None


class LMObjective(torch.nn.Module):
    """A Hugging Face causal LM under the TST objective: windows in, :class:`Objective` out.

    The backbone (``lm.base_model``) runs on ``L`` positions of bag means; the head, the family's logit map (Gemma 2's
    soft cap, Cohere's and Granite's scales) and the multi-hot loss follow, either on full logits or fused and
    chunked (``loss_chunk``) so ``[B*L, V]`` logits are never held at once. The options are the run config's
    ``tst.rescale_mean``, ``tst.weighting``, ``tst.alpha``, ``train.loss_chunk`` and ``train.compile``
    (:meth:`from_config`); ``TSTTrainer`` passes its own.
    """

    def __init__(self, lm: torch.nn.Module, *, rescale_mean: bool = False, weighting: str = "uniform",
                 alpha: float = 1.0, loss_chunk: int = 0, compile_loss: bool = False):
        super().__init__()
        self.lm = lm
        self.rescale_mean, self.weighting, self.alpha = rescale_mean, weighting, alpha
        self.loss_chunk = loss_chunk
        self.compile_loss = compile_loss
        self.logit_map = logit_map(lm.config)
        self.num_experts, self.top_k = moe_shape(lm.config)
        self.aux_coef = float(getattr(lm.config, "router_aux_loss_coef", 0.0) or 0.0)
        """Weight of the MoE router loss (:attr:`Objective.aux`) in the loss to minimise."""

    @classmethod
    def from_config(cls, lm: torch.nn.Module, cfg: RunConfig) -> LMObjective:
        return cls(lm, rescale_mean=cfg.tst.rescale_mean, weighting=cfg.tst.weighting, alpha=cfg.tst.alpha,
                   loss_chunk=cfg.train.loss_chunk, compile_loss=cfg.train.compile)

    def forward(self, window: torch.Tensor, bag: int, mode: str) -> Objective:
        input_ids, targets = method.split_window(window, bag, mode)
        embedding = self.lm.get_input_embeddings()
        x = method.embed_inputs(embedding, input_ids, bag, mode, self.rescale_mean)
        scale = getattr(embedding, "embed_scale", None)  # Gemma scales lookups (by sqrt(d)) inside its embedding
        if scale is not None:
            x = x * scale.to(x.dtype)
        extra = {"output_router_logits": True} if self.num_experts else {}
        out = self.lm.base_model(inputs_embeds=x, use_cache=False, **extra)
        w = None if mode == "input" else method.target_weights(bag, self.weighting, self.alpha)
        head = self.lm.get_output_embeddings()
        if self.loss_chunk:
            loss = chunked_multi_hot_cross_entropy(out.last_hidden_state, head.weight, targets,
                                                   chunk_size=self.loss_chunk, weights=w, bias=head.bias,
                                                   compiled=self.compile_loss, logit_map=self.logit_map)
        else:
            loss = method.multi_hot_cross_entropy(self.logits(out.last_hidden_state), targets, weights=w)
        if not self.num_experts:
            return Objective(loss)
        with torch.no_grad():
            load = expert_load(out.router_logits, self.top_k)
        return Objective(loss, router_aux_loss(self.lm, out), load)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the model serves: its head, then its logit map (in fp32 when there is one, as the loss)."""
        logits = self.lm.get_output_embeddings()(hidden)
        return logits if self.logit_map.identity else self.logit_map(logits.float())
