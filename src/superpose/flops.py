"""Training FLOPs, so TST and baseline runs can be compared at equal compute, and MFU.

Convention: per position, forward + backward costs 6 * N + (attention scores), where N counts the active parameters
that take part in matrix multiplies (attention and MLP/expert projections, the MoE router and the LM head; not the
input-embedding lookup nor norm gains). The attention scores (QK^T and AV) cost 12 * n_layers * n_heads * head_dim * L
per position for the full L x L score matrix: that is PaLM's count (Chowdhery et al. 2022, appendix B) and Megatron's,
and it is what `flops_per_step` counts, what a run logs as ``flops`` and what the compare reports use (the same for
TST and baseline at equal L, so a speedup does not depend on it; kept so logged totals stay comparable across
versions and resumes). A causal kernel (flash/SDPA with ``is_causal``) skips the masked half of the score matrix, so
the work it does is half that term: ``causal=True`` counts that (6 * ... * L). MFU is reported both ways
(`mfu_both`): ``mfu`` counts causal attention as the half it does, ``mfu_noncausal`` is the PaLM/Megatron figure,
which reads higher (x1.13 at llama-600m / L 2048, x1.18 at qwen3-moe-10b-a1b / L 4096).

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


def attention_flops_per_token(config: PretrainedConfig, seq_len: int, causal: bool = False) -> int:
    """Forward + backward FLOPs of the score matrix (QK^T and AV) per position: the full L x L matrix (PaLM,
    Megatron), or with ``causal`` the half a causal kernel computes."""
    heads = getattr(config, "num_attention_heads", 0) or 0  # 0: a family without attention (no score matrix)
    if not heads:
        return 0
    full = 12 * config.num_hidden_layers * heads * resolve_head_dim(config) * seq_len
    return full // 2 if causal else full


def flops_per_token(config: PretrainedConfig, seq_len: int, causal: bool = False) -> int:
    """Forward + backward model FLOPs per position at context length `seq_len` (PaLM convention unless ``causal``)."""
    return 6 * matmul_parameters(config) + attention_flops_per_token(config, seq_len, causal)


def flops_per_step(config: PretrainedConfig, batch_size: int, seq_len: int, causal: bool = False) -> int:
    """Model FLOPs of one optimizer step over batch_size x seq_len positions (same L at any bag size); the default
    is the PaLM count a run logs (see the module docstring)."""
    return flops_per_token(config, seq_len, causal) * batch_size * seq_len


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


# Dense bf16 tensor-core peak FLOP/s (no 2:4 sparsity: half the data sheets' headline "with sparsity" figures), by
# device-name fragment as torch.cuda.get_device_name() reports it; more specific names come first ("H100 NVL" before
# "H100"). Sources, NVIDIA's data sheets (BF16 Tensor Core, with sparsity -> dense):
#   H100 data sheet (nvidia.com/en-us/data-center/h100): SXM 1,979 -> 989; PCIe 1,513 -> 756; NVL 1,671 -> 835.
#   H200 data sheet (nvidia.com/en-us/data-center/h200): SXM 1,979 -> 989; NVL 1,671 -> 835 (600 W PCIe card).
#   GH200 (Grace Hopper superchip) data sheet: 1,979 -> 989 ("GH200" also contains "H200": listed before it).
#   HGX B200 (nvidia.com/en-us/data-center/hgx): 4.5 PFLOPS per GPU -> 2,250. A100 data sheet: 312 dense (624 sparse).
#   L40S data sheet: 733 -> 362 (362.05 listed dense).
_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
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


def mfu_both(config: PretrainedConfig, batch_size: int, seq_len: int, seconds: float, device_name: str,
             devices: int = 1) -> dict[str, float | None]:
    """MFU of one step of ``batch_size x seq_len`` positions in ``seconds``, both ways (module docstring):
    ``mfu`` with causal attention counted as the half it does, ``mfu_noncausal`` the PaLM/Megatron figure."""
    return {key: mfu(flops_per_step(config, batch_size, seq_len, causal), seconds, device_name, devices)
            for key, causal in (("mfu", True), ("mfu_noncausal", False))}
