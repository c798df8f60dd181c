"""Training FLOPs, so TST and baseline runs can be compared at equal compute.

Convention (PaLM, Chowdhery et al. 2022, appendix B): per position, forward + backward costs
6 * N + 12 * n_layers * n_heads * head_dim * seq_len, where N counts the active parameters that
take part in matrix multiplies (attention and MLP/expert projections, the MoE router and the LM
head; not the input-embedding lookup nor norm gains). The attention term covers QK^T and AV for
the full L x L score matrix: causal masking is NOT halved, matching PaLM and most MFU reports.

A TST phase-1 step runs the transformer on the same L positions as a baseline step (each position
holds the mean embedding of a bag of tokens), so its model FLOPs equal `flops_per_step` at that L;
only the bag mean and the multi-hot target gather are extra, see `superpose_overhead_flops`.

`mfu` sets those model FLOPs per second against the GPU's dense bf16 peak (`peak_bf16_flops`, by device name). The
parameter arithmetic (attention, MLP/experts, head width) is `superpose.models`', shared with its count checks; it
describes the preset families (bias-free attention, SwiGLU MLP). Any other family (``model.config``) counts its
matmul parameters on a weightless build instead (`counted_matmul_parameters`): the same 6 * N * T convention, with N
read off the model rather than derived from its shape (the two agree on the presets).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from .models import attention_parameters, build_model, mlp_parameters, moe_shape, resolve_head_dim

_ARITHMETIC_FAMILIES = frozenset({"llama", "qwen3", "qwen3_moe", "smollm3"})
"""Model types whose matmul parameters the preset arithmetic describes exactly."""


def _is_sparse_layer(config: PretrainedConfig, layer: int) -> bool:
    """Whether a layer routes to experts, following the Qwen-MoE rules (sparse step, dense-only list)."""
    if not getattr(config, "num_experts", 0):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = getattr(config, "mlp_only_layers", None) or []
    return layer not in dense_only and (layer + 1) % step == 0


def counted_matmul_parameters(config: PretrainedConfig) -> int:
    """:func:`matmul_parameters` for any family, counted on a meta-device build: every weight of two or more
    dimensions except embedding lookups (token, position), routed experts at ``experts per token / experts``, plus
    the LM head when it is tied to the embedding."""
    model = build_model(config, device="meta")
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    experts, top_k = moe_shape(config)
    total = 0
    for name, param in model.named_parameters():
        if param.ndim < 2 or id(param) in lookups:
            continue
        routed = experts and ".experts." in f".{name}"
        total += param.numel() * top_k // experts if routed else param.numel()
    head = model.get_output_embeddings().weight
    return total + (head.numel() if id(head) in lookups else 0)


def matmul_parameters(config: PretrainedConfig) -> int:
    """Active parameters that take part in matmuls per position, LM head included, embeddings lookup not."""
    if config.model_type not in _ARITHMETIC_FAMILIES:
        return counted_matmul_parameters(config)
    total = config.vocab_size * config.hidden_size  # LM head (a matmul even when tied to the embedding)
    for layer in range(config.num_hidden_layers):
        total += attention_parameters(config) + mlp_parameters(config, _is_sparse_layer(config, layer))[1]
    return total


def flops_per_token(config: PretrainedConfig, seq_len: int) -> int:
    """Forward + backward model FLOPs per position at context length `seq_len` (PaLM convention)."""
    heads = getattr(config, "num_attention_heads", 0) or 0  # 0: a family without attention (no score matrix)
    attention_scores = 12 * config.num_hidden_layers * heads * resolve_head_dim(config) * seq_len if heads else 0
    return 6 * matmul_parameters(config) + attention_scores


def flops_per_step(config: PretrainedConfig, batch_size: int, seq_len: int) -> int:
    """Model FLOPs of one optimizer step over batch_size x seq_len positions (same L at any bag size)."""
    return flops_per_token(config, seq_len) * batch_size * seq_len


def superpose_overhead_flops(config: PretrainedConfig, batch_size: int, seq_len: int, bag: int) -> int:
    """Extra FLOPs a TST step adds on top of `flops_per_step`, counting each add/multiply/gather as one.

    Per position and per direction (forward, then the mirrored backward): summing `bag` embedding
    rows (bag * d) and scaling by 1/bag (d), plus gathering and summing the `bag` target
    log-probabilities of the multi-hot loss (2 * bag). It is O(bag * d) against the model's
    O(N), i.e. negligible; a benchmark can print the ratio to show it.
    """
    d = config.hidden_size
    per_position = bag * d + d + 2 * bag
    return 2 * per_position * batch_size * seq_len


# Dense bf16 tensor-core peak FLOP/s (no 2:4 sparsity) from the vendors' data sheets, by device-name fragment; the
# more specific names come first ("H100 PCIe" before "H100", which is the SXM part).
_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named as ``torch.cuda.get_device_name()`` names it; None when unknown."""
    return next((peak for fragment, peak in _BF16_PEAK if fragment in device_name), None)


def mfu(model_flops: float, seconds: float, device_name: str, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the bf16 peak of ``devices`` GPUs; None when unknown.

    ``model_flops`` is what :func:`flops_per_step` counts (no recomputation from activation checkpointing, as MFU
    is defined by PaLM); the loop passes one step's FLOPs and its wall time.
    """
    peak = peak_bf16_flops(device_name)
    if peak is None or seconds <= 0:
        return None
    return model_flops / seconds / (peak * devices)
