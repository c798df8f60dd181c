"""From a run to a plain Hugging Face model folder, and back into memory for generation and evaluation.

Nothing of TST survives training: a checkpoint holds the weights of an ordinary ``transformers`` causal LM. Export is
therefore build the run's model from its config, load the weights, attach the data's tokenizer, ``save_pretrained``.
The folder (``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files) loads with
``AutoModelForCausalLM`` and ``AutoTokenizer`` alone: no superpose, no ``trust_remote_code``, and every
``transformers`` version the package supports (4.56 and later), not only the one that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .data.tokenizer import eos_id, load_tokenizer
from .errors import SuperposeError
from .files import atomic_dir, first_line, read_json_object, require_empty
from .models import build_model, quiet_transformers
from .train.checkpoint import is_checkpoint, load_checkpoint, resolve_checkpoint, verify_checkpoint

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The tokenizer class an export names: transformers 4.x and 5.x both have it (5.x's own ``TokenizersBackend``,
which ``save_pretrained`` writes, does not exist in 4.x)."""


def hf_tokenizer(tokenizer: Tokenizer, max_length: int | None) -> PreTrainedTokenizerFast:
    """The data's tokenizer as a ``transformers`` tokenizer; EOS (which separates documents) also pads.
    ``max_length``: the model's context, None for a family without one (transformers' unbounded default)."""
    eos = tokenizer.id_to_token(eos_id(tokenizer))
    limit = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos, **limit)


def run_model_config(checkpoint: Path) -> PretrainedConfig:
    """The transformers config a checkpoint was trained with: its ``config.json``, verified with the checkpoint
    (checkpoints of versions that did not save one have no manifest either, and are refused)."""
    path = checkpoint / "config.json"
    if not path.is_file():
        raise SuperposeError(f"checkpoint {checkpoint} is missing config.json")
    read_json_object(path)  # a truncated file names itself, not a transformers internal
    try:
        return AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SuperposeError(f"{path} is not a transformers config: {first_line(e)}") from None


def load_run(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The model of a run folder (its newest checkpoint) or of one checkpoint, with the run's tokenizer."""
    source = Path(source)
    if not source.exists():
        raise SuperposeError(f"{source} not found")
    checkpoint = resolve_checkpoint(source)
    run_dir = checkpoint.parent.parent  # RUN/checkpoints/step-NNNNNNN
    if not (run_dir / "run.json").is_file() or not (run_dir / "tokenizer.json").is_file():
        raise SuperposeError(f"{run_dir} is not a complete run folder (needs run.json and tokenizer.json)")
    read_json_object(run_dir / "run.json")  # the marker of a run: a damaged one is reported even when config.json exists
    verify_checkpoint(checkpoint)  # before its config.json builds the model: an edited config is refused, not exported
    model = build_model(run_model_config(checkpoint))
    load_checkpoint(checkpoint, model, None, verified=True)
    tokenizer = load_tokenizer(str(run_dir / "tokenizer.json"))
    eos = eos_id(tokenizer)
    # Presets and model.config leave special ids to the data (see models.custom_config); a deployed model needs them.
    model.config.eos_token_id = model.config.pad_token_id = eos
    model.config.use_cache = True
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    return model.eval(), hf_tokenizer(tokenizer, getattr(model.config, "max_position_embeddings", None))


def is_export(path: Path) -> bool:
    """An exported model folder: a ``config.json`` that is neither a run's nor a checkpoint's copy (a checkpoint
    missing its ``state.json`` is still a checkpoint, refused by its manifest, never loaded as an export)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "run.json").exists() and not is_checkpoint(path)


def load_export(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """An exported folder in eval mode; a damaged file (truncated weights, config or tokenizer) is one line."""
    for name in ("config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            read_json_object(folder / name)
    # from_pretrained reports damage with many exception types (tokenizers raises a bare Exception), so any error
    # while loading is a damaged folder. The tokenizer goes first: it is cheap, and the model prints progress.
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise SuperposeError(f"cannot load the tokenizer in {folder} (tokenizer.json damaged?): "
                             f"{first_line(e)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    except Exception as e:
        raise SuperposeError(f"cannot load the model in {folder} (model.safetensors or config.json damaged?): "
                             f"{first_line(e)}") from None
    return model, tokenizer


def load_model(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """An exported folder, a run folder or a checkpoint -> model and tokenizer, in eval mode."""
    source = Path(source)
    return load_export(source) if is_export(source) else load_run(source)


def _portable(out: Path, config: PretrainedConfig) -> None:
    """Make a folder written by this transformers loadable by every supported one.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and keeps RoPE settings only in ``rope_parameters``;
    4.x knows neither, so it would fail on the tokenizer and silently fall back to its default ``rope_theta``.
    """
    path = out / "tokenizer_config.json"
    tokenizer_config = read_json_object(path)
    tokenizer_config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        path = out / "config.json"
        saved = read_json_object(path)
        saved.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            saved.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: str | Path) -> Path:
    """Write a Hugging Face folder atomically: into a temporary sibling, renamed into place when complete."""
    out = Path(out)
    require_empty(out, "export target")
    try:
        with atomic_dir(out) as tmp, quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _portable(tmp, model.config)
    except (OSError, SafetensorError) as e:  # a read-only or full disk; nothing is left at ``out``
        raise SuperposeError(f"cannot write export {out}: {getattr(e, 'strerror', None) or first_line(e)}") from None
    return out


def export(source: str | Path, out: str | Path) -> Path:
    """``superpose export``: a run or checkpoint -> a plain Hugging Face model folder at ``out``."""
    require_empty(Path(out), "export target")  # before the (possibly slow) model load
    model, tokenizer = load_run(source)
    return save_hf(model, tokenizer, out)
