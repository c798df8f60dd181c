"""Any other decoder-only transformers causal LM: its config from a config.json, a folder or a hub name
(``model.config``), or a model folder with its weights (``model.init_from``); families the TST input path cannot
drive are refused in one line (:func:`check_trainable`), and the map some families apply to their logits after the
head is found for the loss (:func:`logit_map`)."""

from __future__ import annotations

import copy
import inspect
import math
import pickle  # only for its exception type: weights load with weights_only
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from superpose.errors import SuperposeError
from superpose.losses import LogitMap
from superpose.files import first_line
from superpose.hub import quiet_hub

from .presets import ShapeOrigin, check_shape, family_rule


_LOGIT_FIELDS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                 "lm_head_multiplier": 1.0, "logits_soft_cap": None, "output_logit_soft_cap": None,
                 "logits_mup_width_multiplier": 1.0, "output_multiplier": 1.0}
"""Config fields with which transformers' causal LMs change their logits after the LM head (or scale the head's
input), and the value that leaves them alone."""

_SOFTCAP = ("gemma2", "gemma3_text")
_TIMES = ("cohere", "cohere2")
_OVER = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")
_LOGIT_MAPS: dict[tuple[str, str], Callable[[float], LogitMap]] = {
    **{(kind, "final_logit_softcapping"): lambda cap: LogitMap(softcap=float(cap)) for kind in _SOFTCAP},
    **{(kind, "logit_scale"): lambda scale: LogitMap(scale=float(scale)) for kind in _TIMES},
    **{(kind, "logits_scaling"): lambda scale: LogitMap(scale=1.0 / scale) for kind in _OVER},
}
"""The maps the TST loss applies, by (model_type, field), as each family's modeling code (transformers 5.x) applies
them to ``logits = lm_head(h)``: Gemma 2/3 ``c * tanh(logits / c)``, Cohere ``logits * logit_scale``, Granite
``logits / logits_scaling``. A field is family-specific (HyperCLOVA X multiplies by its ``logits_scaling``; MPT
ignores its ``logit_scale``), so a field of another family is refused rather than guessed."""

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
        problem = family_rule(e) if isinstance(e, StrictDataclassError) else first_line(e)
        raise SuperposeError(f"{key}: cannot read a transformers config from {source}: {problem}") from None


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


def _checked(config: PretrainedConfig, key: str, source: str,
             overrides: dict[str, object] | None) -> PretrainedConfig:
    """``config`` with ``overrides`` applied, refused in one line unless it is a causal LM of a shape that builds
    (:func:`~superpose.models.presets.check_shape`, the check preset overrides get)."""
    _check_causal_lm(config, key, source)
    for name, value in (overrides or {}).items():
        try:
            setattr(config, name, _config_override(config, name, value))
        except StrictDataclassError as e:  # the config class checks the field's own type and range
            raise SuperposeError(f"model.overrides.{name}: {family_rule(e)}") from None
    check_shape(config, ShapeOrigin(key, source, frozenset(overrides or {})))
    return config


def custom_config(source: str, vocab_size: int, overrides: dict[str, object] | None = None) -> PretrainedConfig:
    """``model.config``: any transformers causal LM's config (a config.json, a folder holding one, a hub name), at
    the data's vocabulary size, for a seeded init.

    A config whose vocabulary is smaller than the data's is refused (its embedding cannot hold every token id); a
    larger one is cut to the data's, as presets are. Special token ids belong to the data's tokenizer, so the
    config's are dropped (export sets the data's EOS); ``overrides`` change fields the config has.
    """
    config = _load_config(source, "model.config")
    config = _checked(config, "model.config", source, overrides)
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
    config = _checked(config, "model.init_from", folder, overrides)
    if config.vocab_size < vocab_size or (config.vocab_size > vocab_size
                                          and not (path / "tokenizer.json").is_file()):
        raise SuperposeError(f"model.init_from: {folder} has vocab_size {config.vocab_size} but the data has "
                             f"{vocab_size} token ids; they must be equal (or the folder's larger, padded, with a "
                             f"tokenizer.json that matches the data's)")
    config.use_cache = False
    return config


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports from transformers while it loads or saves for us, and no hub retry logs
    (:func:`superpose.hub.quiet_hub`): our own progress and one-line errors say what matters."""
    shown, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with quiet_hub():
            yield
    finally:
        hf_logging.set_verbosity(level)
        if shown:
            hf_logging.enable_progress_bar()


def read_pretrained(folder: str, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Every weight of a transformers model folder, in float32 on the CPU, for a model built from ``config``.

    ``from_pretrained`` reads it, so sharded safetensors and the checkpoint layouts transformers converts on load
    work as they do there. Weights the folder lacks for ``config`` or has in another shape, weights the model does
    not use (a config of fewer layers than the weights), an untied head beside tied embeddings, and a pickle that
    holds more than tensors are each a one-line error.
    """
    path = Path(folder).expanduser()
    try:
        with quiet_transformers(), warnings.catch_warnings():
            # torch warns about a pickle protocol before refusing the pickle: the refusal below says all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                               config=copy.deepcopy(config), output_loading_info=True)
    except pickle.UnpicklingError:
        raise SuperposeError(f"model.init_from: {folder} holds pickled weights that are not plain tensors, which "
                             f"superpose does not unpickle (it could run code); save them as safetensors") from None
    except Exception as e:  # safetensors, torch and transformers each report damage and mismatches their own way
        problem = _shape_mismatch(path, config) or first_line(e)
        raise SuperposeError(f"model.init_from: cannot load the weights in {folder}: {problem}") from None
    _check_loaded(folder, model, info)
    return model.state_dict()


def _check_loaded(folder: str, model: PreTrainedModel, info: dict[str, list[str]]) -> None:
    """Refuse a load that leaves weights out or unused: transformers only reports them (after dropping what each
    family declares safe to ignore, e.g. old rotary ``inv_freq`` buffers), and a copy of a tied head is no problem."""
    for keys, problem in ((info["missing_keys"], "lacks weights the model needs"),  # other shapes raise on load
                          (info["unexpected_keys"], "holds weights its config.json builds no place for")):
        if keys:
            names = sorted(keys)
            more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
            raise SuperposeError(f"model.init_from: {folder} {problem}: {', '.join(names[:3])}{more}")
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and head.weight is not embedding.weight:
        raise SuperposeError(f"model.init_from: {folder} ties its embeddings (tie_word_embeddings) but holds an LM "
                             f"head of other values; set tie_word_embeddings to false in its config.json")


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
    ``inputs_embeds`` and scores the LM head's output, so it needs both embeddings and a linear head whose logits
    are left alone or changed by a map the loss knows (:func:`logit_map`)."""
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
    logit_map(model.config)


def logit_map(config: PretrainedConfig) -> LogitMap:
    """The map the model applies to its LM head's logits, which the TST loss applies too (fused with the loss, in the
    gradient as well); a map it does not know is refused in one line, naming the field."""
    kind, found = config.model_type, LogitMap()
    for name, identity in _LOGIT_FIELDS.items():
        value = getattr(config, name, identity)
        if value is None or value == identity:
            continue
        known = _LOGIT_MAPS.get((kind, name))
        if known is None:
            neutral = "null" if identity is None else identity
            raise SuperposeError(f"model family {kind}: it changes its logits after the LM head ({name} = {value}), "
                                 f"a map the TST loss does not know; set {name} to {neutral} in its config.json")
        found = known(value)  # each family has one such field
    return found
