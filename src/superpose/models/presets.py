"""The paper's model shapes as named presets: a config written here (no hub downloads), so a run is fully defined
by a preset name, a vocabulary size and a seed; the shape arithmetic the FLOPs count and the tests check."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, PretrainedConfig, Qwen3Config, Qwen3MoeConfig

from superpose.errors import SuperposeError
from superpose.files import first_line


_HAS_SMOLLM3 = hasattr(transformers, "SmolLM3Config")


@dataclass(frozen=True)
class Preset:
    """A named model shape; field names match the transformers config attributes they set."""

    name: str
    family: str  # "llama" | "qwen3" | "qwen3_moe" | "smollm3"
    description: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # default only: the tokenizer of the data usually dictates the real one
    tie_word_embeddings: bool
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    num_experts: int = 0  # 0: dense MLP in every layer
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.001
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6

    @property
    def resolved_head_dim(self) -> int:
        return resolve_head_dim(self)


def resolve_head_dim(shape: Preset | PretrainedConfig) -> int:
    """Per-head width of a preset or a transformers config: explicit for shapes whose attention width differs from
    hidden_size, else hidden_size / heads."""
    return getattr(shape, "head_dim", None) or shape.hidden_size // shape.num_attention_heads


def attention_parameters(shape: Preset | PretrainedConfig) -> int:
    """Q, K, V and O projection weights of one layer (no biases), from a preset or a transformers config."""
    d, hd = shape.hidden_size, resolve_head_dim(shape)
    q_width, kv_width = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    return 2 * d * q_width + 2 * d * kv_width


def mlp_parameters(shape: Preset | PretrainedConfig, sparse: bool) -> tuple[int, int]:
    """(total, active) weights of one layer's SwiGLU MLP, or of its routed experts plus router when ``sparse``."""
    d = shape.hidden_size
    if not sparse:
        return (3 * d * shape.intermediate_size,) * 2
    expert = 3 * d * shape.moe_intermediate_size  # gate, up, down
    router = d * shape.num_experts
    return shape.num_experts * expert + router, shape.num_experts_per_tok * expert + router


# Fields a caller may override (width/depth studies); identity and vocabulary are set elsewhere.
_OVERRIDABLE = frozenset(f.name for f in dataclasses.fields(Preset)) - {
    "name",
    "family",
    "description",
    "vocab_size",
}

_LLAMA3_VOCAB = 128_256
_QWEN3_VOCAB = 151_936

_TINY = Preset(
    name="tiny",
    family="llama",
    description="Llama, ~1.3M params at vocab 4096; trains on a 2-core CPU in minutes (smoke tests).",
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=384,
    vocab_size=4096,
    tie_word_embeddings=True,
)

_LLAMA_270M = Preset(
    name="llama-270m",
    family="llama",
    description=(
        "Paper 270M: SmolLM2-135M shape with the Llama-3 vocab (128256), untied head; "
        "comes to ~254M params."
    ),
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=_LLAMA3_VOCAB,
    tie_word_embeddings=False,
    rope_theta=100_000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _TINY,
        dataclasses.replace(
            _TINY,
            name="tiny-qwen3",
            family="qwen3",
            description="Qwen3 (qk-norm) at the size of `tiny`, to check TST across families on a CPU.",
        ),
        dataclasses.replace(
            _TINY,
            name="tiny-moe",
            family="qwen3_moe",
            description="Qwen3-MoE, 8 experts top-2 at `tiny` width; exercises routing and aux loss on a CPU.",
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
        ),
        Preset(
            name="small",
            family="llama",
            description="Llama, ~6.8M params at vocab 8192; a laptop run that shows real learning curves.",
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=768,
            vocab_size=8192,
            tie_word_embeddings=True,
        ),
        _LLAMA_270M,
        dataclasses.replace(
            _LLAMA_270M,
            name="llama-600m",
            description=(
                "Paper 600M: SmolLM2-360M shape with the Llama-3 vocab (128256), untied head; "
                "comes to ~561M params."
            ),
            hidden_size=960,
            num_hidden_layers=32,
            num_attention_heads=15,
            num_key_value_heads=5,
            intermediate_size=2560,
        ),
        Preset(
            name="smollm3-3b",
            family="smollm3" if _HAS_SMOLLM3 else "llama",
            description=(
                "Paper 3B: SmolLM3-3B shape (NoPE every 4th layer where transformers has SmolLM3), "
                "tied embeddings; comes to ~3.08B params."
            ),
            hidden_size=2048,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=4,
            intermediate_size=11008,
            vocab_size=_LLAMA3_VOCAB,
            tie_word_embeddings=True,
            rope_theta=50_000.0,
            max_position_embeddings=8192,
        ),
        Preset(
            name="qwen3-moe-10b-a1b",
            family="qwen3_moe",
            description=(
                "Paper 10B-A1B: Qwen3-MoE, d=1024, 24 layers, 16x128 query heads / 4 KV heads, "
                "128 experts (width 1024) top-8, Qwen3 vocab, untied; ~10.1B total, ~1.04B active."
            ),
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=3072,  # dense width, unused: every layer is sparse
            vocab_size=_QWEN3_VOCAB,
            tie_word_embeddings=False,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=1024,
            rope_theta=1_000_000.0,
            max_position_embeddings=8192,
        ),
    ]
}


_MAY_BE_ZERO = {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_aux_loss_coef"}
"""Overrides where 0 means "none" (a dense model, no router loss); every other size must be positive."""


def _checked_override(name: str, value: object) -> object:
    """An override of the type its Preset field has (ints for sizes, finite floats, bools), or a one-line error;
    the ranges of sizes are the shape's (:func:`check_shape`)."""
    kind = {f.name: str(f.type) for f in dataclasses.fields(Preset)}[name]
    low = 0 if name in _MAY_BE_ZERO else 1
    if kind == "bool":
        if not isinstance(value, bool):
            raise SuperposeError(f"model.overrides.{name}: must be true or false, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("int"):
        if not (number and isinstance(value, int) or (value is None and "None" in kind)):
            raise SuperposeError(f"model.overrides.{name}: must be an integer >= {low}, got {value!r}")
        return value
    if not (number and math.isfinite(value) and (value > 0 or (low == 0 and value == 0))):
        raise SuperposeError(f"model.overrides.{name}: must be a finite number {'>= 0' if low == 0 else '> 0'}, "
                             f"got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ShapeOrigin:
    """Where a shape was given, so that an error names the key at fault: an override names itself, a field of a
    ``model.config`` or ``model.init_from`` config names its file (a preset's own fields are valid: only overrides
    and the vocabulary size change them)."""

    key: str = "model.preset"
    source: str = ""
    overridden: frozenset[str] = frozenset()

    def field(self, name: str) -> str:
        if name in self.overridden:
            return f"model.overrides.{name}"
        return f"{self.key}.{name} (in {self.source})" if self.source else name

    def __str__(self) -> str:
        if not self.source:
            return "model.overrides"
        return f"{self.key} {self.source}" + (" with model.overrides" if self.overridden else "")


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
          "intermediate_size", "n_inner", "max_position_embeddings", "decoder_sparse_step")
"""Sizes a model needs positive where its family has them (None: the family's default). Read with getattr, which
follows a config's ``attribute_map``, so a family's own names (GPT-2's n_embd, n_layer, n_head) are checked too."""
_EXPERT_SIZES = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size")
"""Mixture-of-experts sizes, where 0 means none (a dense model)."""


def check_shape(shape: Preset | PretrainedConfig, origin: ShapeOrigin = ShapeOrigin()) -> None:
    """Refuse, in one line, a shape no model can be built and trained from: the one check for a preset with its
    overrides and for the config of ``model.config`` or ``model.init_from`` with theirs.

    Sizes below 1 (0 for expert counts) would build a model of no layers or fail deep in torch (a negative
    dimension, a division by zero in the init); heads must split the width where no head_dim is given, key/value
    heads the query heads, and rotary embeddings need an even head width.
    """
    for name in _SIZES + _EXPERT_SIZES:
        value, low = getattr(shape, name, None), 0 if name in _EXPERT_SIZES else 1
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise SuperposeError(f"{origin.field(name)}: must be an integer >= {low}, got {value!r}")
    _check_heads(shape, origin)
    _check_experts(shape, origin)
    if isinstance(shape, PretrainedConfig):
        try:
            shape.validate()  # the family's own rules, which its config class checks only when constructed
        except StrictDataclassError as e:
            raise SuperposeError(f"{origin}: {family_rule(e)}") from None


def family_rule(error: StrictDataclassError) -> str:
    """The rule a transformers config broke: its first line only names the validator, the cause says what."""
    return first_line(error.__cause__ or error)


def _check_heads(shape: Preset | PretrainedConfig, origin: ShapeOrigin) -> None:
    width, heads = getattr(shape, "hidden_size", None), getattr(shape, "num_attention_heads", None)
    if width is None or heads is None:
        return  # a family without attention heads (state-space models): nothing to split
    if getattr(shape, "head_dim", None) is None and width % heads:
        hint = "; set head_dim explicitly" if hasattr(shape, "head_dim") else ""
        raise SuperposeError(f"{origin}: hidden_size {width} is not divisible by num_attention_heads {heads}{hint}")
    rotary = isinstance(shape, Preset) or getattr(shape, "rope_parameters", None) is not None
    if rotary and resolve_head_dim(shape) % 2:
        raise SuperposeError(f"{origin}: the head width must be even for rotary embeddings, got "
                             f"{resolve_head_dim(shape)} (head_dim, or hidden_size / num_attention_heads)")
    kv_heads = getattr(shape, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise SuperposeError(f"{origin}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                             f"{kv_heads}")


def moe_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(routed experts, experts per token) of a mixture-of-experts config, whatever the family calls them
    (``num_experts``: Qwen-MoE, OLMoE; ``num_local_experts``: Mixtral; ``n_routed_experts``: DeepSeek); (0, 0) dense."""
    experts = next((int(v) for name in ("num_experts", "num_local_experts", "n_routed_experts")
                    if (v := getattr(config, name, None))), 0)
    return (experts, int(config.num_experts_per_tok)) if experts else (0, 0)


def _check_experts(shape: Preset | PretrainedConfig, origin: ShapeOrigin) -> None:
    """Experts run as grouped matmuls, which need 16-byte-aligned rows: widths a multiple of 8 (bf16). An expert's
    width is ``moe_intermediate_size`` where the family has one (Qwen-MoE, DeepSeek), else ``intermediate_size``
    (Mixtral, OLMoE)."""
    experts, top_k = moe_shape(shape)[0], getattr(shape, "num_experts_per_tok", None) or 0
    if not (experts or isinstance(shape, Preset) and shape.family == "qwen3_moe"):
        return
    if not 0 < top_k <= experts:
        raise SuperposeError(f"{origin}: num_experts_per_tok {top_k} must be in 1..num_experts ({experts})")
    width = "intermediate_size" if getattr(shape, "moe_intermediate_size", None) is None else "moe_intermediate_size"
    for name in ("hidden_size", width):
        value = getattr(shape, name, None)
        if value is not None and (value < 1 or value % 8):
            raise SuperposeError(f"{origin.field(name)}: a mixture-of-experts model needs a positive multiple of 8 "
                                 f"(its experts run as grouped matmuls), got {value}")


def get_preset(preset: str, vocab_size: int | None = None, **overrides: object) -> Preset:
    """Look up a preset and apply the vocabulary and shape overrides, rejecting unknown names early."""
    if preset not in PRESETS:
        raise SuperposeError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - _OVERRIDABLE)
    if unknown:
        raise SuperposeError(
            f"unknown model override(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_OVERRIDABLE))}"
        )
    p = dataclasses.replace(PRESETS[preset], **{k: _checked_override(k, v) for k, v in overrides.items()})
    if vocab_size is not None:
        p = dataclasses.replace(p, vocab_size=vocab_size)
    check_shape(p, ShapeOrigin(overridden=frozenset(overrides)))
    return p


def model_config(preset: str, vocab_size: int | None = None, **overrides: object) -> PretrainedConfig:
    """The transformers config for a preset; `overrides` change shape fields (e.g. hidden_size)."""
    p = get_preset(preset, vocab_size, **overrides)
    common = dict(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.resolved_head_dim,
        hidden_act="silu",
        max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=p.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
        tie_word_embeddings=p.tie_word_embeddings,
        initializer_range=0.02,
        attention_bias=False,
        use_cache=False,
        # Special token ids belong to the tokenizer of the data, not to the shape; architecture
        # defaults (e.g. SmolLM3's 128004) would point outside a small vocabulary.
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    try:
        return _family_config(p, common)
    except StrictDataclassError as e:  # a rule of the family's own config class (e.g. Llama's width per head)
        raise SuperposeError(f"model.overrides: {family_rule(e)}") from None


def _family_config(p: Preset, common: dict[str, object]) -> PretrainedConfig:
    if p.family == "llama":
        return LlamaConfig(**common, mlp_bias=False)
    if p.family == "qwen3":
        return Qwen3Config(**common, use_sliding_window=False)
    if p.family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            use_sliding_window=False,
            num_experts=p.num_experts,
            num_experts_per_tok=p.num_experts_per_tok,
            moe_intermediate_size=p.moe_intermediate_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            output_router_logits=True,  # so forward() returns aux_loss for the trainer to add
            router_aux_loss_coef=p.router_aux_loss_coef,
            # all experts in one grouped matmul, no host syncs; an error, not the per-expert loop, where unavailable
            experts_implementation="grouped_mm",
        )
    if p.family == "smollm3":
        return transformers.SmolLM3Config(**common, mlp_bias=False)
    raise AssertionError(f"preset {p.name} has unhandled family {p.family}")


def expected_parameter_counts(
    preset: str, vocab_size: int | None = None, **overrides: object
) -> tuple[int, int]:
    """(total, active) from the shape alone, independent of transformers, to catch config mistakes."""
    p = get_preset(preset, vocab_size, **overrides)
    d, layers = p.hidden_size, p.num_hidden_layers
    qk_norm = 2 * p.resolved_head_dim if p.family in ("qwen3", "qwen3_moe") else 0
    layer_norms = 2 * d
    mlp_total, mlp_active = mlp_parameters(p, sparse=p.num_experts > 0)
    embeddings = p.vocab_size * d * (1 if p.tie_word_embeddings else 2)
    fixed = embeddings + layers * (attention_parameters(p) + qk_norm + layer_norms) + d  # + final norm
    return fixed + layers * mlp_total, fixed + layers * mlp_active


def _human(n: int) -> str:
    """Short count for tables: 1.31M, 10.1B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def describe_presets() -> str:
    """A plain-text table of the presets (default vocab) for `--help` and the README."""
    header = ("name", "family", "layers", "d", "heads q/kv", "total", "active")
    rows = [header]
    for p in PRESETS.values():
        total, active = expected_parameter_counts(p.name)
        heads = f"{p.num_attention_heads}/{p.num_key_value_heads}"
        if p.num_experts:
            heads += f", top-{p.num_experts_per_tok} of {p.num_experts} experts"
        shape = (str(p.num_hidden_layers), str(p.hidden_size), heads)
        rows.append((p.name, p.family, *shape, _human(total), _human(active)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
