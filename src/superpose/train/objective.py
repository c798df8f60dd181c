"""The TST objective as one module: a causal LM, the bag mean and the multi-hot loss, windows in, loss out.

A distributed wrapper (FSDP2, DDP) wraps this module, so the bag mean and the loss run inside its forward, and the
trainer and ``TSTTrainer`` score a batch through the same code. The bag mean is a method of the input embedding
module (:data:`BAG_MEANS`), so a wrapper that gives the embeddings a unit of their own can run its hooks around it.
"""

from __future__ import annotations

import types
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


BAG_MEANS = "superpose_bag_means"
"""The name of the bag-mean method :class:`LMObjective` gives the model's input embedding module."""


def superpose_bag_means(embedding: torch.nn.Module, bags: torch.Tensor, rescale: bool) -> torch.Tensor:
    """The embedding module's :data:`BAG_MEANS` method: ids ``[N, bag]`` -> means ``[N, d]`` of its weight.

    The objective never calls the module's forward (the bag mean reads the table with ``embedding_bag``), so a
    wrapper that shards the table must treat this method as a forward: FSDP2's ``register_fsdp_forward_method``
    gathers the table on entry and frees it on return. It returns rows, not the ``[B, L, d]`` view of them: hooks
    on a view's gradient are lost to in-place ops, and FSDP2 warns about a unit returning one.
    """
    return method.bag_means(embedding.weight, bags, rescale)


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

    embedding_methods: tuple[str, ...] = (BAG_MEANS,)
    """Methods of the input embedding module the objective calls in place of its forward (a wrapper that gives the
    embeddings a unit of their own runs its forward hooks around them)."""

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
        embedding = lm.get_input_embeddings()
        if not hasattr(embedding, BAG_MEANS):  # a second objective over the model keeps a wrapped one
            setattr(embedding, BAG_MEANS, types.MethodType(superpose_bag_means, embedding))

    @property
    def embedding_backward_reads_weight(self) -> bool:
        """Whether backward reads the embedding table: only the rescaled mean's norms do (a lookup's or a plain
        mean's gradient needs the ids alone), so otherwise a sharded table need not be gathered again for it."""
        return self.rescale_mean

    @classmethod
    def from_config(cls, lm: torch.nn.Module, cfg: RunConfig) -> LMObjective:
        return cls(lm, rescale_mean=cfg.tst.rescale_mean, weighting=cfg.tst.weighting, alpha=cfg.tst.alpha,
                   loss_chunk=cfg.train.loss_chunk, compile_loss=cfg.train.compile)

    def forward(self, window: torch.Tensor, bag: int, mode: str) -> Objective:
        input_ids, targets = method.split_window(window, bag, mode)
        x = self.embed(input_ids, method.input_bag(bag, mode))
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

    def embed(self, input_ids: torch.Tensor, bag: int) -> torch.Tensor:
        """The backbone's inputs ``[B, L, d]`` from ids ``[B, L*bag]``: the embedding module's bag means (as
        :func:`method.superpose_embeddings`), times the scale Gemma applies inside its embedding's forward."""
        embedding = self.lm.get_input_embeddings()
        rows = getattr(embedding, BAG_MEANS)(input_ids.reshape(-1, bag), self.rescale_mean)
        x = rows.view(input_ids.shape[0], -1, rows.shape[-1])
        scale = getattr(embedding, "embed_scale", None)  # Gemma: sqrt(d)
        return x if scale is None else x * scale.to(x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the model serves: its head, then its logit map (in fp32 when there is one, as the loss)."""
        logits = self.lm.get_output_embeddings()(hidden)
        return logits if self.logit_map.identity else self.logit_map(logits.float())
