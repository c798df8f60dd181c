"""Training FLOPs, so TST and baseline runs can be compared at equal compute.

Convention (PaLM, Chowdhery et al. 2022, appendix B): per position, forward + backward costs
6 * N + 12 * n_layers * n_heads * head_dim * seq_len, where N counts the active parameters that
take part in matrix multiplies (attention and MLP/expert projections, the MoE router and the LM
head; not the input-embedding lookup nor norm gains). The attention term covers QK^T and AV for
the full L x L score matrix: causal masking is NOT halved, matching PaLM and most MFU reports.

A TST phase-1 step runs the transformer on the same L positions as a baseline step (each position
holds the mean embedding of a bag of tokens), so its model FLOPs equal `flops_per_step` at that L;
only the bag mean and the multi-hot target gather are extra, see `superpose_overhead_flops`.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def _is_sparse_layer(config: PretrainedConfig, layer: int) -> bool:
    """Whether a layer routes to experts, following the Qwen-MoE rules (sparse step, dense-only list)."""
    if not getattr(config, "num_experts", 0):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = getattr(config, "mlp_only_layers", None) or []
    return layer not in dense_only and (layer + 1) % step == 0


def matmul_parameters(config: PretrainedConfig) -> int:
    """Active parameters that take part in matmuls per position, LM head included, embeddings lookup not."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d
    total = config.vocab_size * d  # LM head (a matmul even when tied to the embedding)
    for layer in range(config.num_hidden_layers):
        total += attention
        if _is_sparse_layer(config, layer):
            routed = config.num_experts_per_tok * 3 * d * config.moe_intermediate_size
            total += routed + d * config.num_experts  # active experts + router
        else:
            total += 3 * d * config.intermediate_size  # SwiGLU: gate, up, down
    return total


def flops_per_token(config: PretrainedConfig, seq_len: int) -> int:
    """Forward + backward model FLOPs per position at context length `seq_len` (PaLM convention)."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attention_scores = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
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
