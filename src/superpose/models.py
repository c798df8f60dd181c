"""Model presets and any other transformers causal LM: configs, construction, initialisation, weights.

A preset is a config written here (no hub downloads), so a run is fully defined by a preset name, a vocabulary size
and a seed. Any other decoder-only causal LM comes from a config.json (:func:`custom_config`) or, to continue
pretraining, from a model folder with its weights (:func:`pretrained_config`, :func:`read_pretrained`); families the
TST input path cannot drive are refused in one line (:func:`check_trainable`). We draw every matrix ourselves rather
than trusting each architecture's ``_init_weights``, so that TST and baseline runs of any family start from the same,
seed-determined distribution regardless of the transformers version; only norm gains and buffers (rotary
frequencies, embedding scales) are left to the family's own init, which computes them without randomness.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import logging
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers import initialization as hf_init
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from superpose.errors import SuperposeError
from superpose.files import first_line

_HAS_SMOLLM3 = hasattr(transformers, "SmolLM3Config")

CAUSAL_SDPA = "sdpa_causal"
"""transformers' SDPA attention under a name its mask builder does not know, so it builds no mask (see below)."""
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def use_causal_sdpa(model: PreTrainedModel) -> None:
    """Attend causally with no mask at all, for training on full, unpadded windows (never for padded batches).

    With ``sdpa`` transformers inspects ``position_ids`` for packed sequences on every forward, a host-device sync;
    under this name it skips mask building, and SDPA runs with ``is_causal=True``: the same logits bit for bit.
    Only for families whose every layer attends fully causally through SDPA: sliding windows (Mistral, Gemma 3)
    need the mask transformers builds, and families without SDPA keep their own attention.
    """
    if model._supports_sdpa and _fully_causal(model.config):
        model.set_attn_implementation(CAUSAL_SDPA)


def _fully_causal(config: PretrainedConfig) -> bool:
    """Whether every layer attends to all earlier positions (no sliding window, no linear or chunked attention)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


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
    """An override of the type its Preset field has (ints for sizes, finite floats, bools), or a one-line error."""
    kind = {f.name: str(f.type) for f in dataclasses.fields(Preset)}[name]
    low = 0 if name in _MAY_BE_ZERO else 1
    if kind == "bool":
        if not isinstance(value, bool):
            raise SuperposeError(f"model.overrides.{name}: must be true or false, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("int"):
        if value is None and "None" in kind:
            return value
        if not (number and isinstance(value, int) and value >= low):
            raise SuperposeError(f"model.overrides.{name}: must be an integer >= {low}, got {value!r}")
        return value
    if not (number and math.isfinite(value) and (value > 0 or (low == 0 and value == 0))):
        raise SuperposeError(f"model.overrides.{name}: must be a finite number {'>= 0' if low == 0 else '> 0'}, "
                             f"got {value!r}")
    return float(value)


def _check_moe_shape(p: Preset) -> None:
    """Experts run as grouped matmuls, which need 16-byte-aligned rows: widths a multiple of 8 (bf16)."""
    for name in ("hidden_size", "moe_intermediate_size"):
        value = getattr(p, name)
        if value < 1 or value % 8:
            raise SuperposeError(f"model.overrides.{name}: a mixture-of-experts model needs a positive multiple of 8 "
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
    if p.vocab_size < 1:
        raise SuperposeError(f"vocab_size must be positive, got {p.vocab_size}")
    if p.head_dim is None and p.hidden_size % p.num_attention_heads:
        raise SuperposeError(
            f"hidden_size {p.hidden_size} is not divisible by num_attention_heads {p.num_attention_heads}; "
            "set head_dim explicitly"
        )
    if p.resolved_head_dim % 2:
        raise SuperposeError(f"model.overrides: the head width must be even for rotary embeddings, got "
                             f"{p.resolved_head_dim} (head_dim, or hidden_size / num_attention_heads)")
    if p.num_attention_heads % p.num_key_value_heads:
        raise SuperposeError(
            f"num_attention_heads {p.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {p.num_key_value_heads}"
        )
    if p.family == "qwen3_moe":
        _check_moe_shape(p)
    if p.family == "qwen3_moe" and not 0 < p.num_experts_per_tok <= p.num_experts:
        raise SuperposeError(
            f"num_experts_per_tok must be in 1..num_experts ({p.num_experts}), got {p.num_experts_per_tok}"
        )
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


_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
"""Config fields with which a causal LM changes its logits after the LM head (Gemma 2's soft cap, Cohere's and
Granite's scales), and the value that leaves them alone. TST scores the head's own output (fused with the loss when
``train.loss_chunk`` is set), so such a model would train on other logits than it serves with."""

_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _load_config(source: str, key: str) -> PretrainedConfig:
    """A transformers config from a config.json, a folder holding one, or a hub name; one line when it cannot be."""
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith((".", "/", "~")) or path.suffix == ".json"):
        raise SuperposeError(f"{key}: {source} not found")
    if path.is_dir() and not (path / "config.json").is_file():
        raise SuperposeError(f"{key}: {source} holds no config.json")
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(path) if path.exists() else source)
    except Exception as e:  # transformers reports a bad file, an unknown model_type or a hub failure many ways
        raise SuperposeError(f"{key}: cannot read a transformers config from {source}: {first_line(e)}") from None


def _check_causal_lm(config: PretrainedConfig, key: str, source: str) -> None:
    """Refuse configs that are no decoder-only causal LM, before any model is built."""
    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise SuperposeError(f"{key}: {source} is {kind}, an encoder-decoder model; TST trains decoder-only causal LMs")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise SuperposeError(f"{key}: {source} is {kind}, which is not a causal LM (AutoModelForCausalLM cannot "
                             f"build it); TST trains decoder-only causal LMs")


def _config_override(config: PretrainedConfig, name: str, value: object) -> object:
    """An override of a field the config has, of the type its value has (ints for sizes, finite floats, bools)."""
    if name == "vocab_size":
        raise SuperposeError("model.overrides.vocab_size: the vocabulary size comes from the prepared data")
    if not hasattr(config, name):
        raise SuperposeError(f"model.overrides.{name}: a {config.model_type} config has no such field")
    current = getattr(config, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if current is None or (isinstance(current, str) and isinstance(value, str)):
        return value
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = number and isinstance(value, int)
    elif isinstance(current, float):
        ok = number and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(current))
    if not ok:
        raise SuperposeError(f"model.overrides.{name}: must be of the type of the config's value "
                             f"{current!r} ({type(current).__name__}), got {value!r}")
    return value


def _with_overrides(config: PretrainedConfig, overrides: dict[str, object] | None) -> PretrainedConfig:
    for name, value in (overrides or {}).items():
        setattr(config, name, _config_override(config, name, value))
    return config


def custom_config(source: str, vocab_size: int, overrides: dict[str, object] | None = None) -> PretrainedConfig:
    """``model.config``: any transformers causal LM's config (a config.json, a folder holding one, a hub name), at
    the data's vocabulary size, for a seeded init.

    A config whose vocabulary is smaller than the data's is refused (its embedding cannot hold every token id); a
    larger one is cut to the data's, as presets are. Special token ids belong to the data's tokenizer, so the
    config's are dropped (export sets the data's EOS); ``overrides`` change fields the config has.
    """
    config = _load_config(source, "model.config")
    _check_causal_lm(config, "model.config", source)
    config = _with_overrides(config, overrides)
    if config.vocab_size < vocab_size:
        raise SuperposeError(f"model.config: {source} has vocab_size {config.vocab_size}, smaller than the "
                             f"{vocab_size} token ids of the data")
    config.vocab_size = vocab_size
    for name in _TOKEN_IDS:
        setattr(config, name, None)
    config.use_cache = False
    return config


def pretrained_config(folder: str, vocab_size: int, overrides: dict[str, object] | None = None) -> PretrainedConfig:
    """``model.init_from``: the config of a transformers model folder, whose weights the run starts from.

    The vocabulary stays the folder's (its weights have that shape): it must hold the data's token ids, and may be
    larger (a padded vocabulary, e.g. Qwen's) only when the folder has a tokenizer.json, which the trainer checks
    against the data's. ``overrides`` change fields the config has (a shape change no longer fits the weights).
    """
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise SuperposeError(f"model.init_from: {folder} is not a model folder (it holds no config.json)")
    config = _load_config(str(path), "model.init_from")
    _check_causal_lm(config, "model.init_from", folder)
    config = _with_overrides(config, overrides)
    if config.vocab_size < vocab_size or (config.vocab_size > vocab_size
                                          and not (path / "tokenizer.json").is_file()):
        raise SuperposeError(f"model.init_from: {folder} has vocab_size {config.vocab_size} but the data has "
                             f"{vocab_size} token ids; they must be equal (or the folder's larger, padded, with a "
                             f"tokenizer.json that matches the data's)")
    config.use_cache = False
    return config


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars, load reports or hub retry logs from transformers while it loads or saves for us: our own
    progress and one-line errors say what matters."""
    shown, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hub = logging.getLogger("huggingface_hub")
    hub_level = hub.level
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(hub_level)
        hf_logging.set_verbosity(level)
        if shown:
            hf_logging.enable_progress_bar()


def read_pretrained(folder: str, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Every weight of a transformers model folder, in float32 on the CPU, for a model built from ``config``.

    ``from_pretrained`` reads it, so sharded safetensors and the checkpoint layouts transformers converts on load
    work as they do there; weights the folder lacks for ``config``, or has in another shape, are a one-line error.
    """
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(Path(folder).expanduser(), dtype=torch.float32,
                                                               config=copy.deepcopy(config), output_loading_info=True)
    except Exception as e:  # safetensors, torch and transformers each report damage and mismatches their own way
        problem = _shape_mismatch(Path(folder).expanduser(), config) or first_line(e)
        raise SuperposeError(f"model.init_from: cannot load the weights in {folder}: {problem}") from None
    missing = sorted(info["missing_keys"])  # weights of another shape raise above
    if missing:
        raise SuperposeError(f"model.init_from: {folder} lacks weights the model needs: {', '.join(missing[:3])}")
    return model.state_dict()


def _shape_mismatch(folder: Path, config: PretrainedConfig) -> str | None:
    """The first weight whose shape in the folder's safetensors differs from the model ``config`` builds (transformers
    reports it in a table above its error, which the one-line error would otherwise lose)."""
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(copy.deepcopy(config)).state_dict()
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                for name in weights.keys():
                    shape = list(weights.get_slice(name).get_shape())
                    if name in expected and shape != list(expected[name].shape):
                        return (f"{name} is {shape} in {file.name} but {list(expected[name].shape)} for its "
                                f"config.json")
        except (OSError, SafetensorError):
            return None
    return None


def check_trainable(model: PreTrainedModel) -> None:
    """Refuse, in one line, a model the TST input path cannot drive: TST feeds bag means to the backbone as
    ``inputs_embeds`` and scores the LM head's output, so it needs both embeddings and unaltered head logits."""
    kind, backbone = model.config.model_type, model.base_model
    if backbone is model or "inputs_embeds" not in inspect.signature(backbone.forward).parameters:
        raise SuperposeError(f"model family {kind}: its backbone takes no inputs_embeds, so TST cannot feed it "
                             f"bag means")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or not isinstance(head, torch.nn.Linear):
        raise SuperposeError(f"model family {kind}: TST needs a token embedding table and a linear LM head "
                             f"(get_input_embeddings / get_output_embeddings)")
    if head not in model.children():
        raise SuperposeError(f"model family {kind}: its LM head is more than one linear layer on the backbone's "
                             f"output, which TST's loss would skip")
    if type(embedding).forward is not torch.nn.Embedding.forward and not hasattr(embedding, "embed_scale"):
        raise SuperposeError(f"model family {kind}: its embedding module ({type(embedding).__name__}) changes "
                             f"lookups in a way TST's bag means do not reproduce")
    for name, identity in _LOGIT_TRANSFORMS.items():
        value = getattr(model.config, name, identity)
        if value != identity:
            neutral = "null" if identity is None else identity
            raise SuperposeError(f"model family {kind}: it changes its logits after the LM head ({name} = {value}), "
                                 f"which the TST loss does not apply; set {name} to {neutral} in its config.json")


def build_model(
    preset_or_config: str | PretrainedConfig,
    vocab_size: int | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> PreTrainedModel:
    """Instantiate a causal LM with our seeded init; ``device="meta"`` gives a weightless shell.

    The model is always built on the meta device first and then materialised, so a distributed trainer can shard
    the shell before any weight exists and call :func:`materialize` itself.
    """
    if isinstance(preset_or_config, PretrainedConfig):
        if vocab_size is not None or overrides:
            raise SuperposeError("vocab_size and shape overrides apply to preset names, not to a config")
        config = preset_or_config
    else:
        config = model_config(preset_or_config, vocab_size, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_trainable(model)
    device = torch.device(device)
    if device.type != "meta":
        materialize(model, device, seed)
    return model


@torch.no_grad()
def materialize(model: PreTrainedModel, device: torch.device, seed: int | None) -> None:
    """Give a meta-built model (plain or already sharded by FSDP2) real storage on ``device``.

    Each rank allocates only its shard; buffers and norm gains are set as the family's own init sets them
    (:func:`family_defaults`); ``seed`` draws the weights with :func:`init_weights`, ``None`` leaves them
    uninitialised for a checkpoint (or ``model.init_from``) to fill.
    """
    model.to_empty(device=device)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        model.tie_weights()  # to_empty gives each module its own tensor; FSDP2 keeps a shared parameter shared
    if seed is None:
        family_defaults(model)
    else:
        init_weights(model, seed)


def _seeded(name: str, param: torch.Tensor) -> bool:
    """Parameters :func:`init_weights` draws (matrices, embeddings, fused experts) or zeroes (biases)."""
    return param.ndim >= 2 or name.endswith("bias")


@torch.no_grad()
def family_defaults(model: PreTrainedModel) -> None:
    """Buffers (rotary frequencies, embedding scales) and norm gains as the family's own ``_init_weights`` sets them
    (1, or 0 for Gemma's ``1 + w`` norms), with nothing drawn: every parameter we seed is marked as initialised, the
    flag transformers' init functions honour, for the duration of the call.
    """
    seeded = [p for n, p in model.named_parameters() if _seeded(n, p)]
    for param in seeded:
        param._is_hf_initialized = True
    try:
        with hf_init.guard_torch_init_functions():
            for module in model.modules():
                model._init_weights(module)
    finally:
        for param in seeded:
            del param._is_hf_initialized


_OUTPUT_PROJECTIONS = frozenset({"o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "fc2", "w2"})
"""Residual-stream writers across families: Llama-style, GPT-2 (c_proj), GPT-NeoX/Falcon/Phi (dense, dense_4h_to_h,
fc2), OPT (out_proj), Mixtral-style experts (w2)."""


def _is_output_projection(name: str) -> bool:
    """Projections that write into the residual stream (attention out, MLP/expert down)."""
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" else parts[-1]
    return leaf in _OUTPUT_PROJECTIONS


_BLOCK_ELEMENTS = 1 << 20
"""Values drawn from one generator: parameters are drawn in blocks of whole rows, so a shard draws only its rows."""


def _block_generator(seed: int, name: str, block: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the full parameter held here: all of them, or this rank's FSDP2 shard."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise AssertionError(f"only row (dim-0) sharding is supported, got {param.placements}")
    return offset[0], offset[0] + shape[0]


def _row_blocks(shape: torch.Size, start: int, stop: int, std: float, seed: int,
                name: str) -> Iterator[tuple[int, torch.Tensor]]:
    """Rows ``[start, stop)`` of a N(0, std) tensor of ``shape`` as ``(first row, values)`` pieces of at most one
    block: the values are the same whichever rows a caller asks for, and only one block is held at a time."""
    per_block = max(1, _BLOCK_ELEMENTS // max(math.prod(shape[1:]), 1))
    for block in range(start // per_block, -(-stop // per_block) if stop > start else 0):
        lo, hi = block * per_block, min((block + 1) * per_block, shape[0])
        values = torch.empty((hi - lo, *shape[1:])).normal_(0.0, std, generator=_block_generator(seed, name, block))
        yield max(start, lo), values[max(start, lo) - lo:min(stop, hi) - lo]


@torch.no_grad()
def init_weights(model: PreTrainedModel, seed: int, std: float = 0.02) -> None:
    """Seeded GPT-2-style init, drawn on the CPU in float32 from private generators, one per block of rows.

    A parameter's values depend only on the seed, its name and the row, so a rank holding an FSDP2 shard draws just
    its rows and gets exactly what a single process draws for them; the device, dtype and global RNG play no part.
    Residual-stream writers are scaled by 1/sqrt(2 * num_layers) so the residual variance does not grow with depth.
    Tied weights appear once in `named_parameters()` and are drawn once. Norm gains and buffers are the family's
    (:func:`family_defaults`).
    """
    family_defaults(model)
    out_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif _seeded(name, param):  # embeddings, linear layers, fused expert tensors, routers
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = _local_rows(param)
            scale = out_std if _is_output_projection(name) else std
            for row, values in _row_blocks(param.shape, start, stop, scale, seed, name):
                local[row - start:row - start + values.shape[0]].copy_(values)


def moe_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(routed experts, experts per token) of a mixture-of-experts config, whatever the family calls them
    (``num_experts``: Qwen-MoE, OLMoE; ``num_local_experts``: Mixtral; ``n_routed_experts``: DeepSeek); (0, 0) dense."""
    experts = next((int(v) for name in ("num_experts", "num_local_experts", "n_routed_experts")
                    if (v := getattr(config, name, None))), 0)
    return (experts, int(config.num_experts_per_tok)) if experts else (0, 0)


def router_aux_loss(lm: PreTrainedModel, outputs: ModelOutput) -> torch.Tensor | None:
    """The MoE load-balancing loss (unweighted) of a forward's outputs, as the model family defines it; None if dense.

    A causal LM's own outputs carry it (``aux_loss``); a backbone's carry only ``router_logits``, scored here with
    the load-balancing function of the model's own modeling module (Qwen3-MoE, Mixtral, OLMoE, ... each have one).
    """
    if getattr(outputs, "aux_loss", None) is not None:
        return outputs.aux_loss
    logits = getattr(outputs, "router_logits", None)
    if not logits:
        return None
    loss_fn = sys.modules[type(lm).__module__].load_balancing_loss_func
    return loss_fn(logits, *moe_shape(lm.config), None)


def _expert_parameter_numel(model: PreTrainedModel) -> int:
    """Numel of the routed expert weights (fused 3D tensors or per-expert modules, either layout)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in f".{n}")


def parameter_counts(model_or_config: PreTrainedModel | PretrainedConfig) -> tuple[int, int]:
    """(total, active) parameters; active counts only `num_experts_per_tok` of each layer's experts."""
    if isinstance(model_or_config, PretrainedConfig):
        model = build_model(model_or_config, device="meta")
    else:
        model = model_or_config
    total = sum(p.numel() for p in model.parameters())
    num_experts, top_k = moe_shape(model.config)
    if not num_experts:
        return total, total
    per_expert = _expert_parameter_numel(model) // num_experts
    return total, total - per_expert * (num_experts - top_k)


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
