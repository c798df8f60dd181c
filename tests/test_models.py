"""Model presets: shapes and counts on meta, tiny forwards on CPU, seeded init."""

from __future__ import annotations

import math

import pytest
import torch

from superpose.errors import SuperposeError
from superpose.models import (
    PRESETS,
    build_model,
    custom_config,
    describe_presets,
    expected_parameter_counts,
    init_weights,
    materialize,
    model_config,
    parameter_counts,
    router_aux_loss,
    use_causal_sdpa,
)
from superpose.models.build import _row_blocks

TINY = ["tiny", "tiny-qwen3", "tiny-moe"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_with_expected_counts(name: str) -> None:
    model = build_model(name, device="meta")
    assert model.config.vocab_size == PRESETS[name].vocab_size
    assert model.config._attn_implementation == "sdpa"
    assert parameter_counts(model) == expected_parameter_counts(name)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("llama-270m", 0.8 * 270e6, 1.2 * 270e6),
        ("llama-600m", 0.8 * 600e6, 1.2 * 600e6),
        ("smollm3-3b", 0.8 * 3e9, 1.2 * 3e9),
        ("qwen3-moe-10b-a1b", 9e9, 11e9),
    ],
)
def test_paper_presets_are_near_their_nominal_size(name: str, low: float, high: float) -> None:
    total, active = expected_parameter_counts(name)
    assert low <= total <= high
    if name == "qwen3-moe-10b-a1b":
        assert 0.8e9 <= active <= 1.3e9
    else:
        assert active == total


def test_moe_config_returns_router_loss_and_counts_active_experts() -> None:
    config = model_config("tiny-moe")
    assert config.output_router_logits is True
    assert config.router_aux_loss_coef > 0
    total, active = parameter_counts(config)
    p = PRESETS["tiny-moe"]
    idle_experts = p.num_hidden_layers * (p.num_experts - p.num_experts_per_tok)
    assert total - active == idle_experts * 3 * p.hidden_size * p.moe_intermediate_size


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_run_forward_on_inputs_embeds(name: str) -> None:
    model = build_model(name, vocab_size=300, seed=1)
    d = model.config.hidden_size
    out = model(inputs_embeds=torch.randn(2, 16, d))
    assert out.logits.shape == (2, 16, 300)
    assert torch.isfinite(out.logits).all()
    if name == "tiny-moe":
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


def test_vocab_size_argument_overrides_preset_default() -> None:
    model = build_model("tiny", vocab_size=1000, device="meta")
    assert model.config.vocab_size == 1000
    assert model.get_input_embeddings().weight.shape == (1000, 128)
    assert parameter_counts(model) == expected_parameter_counts("tiny", vocab_size=1000)
    assert model_config("small").vocab_size == 8192


def test_shape_overrides_change_the_model() -> None:
    config = model_config("tiny", hidden_size=64, num_hidden_layers=2)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 2, 16)
    assert parameter_counts(config) == expected_parameter_counts("tiny", hidden_size=64, num_hidden_layers=2)


def test_unknown_preset_lists_known_names() -> None:
    with pytest.raises(SuperposeError, match="tiny-moe"):
        model_config("huge")
    with pytest.raises(SuperposeError):
        build_model("huge")


def test_unknown_or_invalid_override_is_a_user_error() -> None:
    with pytest.raises(SuperposeError, match="hidden_sise"):
        model_config("tiny", hidden_sise=64)
    with pytest.raises(SuperposeError, match="divisible"):
        model_config("tiny", hidden_size=130)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_init_is_deterministic_seed_dependent_and_ignores_global_rng() -> None:
    torch.manual_seed(123)
    a = _state(build_model("tiny-moe", seed=7))
    torch.manual_seed(456)  # different global state, different HF default init underneath
    b = _state(build_model("tiny-moe", seed=7))
    c = _state(build_model("tiny-moe", seed=8))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])

    model = build_model("tiny", seed=0)
    init_weights(model, seed=3)
    first = _state(model)
    torch.manual_seed(999)
    init_weights(model, seed=3)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())


def test_init_leaves_global_rng_untouched() -> None:
    model = build_model("tiny", seed=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    init_weights(model, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_init_distribution_per_parameter_kind() -> None:
    model = build_model("tiny-moe", seed=0)
    layers = model.config.num_hidden_layers
    out_std = 0.02 / math.sqrt(2 * layers)
    params = dict(model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives our init
    assert torch.all(params["model.norm.weight"] == 1)
    assert torch.all(params["model.layers.0.self_attn.q_norm.weight"] == 1)
    assert params["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert params["model.layers.0.self_attn.o_proj.weight"].std().item() == pytest.approx(out_std, rel=0.1)
    experts_down = [p for n, p in params.items() if ".experts." in n and "down" in n]
    experts_up = [p for n, p in params.items() if ".experts." in n and "down" not in n]
    assert experts_down and experts_up
    assert experts_down[0].std().item() == pytest.approx(out_std, rel=0.1)
    assert experts_up[0].std().item() == pytest.approx(0.02, rel=0.1)
    router = params["model.layers.0.mlp.gate.weight"]
    assert router.std().item() == pytest.approx(0.02, rel=0.2)


def test_init_is_identical_across_dtypes() -> None:
    fp32 = build_model("tiny", seed=4)
    bf16 = build_model("tiny", seed=4, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_untied_preset_keeps_a_separate_head() -> None:
    model = build_model("llama-270m", device="meta")
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_describe_presets_lists_every_preset() -> None:
    table = describe_presets()
    assert all(name in table for name in PRESETS)
    assert "10.1B" in table and "1.04B" in table


def test_meta_build_then_materialize_equals_a_direct_build() -> None:
    shell = build_model("tiny-qwen3", 300, device="meta")
    assert all(p.is_meta for p in shell.parameters())
    materialize(shell, torch.device("cpu"), seed=3)
    direct = build_model("tiny-qwen3", 300, seed=3)
    assert shell.lm_head.weight is shell.model.embed_tokens.weight  # tying survives materialising
    assert all(torch.equal(a, b) for a, b in zip(shell.state_dict().values(), direct.state_dict().values()))
    assert torch.equal(shell.model.rotary_emb.inv_freq, direct.model.rotary_emb.inv_freq)
    resumed = build_model("tiny-qwen3", 300, device="meta")
    materialize(resumed, torch.device("cpu"), seed=None)  # resuming: storage only, the checkpoint fills it
    assert torch.equal(resumed.model.rotary_emb.inv_freq, direct.model.rotary_emb.inv_freq)


@pytest.mark.parametrize(("start", "stop"), [(0, 7), (3, 5), (6, 7), (2, 2)])
def test_any_rows_of_a_parameter_draw_the_same_values(start: int, stop: int) -> None:
    """A shard draws its own rows only, and they are the rows a whole-tensor draw gives (across block edges too)."""
    shape = torch.Size([7, 300_000])  # 3 rows per block of 2**20 values

    def draw(start: int, stop: int, name: str = "w") -> torch.Tensor:
        blocks = list(_row_blocks(shape, start, stop, 0.02, seed=1, name=name))
        assert all(row + len(values) <= stop and len(values) <= 3 for row, values in blocks)
        return torch.cat([values for _, values in blocks]) if blocks else torch.empty(0, shape[1])

    whole = draw(0, 7)
    assert torch.equal(draw(start, stop), whole[start:stop])
    assert not torch.equal(draw(0, 7, name="v"), whole)


def test_router_loss_is_the_models_own_from_either_output() -> None:
    model = build_model("tiny-moe", 300, seed=0)
    ids = torch.randint(0, 300, (2, 16))
    own = model(input_ids=ids).aux_loss
    backbone = model.model(input_ids=ids, output_router_logits=True)
    assert torch.equal(router_aux_loss(model, backbone), own)
    dense = build_model("tiny", 300)
    assert router_aux_loss(dense, dense.model(input_ids=ids)) is None


def test_moe_experts_run_as_grouped_matmuls() -> None:
    assert build_model("tiny-moe", device="meta").config._experts_implementation == "grouped_mm"


def test_causal_sdpa_gives_the_same_logits_without_a_mask() -> None:
    model = build_model("tiny", 300, seed=0)
    ids = torch.randint(0, 300, (2, 16))
    plain = model(input_ids=ids).logits
    use_causal_sdpa(model)
    assert torch.equal(model(input_ids=ids).logits, plain)


def _tiny_config(tmp_path, model_type: str, **fields) -> str:
    from transformers import AutoConfig

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, head_dim=8, vocab_size=1024, pad_token_id=None, bos_token_id=None,
                 eos_token_id=None)
    AutoConfig.for_model(model_type, **{**shape, **fields}).save_pretrained(tmp_path / model_type)
    return str(tmp_path / model_type)


def test_buffers_and_norm_gains_are_the_familys_own(tmp_path) -> None:
    """Gemma 3: 1 + w norms start at 0, embeddings carry sqrt(d), rotary frequencies per layer type; as transformers
    itself initialises them, with the matrices ours (seeded), and the same after a meta build for a checkpoint."""
    from transformers import AutoModelForCausalLM

    config = custom_config(_tiny_config(tmp_path, "gemma3_text"), 300)
    ours = build_model(config, seed=0)
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(config)
    assert all(torch.equal(b, dict(theirs.named_buffers())[n]) for n, b in ours.named_buffers())
    gains = {n: p for n, p in ours.named_parameters() if p.ndim == 1}
    assert gains and all(torch.all(p == 0) for p in gains.values())
    assert ours.model.embed_tokens.embed_scale.item() == pytest.approx(32**0.5)
    resumed = build_model(config, device="meta")
    materialize(resumed, torch.device("cpu"), seed=None)
    assert all(torch.equal(b, dict(ours.named_buffers())[n]) for n, b in resumed.named_buffers())


def test_config_overrides_apply_to_the_configs_own_fields(tmp_path) -> None:
    path = _tiny_config(tmp_path, "olmo2")
    config = custom_config(path, 300, {"intermediate_size": 96, "rms_norm_eps": 1e-5, "use_cache": True})
    assert (config.intermediate_size, config.rms_norm_eps, config.vocab_size) == (96, 1e-5, 300)
    assert config.use_cache is False  # training never caches
    for overrides, problem in [({"vocab_size": 8}, "comes from the prepared data"),
                               ({"no_such_field": 1}, "olmo2 config has no such field"),
                               ({"hidden_size": 32.5}, "must be of the type of the config's value 32 \\(int\\)"),
                               ({"attention_bias": 1}, "must be of the type of the config's value False")]:
        with pytest.raises(SuperposeError, match=problem):
            custom_config(path, 300, overrides)
    with pytest.raises(SuperposeError, match="holds no config.json"):
        custom_config(str(tmp_path), 300)
