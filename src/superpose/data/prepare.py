"""`superpose prepare`: corpus -> tokenizer -> train/val token shards, written atomically.

Pass 1 streams the documents once into a cache file inside the temporary output folder (feeding the
BPE trainer on the way when no tokenizer is given); pass 2 encodes the cache. The cache makes both
passes see identical documents even for hub streams, and gives the document count needed to
guarantee a non-empty validation split. It is deleted before the folder is renamed into place.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer
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
from superpose.data.tokenizer import MIN_VOCAB_SIZE, eos_id, load_tokenizer, train_tokenizer, vocab_size_of
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
    elif vocab_size < MIN_VOCAB_SIZE:
        raise SuperposeError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}")
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        docs: Iterator[str] = itertools.chain.from_iterable(
            iter_documents(s, text_field=text_field, hf_config=hf_config, hf_split=hf_split) for s in sources
        )
        if max_bytes is not None:
            docs = limit_bytes(docs, max_bytes)
        cache = tmp / CACHE_FILE
        with open(cache, "wb") as f:
            bar = tqdm(desc="reading corpus", unit="doc", disable=not progress)
            cached = _cache_documents(docs, f, bar)
            if tok is None:
                tok = train_tokenizer(cached, vocab_size)
            n_docs = sum(1 for _ in cached)  # drains the rest when the trainer stopped early (or was skipped)
            n_docs += bar.n - n_docs  # bar.n counts every cached document
            bar.close()
        n_docs = bar.n
        is_val = _choose_val(n_docs, val_fraction, min_val_documents, seed, sources)

        tok.save(str(tmp / TOKENIZER_FILE))
        eos = eos_id(tok)
        vocab = vocab_size_of(tok)
        dtype = token_dtype(vocab)
        with ShardWriter(tmp, "train", dtype, shard_tokens) as train, ShardWriter(tmp, "val", dtype, shard_tokens) as val:
            with tqdm(total=n_docs, desc="encoding", unit="doc", disable=not progress) as bar:
                for start, batch in _batches(_read_cache(cache)):
                    encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
                    for writer, flag in ((train, False), (val, True)):
                        ids = [enc.ids + [eos] for i, enc in enumerate(encodings) if is_val[start + i] == flag]
                        if ids:
                            writer.add(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64), len(ids))
                    bar.update(len(batch))
            splits = {"train": train.close(), "val": val.close()}
        cache.unlink()
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
