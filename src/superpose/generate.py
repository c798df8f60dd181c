"""Sample text from a trained run or an exported model with ``model.generate`` (nothing TST-specific remains)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import SuperposeError
from .export import load_model
from .train.distributed import resolve_device


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt; ``check`` refuses impossible settings in one line, before any model is loaded."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    """0 is greedy decoding."""
    top_p: float = 0.95
    top_k: int = 0
    """Keep only the ``top_k`` likeliest tokens; 0 keeps all (top-p alone)."""
    repetition_penalty: float = 1.0
    """Above 1 discourages tokens already in the prompt or the continuation (CTRL's penalty); 1 is off."""
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    """A continuation ends before the first of these strings (which is not returned)."""
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise SuperposeError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise SuperposeError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SuperposeError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SuperposeError(f"--top-k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise SuperposeError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if self.num_samples < 1:
            raise SuperposeError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise SuperposeError("--num-samples above 1 needs --temperature above 0: greedy samples are all the same")
        if any(not s for s in self.stop):
            raise SuperposeError("--stop needs a non-empty string")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` (without the stop strings, which need the tokenizer)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                                  "num_return_sequences": self.num_samples}
        if self.temperature == 0:
            return kwargs | {"do_sample": False}
        return kwargs | {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the earliest stop string."""
    return text[:min([text.find(s) for s in stop if s in text], default=len(text))]


@torch.no_grad()
def complete(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, sampling: Sampling = Sampling()
) -> list[str]:
    """``sampling.num_samples`` continuations of ``prompt`` (without the prompt), reproducible from the seed.

    The prompt is preceded by EOS because that is what precedes every document in the training shards, so the model
    reads the prompt as the start of a document (and an empty prompt still has a token to continue from). Generation
    of a sample stops at EOS, at ``max_new_tokens`` or once it holds a stop string.
    """
    sampling.check()
    ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids], device=model.device)
    stop = {"stop_strings": list(sampling.stop), "tokenizer": tokenizer} if sampling.stop else {}
    torch.manual_seed(sampling.seed)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **sampling.generate_kwargs(), **stop)
    return [cut_at_stop(tokenizer.decode(row[len(ids):], skip_special_tokens=True), sampling.stop) for row in out]


def generate(source: str | Path, prompt: str, sampling: Sampling = Sampling(), device: str = "auto") -> list[str]:
    """``superpose generate``: load a run, checkpoint or export and continue ``prompt``."""
    sampling.check()
    model, tokenizer = load_model(source)
    return complete(model.to(resolve_device(device)), tokenizer, prompt, sampling)
