"""Token Superposition Training as pure tensor functions.

Everything TST changes lives here, and only the bag size drives it: a window of ``(L+1)*bag`` tokens becomes ``L``
input positions (the mean of each bag's embeddings) and ``L`` next-bag targets scored with a multi-hot
cross-entropy. With ``bag = 1`` every function reduces exactly to ordinary next-token training, so a trainer has one
code path. No config, no I/O, no imports from the rest of the package.

Objectives (``mode``), all at the same transformer cost per step (``L`` positions):

- ``"both"`` (TST): bagged inputs, multi-hot CE over the next bag.
- ``"input"``: bagged inputs, ordinary CE on the first token of the next bag.
- ``"output"``: ordinary token inputs, multi-hot CE over the next ``bag`` tokens.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

Mode = Literal["both", "input", "output"]
MODES: tuple[str, ...] = ("both", "input", "output")
WEIGHTINGS: tuple[str, ...] = ("uniform", "power")


def _check_bag(bag: int) -> None:
    if not isinstance(bag, int) or bag < 1:
        raise ValueError(f"bag must be an integer >= 1, got {bag!r}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def superpose_embeddings(
    embedding: torch.nn.Embedding | torch.Tensor, token_ids: torch.Tensor, bag: int, rescale: bool = False
) -> torch.Tensor:
    """Mean of the ``bag`` token embeddings of each bag: ids ``[B, L*bag]`` -> ``[B, L, d]`` (:func:`bag_means`)."""
    _check_bag(bag)
    weight = embedding.weight if isinstance(embedding, torch.nn.Embedding) else embedding
    batch, length = token_ids.shape
    if length % bag:
        raise ValueError(f"sequence of {length} tokens is not a whole number of bags of {bag}")
    return bag_means(weight, token_ids.reshape(-1, bag), rescale).view(batch, length // bag, weight.shape[1])


def bag_means(weight: torch.Tensor, bags: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    """Mean embedding of each row of ``bags``: ids ``[N, bag]`` -> ``[N, d]``, a new tensor (not a view).

    Uses ``embedding_bag`` so the ``[N, bag, d]`` per-token embeddings are never materialised; with one token per
    row the result equals a plain embedding lookup bit for bit.

    ``rescale`` (an option, off in the paper's recipe): averaging nearly orthogonal vectors shrinks the norm by about
    ``sqrt(bag)``, so phase-1 inputs live at a smaller scale than phase-2 tokens; rescaling each mean to the mean norm
    of its bag's embeddings keeps the scale the transformer sees the same across the switch.
    """
    if bags.shape[1] == 1:
        return F.embedding(bags[:, 0], weight)
    pooled = F.embedding_bag(bags, weight, mode="mean")
    if rescale:
        target = F.embedding_bag(bags, weight.norm(dim=-1, keepdim=True), mode="mean")  # [N, 1]
        pooled = pooled * (target / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return pooled


def target_weights(bag: int, weighting: str = "uniform", alpha: float = 1.0) -> torch.Tensor | None:
    """Weights over the positions of the next bag, summing to 1; ``None`` means uniform (the paper's default).

    ``"power"`` gives position ``k`` (0 = the token right after the current bag) weight proportional to
    ``(k+1)**-alpha``: nearer tokens count more, which one source reports helps for large bags.
    """
    _check_bag(bag)
    if weighting == "uniform" or bag == 1:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        return None
    if weighting != "power":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    w = torch.arange(1, bag + 1, dtype=torch.float32).pow(-alpha)
    return w / w.sum()


def multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-hot cross-entropy: logits ``[B, L, V]``, next-bag targets ``[B, L, bag]`` -> scalar.

    The mean over valid targets of ``logsumexp(z) - z[t]``, i.e. the mean of ``bag`` ordinary CE terms on the same
    logits, with duplicates counted per occurrence. The log-normaliser is computed once (one ``log_softmax``, as
    ``F.cross_entropy`` does); only ``bag`` entries per position are gathered, never ``bag`` copies of the logits.
    Logits are scored in fp32. With ``bag = 1`` and no weights this is bitwise ``F.cross_entropy``: the same
    ``log_softmax`` followed by the same ``nll_loss`` reduction over the same values in the same order.

    ``weights`` (``[bag]``, e.g. from :func:`target_weights`) weights target positions within the bag; the result is
    then the weighted mean over valid targets.
    """
    if logits.dim() != 3 or targets.dim() != 3 or logits.shape[:2] != targets.shape[:2]:
        raise ValueError(f"expected logits [B, L, V] and targets [B, L, bag], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0))  # [B, L, bag]
    if weights is None:
        index = torch.where(valid, 0, ignore_index).reshape(-1)
        return F.nll_loss(picked.reshape(-1, 1), index, ignore_index=ignore_index)
    w = weights.to(device=picked.device, dtype=picked.dtype) * valid
    return -(picked * w).sum() / w.sum()


def window_length(seq_len: int, bag: int, mode: Mode = "both") -> int:
    """Tokens one training window must hold for ``seq_len`` positions at this bag size.

    ``both``/``input`` read ``L`` input bags plus the next bag: ``(L+1)*bag``. ``output`` reads ``L`` input tokens
    plus the ``bag`` tokens after the last one: ``L + bag``. At ``bag = 1`` every mode reads ``L + 1``.
    """
    _check_bag(bag)
    _check_mode(mode)
    return seq_len + bag if mode == "output" else (seq_len + 1) * bag


def split_window(window: torch.Tensor, bag: int, mode: Mode = "both") -> tuple[torch.Tensor, torch.Tensor]:
    """Cut token windows ``[B, window_length]`` into input ids and targets ``[B, L, k]``.

    Inputs are ``[B, L*bag]`` for ``both``/``input`` (to be bag-averaged) and ``[B, L]`` for ``output``. Targets hold
    the next bag (``both``), its first token (``input``, ``k = 1``) or the next ``bag`` tokens (``output``).
    """
    _check_bag(bag)
    _check_mode(mode)
    batch, total = window.shape
    if mode == "output":
        seq_len = total - bag
        targets = window[:, 1:].unfold(1, bag, 1)[:, :seq_len]
        return window[:, :seq_len], targets
    if total % bag:
        raise ValueError(f"window of {total} tokens is not a whole number of bags of {bag}")
    seq_len = total // bag - 1
    targets = window[:, bag:].reshape(batch, seq_len, bag)
    if mode == "input":
        targets = targets[..., :1]
    return window[:, : seq_len * bag], targets


def embed_inputs(
    embedding: torch.nn.Embedding | torch.Tensor,
    input_ids: torch.Tensor,
    bag: int,
    mode: Mode = "both",
    rescale: bool = False,
) -> torch.Tensor:
    """Input embeddings ``[B, L, d]`` for the objective: bag means, or plain token embeddings for ``output``."""
    return superpose_embeddings(embedding, input_ids, input_bag(bag, mode), rescale)


def input_bag(bag: int, mode: Mode = "both") -> int:
    """Tokens averaged into one input position: the bag, or 1 in ``output`` mode (token inputs)."""
    _check_bag(bag)
    _check_mode(mode)
    return 1 if mode == "output" else bag


def tst_loss(
    model_forward: Callable[[torch.Tensor], torch.Tensor],
    embedding: torch.nn.Embedding | torch.Tensor,
    window: torch.Tensor,
    bag: int,
    mode: Mode = "both",
    weights: torch.Tensor | None = None,
    rescale: bool = False,
) -> torch.Tensor:
    """One objective evaluation: ``model_forward(inputs_embeds) -> logits``; the whole method in four lines.

    ``weights`` apply to multi-hot targets only (``input`` mode has a single target per position); ``rescale`` is
    the bag-mean norm option of :func:`superpose_embeddings`.
    """
    input_ids, targets = split_window(window, bag, mode)
    logits = model_forward(embed_inputs(embedding, input_ids, bag, mode, rescale))
    return multi_hot_cross_entropy(logits, targets, weights=None if mode == "input" else weights)
