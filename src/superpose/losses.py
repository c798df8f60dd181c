"""Memory-efficient multi-hot cross-entropy, fused with the LM head.

:func:`superpose.method.multi_hot_cross_entropy` takes full logits, so a caller holds ``[B*L, V]`` logits, their fp32
log-softmax and, in backward, their gradient: at a 150k vocabulary that dwarfs the rest of the activations. Here the
head matmul and the loss run over chunks of positions, and backward recomputes each chunk's logits and turns them
straight into ``grad_hidden`` rows and an in-place ``grad_weight`` accumulation, so at most a few ``[chunk, V]``
tensors are alive at any time, at any bag size. The cost is one extra head matmul (the recompute) per step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Reduction = Literal["mean", "sum"]


def multi_hot_normaliser(
    targets: torch.Tensor, ignore_index: int = -100, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The (weighted) count of valid targets, the denominator of the mean loss, as an fp32 scalar.

    Exposed so a distributed caller can all-reduce it and divide ``reduction="sum"`` losses by the global count.
    """
    valid = targets != ignore_index
    return _target_mass(valid, weights).sum()


def chunked_multi_hot_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``multi_hot_cross_entropy(hidden @ weight.T + bias, targets)`` without materialising the logits.

    hidden ``[B, L, d]``, weight ``[V, d]``, targets ``[B, L, bag]`` (``ignore_index`` marks padding), weights
    ``[bag]`` over positions in the bag. ``reduction="mean"`` divides by the local :func:`multi_hot_normaliser`;
    ``"sum"`` returns the unnormalised sum for callers that divide by an all-reduced count. Under autocast the
    matmuls run in the autocast dtype and the softmax in fp32 (fp64 inputs stay fp64), as for the full-logits path.
    """
    if hidden.dim() != 3 or targets.dim() != 3 or hidden.shape[:2] != targets.shape[:2]:
        raise ValueError(f"expected hidden [B, L, d] and targets [B, L, bag], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected weight [V, {hidden.shape[2]}], got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets2d = targets.reshape(-1, targets.shape[-1])
    valid = targets2d != ignore_index
    mass = _target_mass(valid, weights)
    index = torch.where(valid, targets2d, 0)
    total = _ChunkedMultiHotCE.apply(hidden2d, weight, bias, index, mass, chunk_size, compute_dtype)
    return total if reduction == "sum" else total / mass.sum()


def _target_mass(valid: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-target weight ``[..., bag]`` in fp32: the position weight where the target is valid, else 0."""
    if weights is None:
        return valid.float()
    return weights.to(device=valid.device, dtype=torch.float32) * valid


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One chunk's logits (``weight`` already in ``dtype``), returned in the softmax dtype: fp32, or fp64 for fp64."""
    logits = hidden.to(dtype) @ weight.T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits.to(torch.promote_types(dtype, torch.float32))


def _exp_shifted_(z: torch.Tensor) -> torch.Tensor:
    """Overwrite ``z`` with ``exp(z - max)`` row-wise and return the max: a stable softmax with no ``[chunk, V]`` copy."""
    shift = z.amax(-1, keepdim=True)
    z.sub_(shift).exp_()
    return shift


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp that consumes ``z`` (overwritten) instead of allocating temporaries of its size."""
    shift = _exp_shifted_(z)
    return z.sum(-1).log_().add_(shift.squeeze(-1))


class _ChunkedMultiHotCE(torch.autograd.Function):
    """Sum over positions of ``sum_j mass_j * (logsumexp(z) - z[t_j])``, with chunk-by-chunk forward and backward.

    The gradient w.r.t. a chunk's logits is ``mass.sum(-1) * softmax(z) - scatter(mass at t)``: built in place in the
    recomputed softmax, then consumed by two matmuls, so nothing of size ``[B*L, V]`` ever exists. Autocast is
    switched off inside; the caller's compute dtype is passed in so forward and backward cast identically.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        index: torch.Tensor,
        mass: torch.Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)
            total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
            weight_c = weight.to(compute_dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                z = _chunk_logits(hidden[rows], weight_c, bias, compute_dtype)
                picked = z.gather(-1, index[rows])
                lse = _logsumexp_(z)
                total += ((lse.unsqueeze(-1) - picked) * mass[rows].to(acc_dtype)).sum()
                del z
        ctx.save_for_backward(hidden, weight, bias, index, mass)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, index, mass = ctx.saved_tensors
        dtype = ctx.compute_dtype
        acc_dtype = torch.promote_types(dtype, torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        weight_c = weight.to(dtype)
        scale = grad_total.to(acc_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(dtype)
                m = mass[rows].to(acc_dtype) * scale
                dz = _chunk_logits(h, weight_c, bias, dtype)
                _exp_shifted_(dz)
                dz.mul_(m.sum(-1, keepdim=True) / dz.sum(-1, keepdim=True))  # softmax times the row's target mass
                dz.scatter_add_(-1, index[rows], -m)
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz = dz.to(dtype)
                if grad_h is not None:
                    grad_h[rows] = dz @ weight_c
                if grad_w is not None:
                    if acc_dtype == dtype:
                        grad_w.addmm_(dz.T, h)
                    else:
                        grad_w += dz.T @ h
                del dz
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None, None, None, None,
        )
