"""From a run to a plain Hugging Face model folder, and back into memory for generation and evaluation.

Nothing of TST survives training: a checkpoint holds the weights of an ordinary ``transformers`` causal LM. Export is
therefore build the run's preset, load the weights, attach the data's tokenizer, ``save_pretrained``. The folder
(``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files) loads with
``AutoModelForCausalLM`` and ``AutoTokenizer`` alone: no superpose, no ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .data.tokenizer import eos_id, load_tokenizer
from .errors import SuperposeError
from .models import build_model
from .train.checkpoint import load_checkpoint, resolve_checkpoint


def hf_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """The data's tokenizer as a ``transformers`` tokenizer; EOS (which separates documents) also pads."""
    eos = tokenizer.id_to_token(eos_id(tokenizer))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos, model_max_length=max_length)


def load_run(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The model of a run folder (its newest checkpoint) or of one checkpoint, with the run's tokenizer."""
    source = Path(source)
    if not source.exists():
        raise SuperposeError(f"{source} not found")
    checkpoint = resolve_checkpoint(source)
    run_dir = checkpoint.parent.parent  # RUN/checkpoints/step-NNNNNNN
    if not (run_dir / "run.json").is_file() or not (run_dir / "tokenizer.json").is_file():
        raise SuperposeError(f"{run_dir} is not a complete run folder (needs run.json and tokenizer.json)")
    info = json.loads((run_dir / "run.json").read_text())
    model = build_model(info["preset"], info["vocab_size"])
    load_checkpoint(checkpoint, model, None)
    tokenizer = load_tokenizer(str(run_dir / "tokenizer.json"))
    eos = eos_id(tokenizer)
    # The presets leave special ids to the data (see models.model_config); a deployed model needs them.
    model.config.eos_token_id = model.config.pad_token_id = eos
    model.config.use_cache = True
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    return model.eval(), hf_tokenizer(tokenizer, model.config.max_position_embeddings)


def load_model(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """An exported folder (``config.json``), a run folder or a checkpoint -> model and tokenizer, in eval mode."""
    source = Path(source)
    if (source / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    return load_run(source)


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SuperposeError(f"export target {out} exists and is not empty")


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: str | Path) -> Path:
    """Write a Hugging Face folder atomically: into a temporary sibling, renamed into place when complete."""
    out = Path(out)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export(source: str | Path, out: str | Path) -> Path:
    """``superpose export``: a run or checkpoint -> a plain Hugging Face model folder at ``out``."""
    _check_target(Path(out))  # before the (possibly slow) model load
    model, tokenizer = load_run(source)
    return save_hf(model, tokenizer, out)
