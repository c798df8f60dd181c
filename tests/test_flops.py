"""FLOPs accounting: a hand-computed case, MoE active-only counting, TST overhead is negligible."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen3MoeConfig

from superpose.flops import (
    attention_flops_per_token,
    flops_per_step,
    flops_per_token,
    mfu,
    mfu_both,
    peak_bf16_flops,
    matmul_parameters,
    superpose_overhead_flops,
)
from superpose.models import build_model, model_config, parameter_counts


def _small_llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def test_hand_computed_dense_value() -> None:
    # head_dim 4; attention q 16*16 + k,v 2*16*8 + o 16*16 = 768; SwiGLU 3*16*32 = 1536
    # N = 2 layers * (768 + 1536) + head 100*16 = 6208; 6N = 37248
    # attention scores at L=8: 12 * 2 layers * 4 heads * 4 head_dim * 8 = 3072
    config = _small_llama()
    assert matmul_parameters(config) == 6208
    assert flops_per_token(config, 8) == 37248 + 3072
    assert flops_per_step(config, batch_size=3, seq_len=8) == (37248 + 3072) * 3 * 8


def test_causal_attention_counts_the_half_a_causal_kernel_computes() -> None:
    config = _small_llama()
    assert attention_flops_per_token(config, 8, causal=True) == 3072 // 2
    assert flops_per_step(config, 3, 8, causal=True) == (37248 + 1536) * 3 * 8
    # the default stays the PaLM count that runs log and compare reports read
    assert flops_per_step(config, 3, 8) == flops_per_step(config, 3, 8, causal=False)


def test_mfu_both_reports_causal_and_palm_figures() -> None:
    # llama-600m at L 2048: the PaLM count reads ~13% higher than the causal work done
    config = model_config("llama-600m")
    both = mfu_both(config, 8, 2048, 1.0, "NVIDIA H100 80GB HBM3")
    assert both["mfu"] == pytest.approx(flops_per_step(config, 8, 2048, causal=True) / 989e12)
    assert both["mfu_noncausal"] == pytest.approx(flops_per_step(config, 8, 2048) / 989e12)
    assert 1.10 < both["mfu_noncausal"] / both["mfu"] < 1.15
    assert mfu_both(config, 8, 2048, 1.0, "cpu") == {"mfu": None, "mfu_noncausal": None}


def _moe(num_experts: int, top_k: int, **kwargs: object) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        **kwargs,
    )


def test_moe_counts_only_routed_experts() -> None:
    # per layer: attention 768 + router 16*E + k experts * 3*16*8; head 1600
    assert matmul_parameters(_moe(8, 2)) == 2 * (768 + 16 * 8 + 2 * 384) + 1600
    # more idle experts cost only their router columns, not their FFNs
    assert matmul_parameters(_moe(64, 2)) - matmul_parameters(_moe(8, 2)) == 2 * 16 * 56
    # a dense-only layer uses the dense MLP instead
    assert matmul_parameters(_moe(8, 2, mlp_only_layers=[0])) == (768 + 1536) + (768 + 128 + 768) + 1600


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3", "tiny-moe", "llama-270m", "qwen3-moe-10b-a1b"])
def test_matmul_parameters_agree_with_the_built_model(preset: str) -> None:
    config = model_config(preset)
    model = build_model(config, device="meta")
    _, active = parameter_counts(model)
    norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    embedding = model.get_input_embeddings().weight.numel()
    # the head is a matmul even when it shares the embedding's storage
    tied_head = embedding if config.tie_word_embeddings else 0
    assert matmul_parameters(config) == active - norms - embedding + tied_head


def test_superpose_overhead_is_negligible_for_tiny() -> None:
    config = model_config("tiny")
    for seq_len in (64, 2048):
        ratio = superpose_overhead_flops(config, 8, seq_len, bag=16) / flops_per_step(config, 8, seq_len)
        assert 0 < ratio < 1e-3
    assert superpose_overhead_flops(config, 1, 1, bag=4) == 2 * (4 * 128 + 128 + 8)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_bf16_peak_by_gpu_name(name: str, peak: float | None) -> None:
    assert peak_bf16_flops(name) == peak


def test_mfu_is_achieved_over_peak() -> None:
    # 8 GPUs of 989 TFLOP/s, 4e15 model FLOPs in 1.25 s: 3.2e15 FLOP/s of 7.912e15
    assert mfu(4e15, 1.25, "NVIDIA H100 80GB HBM3", devices=8) == pytest.approx(3.2e15 / 7.912e15)
    assert mfu(4e15, 1.25, "cpu") is None
