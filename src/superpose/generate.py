"""Sample text from a trained run or an exported model with ``model.generate`` (nothing TST-specific remains)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import SuperposeError
from .export import load_model
from .train.distributed import resolve_device


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """One-line errors for impossible sampling settings, before any model is loaded."""
    if max_new_tokens < 1:
        raise SuperposeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise SuperposeError(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise SuperposeError(f"--top-p must be in (0, 1], got {top_p}")


@torch.no_grad()
def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` (without the prompt); temperature 0 is greedy decoding.

    The prompt is preceded by EOS because that is what precedes every document in the training shards, so the model
    reads the prompt as the start of a document (and an empty prompt still has a token to continue from).
    """
    check_sampling(max_new_tokens, temperature, top_p)
    ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids], device=model.device)
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}  # top-p alone
    torch.manual_seed(seed)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, **sampling)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def generate(
    source: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    device: str = "auto",
) -> str:
    """``superpose generate``: load a run, checkpoint or export and continue ``prompt``."""
    check_sampling(max_new_tokens, temperature, top_p)
    model, tokenizer = load_model(source)
    return complete(model.to(resolve_device(device)), tokenizer, prompt, max_new_tokens, temperature, top_p, seed)
