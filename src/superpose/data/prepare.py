"""`superpose prepare`: corpus -> tokenizer -> train/val token shards, written atomically.

Pass 1 streams the documents once into a cache file inside the temporary output folder (feeding the
BPE trainer on the way when no tokenizer is given); pass 2 encodes the cache. The cache makes both
passes see identical documents even for hub streams, and gives the document count needed to
guarantee a non-empty validation split. It is deleted before the folder is renamed into place.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from superpose import __version__
from superpose.data.corpus import iter_documents, limit_bytes, resolve_source
from superpose.data.shards import (
    FORMAT,
    TOKENIZER_FILE,
    VERSION,
    ShardWriter,
    dtype_name,
    file_sha256,
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
    progress: bool = True,
) -> Path:
    """Tokenize `sources` into a dataset folder at out_dir and return its path.

    With `tokenizer` None a byte-level BPE of `vocab_size` is trained on the same documents.
    Validation documents are chosen from (seed, document index) alone. Nothing appears at out_dir
    unless the whole run succeeds.
    """
    out = Path(out_dir).expanduser()
    if not sources:
        raise SuperposeError("no corpus given")
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
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise SuperposeError(f"output folder {out} exists and is not empty")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        docs: Iterator[str] = itertools.chain.from_iterable(
            iter_documents(s, text_field=text_field, hf_config=hf_config, hf_split=hf_split) for s in sources
        )
        if max_bytes is not None:
            docs = limit_bytes(docs, max_bytes)
        cache = _DocumentCache(tmp / CACHE_FILE)
        with tqdm(desc="reading corpus", unit="doc", disable=not progress) as bar:
            recorded = cache.record(docs, bar)
            if tok is None:
                tok = train_tokenizer(recorded, vocab_size)
            for _ in recorded:  # caches the corpus when no training pass consumed it
                pass
        is_val = _choose_val(cache.count, val_fraction, min_val_documents, seed, sources)

        tok.save(str(tmp / TOKENIZER_FILE))
        eos = eos_id(tok)
        vocab = vocab_size_of(tok)
        dtype = token_dtype(vocab)
        with ShardWriter(tmp, "train", dtype, shard_tokens) as train, ShardWriter(tmp, "val", dtype, shard_tokens) as val:
            with tqdm(total=cache.count, desc="encoding", unit="doc", disable=not progress) as bar:
                for start, batch in _batches(cache):
                    encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
                    for writer, flag in ((train, False), (val, True)):
                        ids = [enc.ids + [eos] for i, enc in enumerate(encodings) if is_val[start + i] == flag]
                        if ids:
                            writer.add(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64), len(ids))
                    bar.update(len(batch))
            splits = {"train": train.close(), "val": val.close()}
        cache.path.unlink()
        write_meta(
            tmp,
            {
                "format": FORMAT,
                "version": VERSION,
                "dtype": dtype_name(dtype),
                "vocab_size": vocab,
                "eos_id": eos,
                "tokenizer": TOKENIZER_FILE,
                "tokenizer_sha256": file_sha256(tmp / TOKENIZER_FILE),
                "source": list(sources),
                "seed": seed,
                "val_fraction": val_fraction,
                "max_bytes": max_bytes,
                "superpose_version": __version__,
                "splits": splits,
            },
        )
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _DocumentCache:
    """Length-prefixed UTF-8 documents on disk, so pass 2 re-reads exactly what pass 1 saw."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def record(self, docs: Iterable[str], bar: tqdm) -> Iterator[str]:
        """Write each document to the cache while passing it on (to the tokenizer trainer)."""
        with open(self.path, "wb") as f:
            for doc in docs:
                raw = doc.encode("utf-8")
                f.write(_LENGTH.pack(len(raw)))
                f.write(raw)
                self.count += 1
                bar.update()
                yield doc

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            while header := f.read(_LENGTH.size):
                (size,) = _LENGTH.unpack(header)
                yield f.read(size).decode("utf-8")


def _batches(docs: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """Group documents into ~1 MB batches for encode_batch; yields (index of first document, batch)."""
    start, batch, size = 0, [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= ENCODE_BATCH_BYTES:
            yield start, batch
            start, batch, size = start + len(batch), [], 0
    if batch:
        yield start, batch


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
