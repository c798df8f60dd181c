"""Tokenizers: train a byte-level BPE on the corpus, or load an existing one (file, folder or hub)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from superpose.files import first_line
from superpose.errors import SuperposeError

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
SPECIAL_TOKENS = (EOS_TOKEN,)
# Byte-level BPE needs all 256 byte symbols plus the special tokens before any merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every string round-trips exactly, so no text is lost to <unk>."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary too small for the byte alphabet, before any corpus is read."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise SuperposeError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}")


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer.json, a folder holding one (or HF tokenizer files), or a hub tokenizer name."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise SuperposeError(f"could not read tokenizer file {path}: {first_line(e)}") from e
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return load_tokenizer(str(path / "tokenizer.json"))
    if not path.is_dir() and (spec.startswith((".", "/", "~")) or path.suffix == ".json"):
        raise SuperposeError(f"tokenizer not found: {spec}")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec).backend_tokenizer
    except Exception as e:
        raise SuperposeError(f"could not load tokenizer '{spec}': {first_line(e)}") from e


def eos_id(tok: Tokenizer) -> int:
    """The id that ends every document in the shards."""
    for token in EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    raise SuperposeError(f"tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")


def vocab_size_of(tok: Tokenizer) -> int:
    """One past the largest id, so an embedding of this size covers every token, added ones included."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1

