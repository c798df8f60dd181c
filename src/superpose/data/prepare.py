"""`superpose prepare`: corpus -> tokenizer -> train/val token shards, written atomically.

Pass 1 streams the documents once into a cache file inside the temporary output folder (feeding the
BPE trainer on the way when no tokenizer is given); pass 2 encodes the cache, in an order shuffled by
the seed unless asked to keep the reading order. The cache makes both passes see identical documents
even for hub streams, gives the document count needed to guarantee a non-empty validation split and
lets pass 2 read in any order. It is deleted before the folder is renamed into place.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from superpose import __version__
from superpose.data.corpus import Skipped, check_decoding, iter_documents, limit_bytes, resolve_source
from superpose.data.shards import (
    FORMAT,
    TOKENIZER_FILE,
    VERSION,
    ShardWriter,
    dtype_name,
    token_dtype,
    write_meta,
)
from superpose.data.tokenizer import (
    check_vocab_size,
    eos_id,
    load_tokenizer,
    train_tokenizer,
    vocab_size_of,
)
from superpose.errors import SuperposeError
from superpose.files import atomic_dir, file_sha256, require_empty

CACHE_FILE = "documents.cache"
ENCODE_BATCH_BYTES = 1 << 20
_LENGTH = struct.Struct("<Q")


def prepare(
    sources: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_field: str = "text",
    val_fraction: float = 0.005,
    min_val_documents: int = 1,
    seed: int = 0,
    shard_tokens: int = 2**27,
    max_bytes: int | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    keep_order: bool = False,
    encoding: str = "utf-8",
    errors: str = "skip",
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Tokenize `sources` into a dataset folder at out_dir and return its path.

    With `tokenizer` None a byte-level BPE of `vocab_size` is trained on the same documents. Validation documents are
    chosen from (seed, document index) alone. Both splits are written in an order shuffled by `seed`: in reading order,
    neighbouring documents (which share windows) are alike, and the validation windows, read from the start of their
    split, would all come from the first files. `keep_order` keeps the reading order.
    Text files are decoded with `encoding`; `errors` is "skip" (a folder's undecodable files are left out) or
    "replace" (U+FFFD). `say` gets the files skipped and, at the end, documents, tokens and bytes per split. Nothing
    appears at out_dir unless the whole run succeeds.
    """
    out = Path(out_dir).expanduser()
    tok = _check_arguments(sources, tokenizer, vocab_size, val_fraction, min_val_documents, seed, shard_tokens,
                           max_bytes, encoding, errors)
    require_empty(out, "output folder")

    with atomic_dir(out) as tmp:
        docs: Iterator[str] = itertools.chain.from_iterable(
            iter_documents(s, text_field=text_field, hf_config=hf_config, hf_split=hf_split, encoding=encoding,
                           errors=errors, skipped=(skipped := Skipped()))
            for s in sources
        )
        cache, tok = _read_corpus(limit_bytes(docs, max_bytes) if max_bytes is not None else docs, tmp, tok,
                                  vocab_size, progress)
        if skipped:
            undecoded = any(reason.startswith("not ") for reason in skipped.files)
            say(skipped.summary() + ("; read them with --encoding, or --errors replace" if undecoded else ""))
        is_val = _choose_val(cache.count, val_fraction, min_val_documents, seed, sources)
        tok.save(str(tmp / TOKENIZER_FILE))
        eos, vocab = eos_id(tok), vocab_size_of(tok)
        dtype = token_dtype(vocab)
        order = np.arange(cache.count) if keep_order else np.random.default_rng([seed, 1]).permutation(cache.count)
        splits = _write_shards(tmp, cache, order, is_val, tok, eos, dtype, shard_tokens, progress)
        cache.path.unlink()
        write_meta(tmp, _meta(tmp, dtype, vocab, eos, sources, seed, keep_order, val_fraction, max_bytes, splits))
    for name, split in splits.items():
        say(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, {split['bytes']:,} bytes")
    return out


def _check_arguments(sources: list[str], tokenizer: str | None, vocab_size: int, val_fraction: float,
                     min_val_documents: int, seed: int, shard_tokens: int, max_bytes: int | None, encoding: str,
                     errors: str) -> Tokenizer | None:
    """Every argument checked before anything is read or written; returns the given tokenizer, loaded."""
    if not sources:
        raise SuperposeError("no corpus given")
    check_decoding(encoding, errors)
    for source in sources:
        resolve_source(source)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None:
        eos_id(tok)
    else:
        check_vocab_size(vocab_size)
    if not 0 < val_fraction < 1:
        raise SuperposeError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if min_val_documents < 1:
        raise SuperposeError(f"min_val_documents must be at least 1, got {min_val_documents}")
    if seed < 0:
        raise SuperposeError(f"seed must be non-negative, got {seed}")
    if shard_tokens < 1:
        raise SuperposeError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if max_bytes is not None and max_bytes < 1:
        raise SuperposeError(f"max_bytes must be positive, got {max_bytes}")
    return tok


def _read_corpus(docs: Iterator[str], tmp: Path, tok: Tokenizer | None, vocab_size: int,
                 progress: bool) -> tuple["_DocumentCache", Tokenizer]:
    """One pass over the corpus: cache every document on disk and, with no tokenizer given, train one on them."""
    cache = _DocumentCache(tmp / CACHE_FILE)
    with tqdm(desc="reading corpus", unit="doc", disable=not progress) as bar:
        recorded = cache.record(docs, bar)
        if tok is None:
            tok = train_tokenizer(recorded, vocab_size)
        for _ in recorded:  # caches the corpus when no training pass consumed it
            pass
    return cache, tok


def _write_shards(tmp: Path, cache: "_DocumentCache", order: np.ndarray, is_val: np.ndarray, tok: Tokenizer, eos: int,
                  dtype: np.dtype, shard_tokens: int, progress: bool) -> dict[str, Any]:
    """Encode the cached documents in ``order`` into train and validation shards; returns the splits' metadata."""
    with ShardWriter(tmp, "train", dtype, shard_tokens) as train, ShardWriter(tmp, "val", dtype, shard_tokens) as val:
        with tqdm(total=cache.count, desc="encoding", unit="doc", disable=not progress) as bar:
            for indices, batch in _batches(cache.read(order)):
                encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
                for writer, flag in ((train, False), (val, True)):
                    picked = [(enc.ids, text) for i, enc, text in zip(indices, encodings, batch) if is_val[i] == flag]
                    if picked:
                        ids = np.fromiter(itertools.chain.from_iterable(ids + [eos] for ids, _ in picked), np.int64)
                        writer.add(ids, len(picked), sum(len(text.encode("utf-8")) for _, text in picked))
                bar.update(len(batch))
        return {"train": train.close(), "val": val.close()}


def _meta(tmp: Path, dtype: np.dtype, vocab: int, eos: int, sources: list[str], seed: int, keep_order: bool,
          val_fraction: float, max_bytes: int | None, splits: dict[str, Any]) -> dict[str, Any]:
    """meta.json: the format, the tokenizer (and its checksum), how the corpus was read and split, the shards."""
    return {"format": FORMAT, "version": VERSION, "dtype": dtype_name(dtype), "vocab_size": vocab, "eos_id": eos,
            "tokenizer": TOKENIZER_FILE, "tokenizer_sha256": file_sha256(tmp / TOKENIZER_FILE), "source": list(sources),
            "seed": seed, "shuffled": not keep_order, "val_fraction": val_fraction, "max_bytes": max_bytes,
            "superpose_version": __version__, "splits": splits}


class _DocumentCache:
    """Length-prefixed UTF-8 documents on disk, so pass 2 re-reads exactly what pass 1 saw, in any order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets: list[int] = []

    @property
    def count(self) -> int:
        return len(self.offsets)

    def record(self, docs: Iterable[str], bar: tqdm) -> Iterator[str]:
        """Write each document to the cache while passing it on (to the tokenizer trainer)."""
        with open(self.path, "wb") as f:
            for doc in docs:
                raw = doc.encode("utf-8")
                self.offsets.append(f.tell())
                f.write(_LENGTH.pack(len(raw)))
                f.write(raw)
                bar.update()
                yield doc

    def read(self, order: np.ndarray) -> Iterator[tuple[int, str]]:
        """(index, text) of the documents in ``order`` (indices in recording order)."""
        with open(self.path, "rb") as f:
            for index in order.tolist():
                f.seek(self.offsets[index])
                (size,) = _LENGTH.unpack(f.read(_LENGTH.size))
                yield index, f.read(size).decode("utf-8")


def _batches(docs: Iterable[tuple[int, str]]) -> Iterator[tuple[list[int], list[str]]]:
    """Group (index, text) pairs into ~1 MB batches for encode_batch; yields (indices, texts)."""
    indices, batch, size = [], [], 0
    for index, doc in docs:
        indices.append(index)
        batch.append(doc)
        size += len(doc)
        if size >= ENCODE_BATCH_BYTES:
            yield indices, batch
            indices, batch, size = [], [], 0
    if batch:
        yield indices, batch


def _choose_val(n_docs: int, val_fraction: float, min_val: int, seed: int, sources: list[str]) -> np.ndarray:
    """Mark validation documents from (seed, document index) only, topping up to min_val documents.

    Document i gets score u_i, the i-th draw of default_rng(seed); it is held out when
    u_i < val_fraction, or when it is among the min_val lowest scores.
    """
    corpus = ", ".join(sources)
    if n_docs == 0:
        raise SuperposeError(f"corpus {corpus} has no documents")
    if n_docs < min_val + 1:
        raise SuperposeError(
            f"corpus {corpus} has {n_docs} document(s): too few for {min_val} validation document(s)"
            " and at least one training document"
        )
    scores = np.random.default_rng(seed).random(n_docs)
    is_val = scores < val_fraction
    if is_val.sum() < min_val:
        is_val[np.argsort(scores, kind="stable")[:min_val]] = True
    if is_val.all():
        is_val[np.argmax(scores)] = False
    return is_val
