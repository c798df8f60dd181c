"""`superpose prepare`: corpus -> tokenizer -> train/val token shards, in parallel, resumable, in bounded memory.

Everything happens in a work folder beside the output (``.prepare-NAME``), which becomes the output by one rename:

1. read: stream the documents once into a cache file plus an offsets file (feeding the BPE trainer on the way when
   no tokenizer is given). The cache makes every later step see identical documents, even for hub streams, and gives
   the document count that guarantees a non-empty validation split.
2. encode: cut the (shuffled) document order into chunks of about CHUNK_BYTES and encode each in a worker process;
   the main process appends each encoded chunk (a part) to one file, parts.bin, and indexes it (_Parts). The chunks
   depend only on the corpus and the arguments, never on the number of workers.
3. assemble: append the parts in chunk order to the shards (hashing them on the way) and write meta.json.

Memory is bounded by SHUFFLE_BLOCK documents' offsets and a few chunks per worker, whatever the corpus size. A run
that is killed leaves the work folder; the same command continues it (a finished read and finished parts are kept),
a different one is refused. Every work file's SHA-256 is logged when the file is complete (files.ChecksumLog), every
part's in the index of parts.bin, and a continuing run keeps only what matches: a damaged part is encoded again, a
damaged read (document cache, offsets, tokenizer, its record) is read again, a damaged arguments.json starts the work
over. A bad input (a SuperposeError) removes the folder, as nothing of it is worth keeping. The work folder holds
the same few files whatever the corpus size or the number of workers, and the shards.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from superpose import __version__
from superpose.data.corpus import Skipped, check_decoding, iter_documents, limit_bytes, resolve_source
from superpose.data.pretokenized import check_ids_source, is_flat_ids, iter_id_documents
from superpose.data.shards import (
    DTYPES,
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
from superpose.files import (
    ChecksumLog,
    FolderLock,
    append_line,
    commit_dir,
    file_sha256,
    first_line,
    require_empty,
    write_atomic,
)

WORK_PREFIX = ".prepare-"
ARGUMENTS_FILE = "arguments.json"
CACHE_FILE = "documents.cache"
OFFSETS_FILE = "documents.offsets"
READ_FILE = "read.json"
PARTS_FILE = "parts.bin"
PARTS_INDEX = "parts.index"
READ_FILES = (CACHE_FILE, OFFSETS_FILE, TOKENIZER_FILE, READ_FILE)  # what the read makes, trusted together
# Documents are shuffled within consecutive blocks of this many (the whole corpus when smaller): one block's offsets,
# permutation and flags (a few tens of bytes a document) are all a shuffle holds in memory.
SHUFFLE_BLOCK = 1 << 22
_SCORE_BLOCK = 1 << 22  # validation scores drawn per step while counting the held-out documents
CHUNK_BYTES = 4 << 20  # text (or id bytes) per chunk: the unit of parallel work and of resuming
ENCODE_BATCH_BYTES = 1 << 20  # text per encode_batch call inside a chunk
_OFFSET_FLUSH = 1 << 16


def prepare(
    sources: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_field: str = "text",
    ids_column: str | None = None,
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
    workers: int = 1,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Tokenize `sources` into a dataset folder at out_dir and return its path.

    With `tokenizer` None a byte-level BPE of `vocab_size` is trained on the same documents. Token ids users already
    have (``.npy``/``.bin`` files, or an `ids_column` of parquet, a `datasets` folder or a hub dataset) are copied, not
    re-tokenized; they need the `tokenizer` that made them. Validation documents are chosen from (seed, document
    index) alone. Both splits are written in an order shuffled by `seed` within blocks of SHUFFLE_BLOCK documents: in
    reading order, neighbouring documents (which share windows) are alike, and the validation windows, read from the
    start of their split, would all come from the first files. `keep_order` keeps the reading order.
    Text files are decoded with `encoding`; `errors` is "skip" (a folder's undecodable files are left out) or
    "replace" (U+FFFD). `workers` processes encode in parallel; the output is the same for any number. `say` gets the
    files skipped and, at the end, documents, tokens and bytes per split. Nothing appears at out_dir unless the whole
    run succeeds; a killed run is continued by the same call.
    """
    out = Path(out_dir).expanduser()
    ids = ids_column is not None or any(is_flat_ids(s) for s in sources)
    tok = _check_arguments(sources, tokenizer, vocab_size, val_fraction, min_val_documents, seed, shard_tokens,
                           max_bytes, encoding, errors, workers, ids, ids_column)
    require_empty(out, "output folder")
    arguments = {
        "sources": list(sources), "tokenizer": tokenizer,
        "tokenizer_sha256": hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest() if tok else None,
        "vocab_size": None if tok else vocab_size, "text_field": None if ids else text_field, "ids_column": ids_column,
        "val_fraction": val_fraction, "min_val_documents": min_val_documents, "seed": seed,
        "shard_tokens": shard_tokens, "max_bytes": max_bytes, "hf_config": hf_config, "hf_split": hf_split,
        "keep_order": keep_order, "encoding": encoding, "errors": errors, "shuffle_block": SHUFFLE_BLOCK,
        "chunk_bytes": CHUNK_BYTES, "superpose_version": __version__,
    }
    splits = _prepare_in_work_folder(out, tok, arguments, workers, progress, say)
    for name, split in splits.items():
        size = f"{split['bytes']:,} bytes" if split["bytes"] is not None else "pre-tokenized"
        say(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, {size}")
    return out


def _prepare_in_work_folder(out: Path, tok: Tokenizer | None, arguments: dict[str, Any], workers: int,
                            progress: bool, say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Build the dataset in ``.prepare-NAME/`` beside ``out`` (continuing a killed run there), then move it to ``out``.

    A bad input removes the work folder (nothing in it is worth keeping); damage found in it keeps it for a look.
    """
    work = out.parent / f"{WORK_PREFIX}{out.name}"
    with FolderLock(work, "prepare work folder"):
        log = _claim(work, arguments, out, say)
        try:
            splits = _build(work, log, tok, arguments, workers, progress, say)
        except SuperposeError as e:
            if not isinstance(e, WorkFileDamaged):
                shutil.rmtree(work, ignore_errors=True)
            raise
        _drop_work_files(work)
        commit_dir(work, out)
    return splits


def _build(work: Path, log: ChecksumLog, tok: Tokenizer | None, arguments: dict[str, Any], workers: int,
           progress: bool, say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The work itself: read the documents (training the tokenizer if none is given), split off validation, encode
    the chunks in ``workers`` processes, write shards and meta into ``work``; returns the splits' counts."""
    a, ids = arguments, arguments["text_field"] is None
    skipped = Skipped()
    count, tok, note = _read(work, log, _documents(a, tok, skipped), tok, a["vocab_size"], progress,
                             lambda: _skipped_note(skipped))
    if note:
        say(note)
    holdout = _Holdout(count, a["val_fraction"], a["min_val_documents"], a["seed"], a["sources"])
    eos, vocab = eos_id(tok), vocab_size_of(tok)
    dtype = token_dtype(vocab)
    offsets = np.memmap(work / OFFSETS_FILE, dtype=np.int64, mode="r")
    encoder = _Encoder(None if ids else tok.to_str(), str(work / CACHE_FILE), eos, dtype_name(dtype))
    workers = min(workers, -(-int(offsets[-1]) // CHUNK_BYTES))  # no process without a chunk to encode
    parts = _Parts(work)
    n_chunks = _encode(_chunks(offsets, holdout, a["keep_order"], a["seed"]), encoder, workers, count, progress,
                       parts, say)
    del offsets
    splits = _assemble(work, parts, n_chunks, dtype, vocab, eos, a["shard_tokens"], ids)
    write_meta(work, _meta(work, dtype, vocab, eos, a["sources"], a["seed"], a["keep_order"], a["val_fraction"],
                           a["max_bytes"], splits))
    return splits


def _documents(arguments: dict[str, Any], tok: Tokenizer | None, skipped: Skipped) -> Iterable[Any]:
    """Every source's documents in reading order: token-id arrays for pre-tokenized input, else text."""
    a = arguments
    if a["text_field"] is None:
        return itertools.chain.from_iterable(
            iter_id_documents(s, ids_column=a["ids_column"], vocab_size=vocab_size_of(tok), eos=eos_id(tok),
                              hf_config=a["hf_config"], hf_split=a["hf_split"]) for s in a["sources"])
    return _text_documents(a["sources"], a["text_field"], a["hf_config"], a["hf_split"], a["encoding"], a["errors"],
                           skipped, a["max_bytes"])


def _text_documents(sources: list[str], text_field: str, hf_config: str | None, hf_split: str, encoding: str,
                    errors: str, skipped: Skipped, max_bytes: int | None) -> Iterable[str]:
    """Every source's documents in reading order, cut at ``max_bytes`` of text."""
    docs = itertools.chain.from_iterable(
        iter_documents(s, text_field=text_field, hf_config=hf_config, hf_split=hf_split, encoding=encoding,
                       errors=errors, skipped=skipped) for s in sources)
    return limit_bytes(docs, max_bytes) if max_bytes is not None else docs


def _drop_work_files(work: Path) -> None:
    """Leave only the shards and meta.json in the work folder, which then becomes the output."""
    for name in (ARGUMENTS_FILE, READ_FILE, CACHE_FILE, OFFSETS_FILE, PARTS_FILE, PARTS_INDEX, ChecksumLog.NAME,
                 ".lock"):
        (work / name).unlink(missing_ok=True)
    shutil.rmtree(work / "parts", ignore_errors=True)  # a folder continued from the one-file-per-chunk layout


def _check_arguments(sources: list[str], tokenizer: str | None, vocab_size: int, val_fraction: float,
                     min_val_documents: int, seed: int, shard_tokens: int, max_bytes: int | None, encoding: str,
                     errors: str, workers: int, ids: bool, ids_column: str | None) -> Tokenizer | None:
    """Every argument checked before anything is read or written; returns the given tokenizer, loaded."""
    if not sources:
        raise SuperposeError("no corpus given")
    if workers < 1:
        raise SuperposeError(f"workers must be at least 1, got {workers}")
    check_decoding(encoding, errors)
    for source in sources:
        check_ids_source(source, ids_column) if ids else resolve_source(source)
    if ids and tokenizer is None:
        raise SuperposeError("pre-tokenized input needs --tokenizer: the tokenizer that made its ids (for the "
                             "vocabulary size and the end-of-text id)")
    if ids and max_bytes is not None:
        raise SuperposeError("max_bytes counts text bytes and does not apply to pre-tokenized input")
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


def _claim(work: Path, arguments: dict[str, Any], out: Path, say: Callable[[str], None]) -> ChecksumLog:
    """Record this run's arguments in the work folder, or check that an unfinished run there had the same ones;
    returns the folder's checksum log."""
    log = ChecksumLog(work)
    path = work / ARGUMENTS_FILE
    if log.verified(ARGUMENTS_FILE):
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != arguments:
            key = next(k for k in sorted(set(before) | set(arguments)) if before.get(k) != arguments.get(k))
            raise SuperposeError(
                f"{work} holds an unfinished prepare of {out} with other arguments ({key}: {before.get(key)!r} then, "
                f"{arguments.get(key)!r} now): re-run it as before to finish it, or delete {work} to start over")
        return log
    if ARGUMENTS_FILE in log.sums:
        say(f"{path} does not match its checksum: the work in {work} cannot be trusted, starting it over")
    # otherwise a run killed before it recorded its arguments: nothing to keep either
    for leftover in work.iterdir():
        if leftover.name != ".lock":
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    write_atomic(path, json.dumps(arguments, indent=1) + "\n")
    log = ChecksumLog(work)
    log.record(ARGUMENTS_FILE)
    return log


def _skipped_note(skipped: Skipped) -> str | None:
    if not skipped:
        return None
    undecoded = any(reason.startswith("not ") for reason in skipped.files)
    return skipped.summary() + ("; read them with --encoding, or --errors replace" if undecoded else "")


def _read(work: Path, log: ChecksumLog, docs: Iterable[Any], tok: Tokenizer | None, vocab_size: int | None,
          progress: bool, note: Callable[[], str | None]) -> tuple[int, Tokenizer, str | None]:
    """Pass 1 (skipped when an earlier run finished it and its files match their checksums): cache every document
    and, with no tokenizer, train one.

    Returns the document count, the tokenizer and the note on files skipped.
    """
    done = work / READ_FILE
    if all(log.verified(name) for name in READ_FILES):
        record = json.loads(done.read_text(encoding="utf-8"))
        return record["documents"], load_tokenizer(str(work / TOKENIZER_FILE)), record["note"]
    before = {name: log.sums.get(name) for name in READ_FILES}
    cache = _DocumentCache(work)
    with tqdm(desc="reading corpus", unit="doc", disable=not progress) as bar:
        recorded = cache.record(docs, bar)
        if tok is None:
            tok = train_tokenizer(recorded, vocab_size)
        for _ in recorded:  # caches the corpus when no training pass consumed it
            pass
    tok.save(str(work / TOKENIZER_FILE))
    record = {"documents": cache.count, "note": note()}
    write_atomic(done, json.dumps(record) + "\n")
    after = {**cache.sha256, TOKENIZER_FILE: file_sha256(work / TOKENIZER_FILE), READ_FILE: file_sha256(done)}
    if after != before:  # parts made from another read, if any, go before this read is logged as done
        for name in (PARTS_INDEX, PARTS_FILE):
            (work / name).unlink(missing_ok=True)
    for name, sha256 in after.items():
        log.record(name, sha256)
    return record["documents"], tok, record["note"]


class _DocumentCache:
    """Documents' bytes (UTF-8 text, or uint32 ids) back to back, and an offsets file of their N+1 boundaries;
    `sha256` holds both files' checksums, taken on the way (the cache may be far larger than memory)."""

    def __init__(self, folder: Path) -> None:
        self.data = folder / CACHE_FILE
        self.offsets = folder / OFFSETS_FILE
        self.count = 0
        self.sha256: dict[str, str] = {}

    def record(self, docs: Iterable[str | np.ndarray], bar: tqdm) -> Iterator[str | np.ndarray]:
        """Write each document to the cache while passing it on (to the tokenizer trainer)."""
        hashes = {CACHE_FILE: hashlib.sha256(), OFFSETS_FILE: hashlib.sha256()}

        def write(file: Any, name: str, raw: bytes) -> None:
            file.write(raw)
            hashes[name].update(raw)

        with open(self.data, "wb") as data, open(self.offsets, "wb") as offsets:
            ends: list[int] = [0]
            for doc in docs:
                write(data, CACHE_FILE,
                      doc.encode("utf-8") if isinstance(doc, str) else doc.astype("<u4", copy=False).tobytes())
                ends.append(data.tell())
                self.count += 1
                if len(ends) >= _OFFSET_FLUSH:
                    write(offsets, OFFSETS_FILE, np.asarray(ends, dtype="<i8").tobytes())
                    ends = []
                bar.update()
                yield doc
            write(offsets, OFFSETS_FILE, np.asarray(ends, dtype="<i8").tobytes())
        self.sha256 = {name: h.hexdigest() for name, h in hashes.items()}


class _Holdout:
    """Which documents are held out, from (seed, document index) alone, without holding a flag per document.

    Document i gets score u_i, the i-th draw of default_rng(seed) (drawn again for any range by advancing the
    generator); it is held out when u_i < val_fraction, or when it is among the min_val lowest scores. If that takes
    every document, the highest score trains.
    """

    def __init__(self, n_docs: int, val_fraction: float, min_val: int, seed: int, sources: list[str]) -> None:
        corpus = ", ".join(sources)
        if n_docs == 0:
            raise SuperposeError(f"corpus {corpus} has no documents")
        if n_docs < min_val + 1:
            raise SuperposeError(
                f"corpus {corpus} has {n_docs} document(s): too few for {min_val} validation document(s)"
                " and at least one training document"
            )
        self.seed, self.fraction = seed, val_fraction
        held, low_scores, low_index, top = 0, np.zeros(0), np.zeros(0, np.int64), (-1.0, 0)
        for start in range(0, n_docs, _SCORE_BLOCK):
            scores = self.scores(start, min(n_docs, start + _SCORE_BLOCK))
            held += int((scores < val_fraction).sum())
            keep = np.argsort(scores, kind="stable")[:min_val]
            low_scores = np.concatenate([low_scores, scores[keep]])
            low_index = np.concatenate([low_index, start + keep])
            best = np.lexsort((low_index, low_scores))[:min_val]
            low_scores, low_index = low_scores[best], low_index[best]
            if scores.max() > top[0]:
                top = (float(scores.max()), start + int(np.argmax(scores)))
        self.extra_val = set(low_index.tolist()) if held < min_val else set()
        self.extra_train = top[1] if max(held, min_val) == n_docs else None

    def scores(self, start: int, stop: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64(self.seed).advance(start)).random(stop - start)

    def mask(self, start: int, stop: int) -> np.ndarray:
        """Held-out flags of documents [start, stop)."""
        is_val = self.scores(start, stop) < self.fraction
        for i in self.extra_val:
            if start <= i < stop:
                is_val[i - start] = True
        if self.extra_train is not None and start <= self.extra_train < stop:
            is_val[self.extra_train - start] = False
        return is_val


@dataclass(frozen=True)
class _Chunk:
    """One unit of encoding: documents (cache byte ranges) in output order and whether each is held out."""

    index: int
    starts: np.ndarray
    ends: np.ndarray
    is_val: np.ndarray


def _chunks(offsets: np.ndarray, holdout: _Holdout, keep_order: bool, seed: int) -> Iterator[_Chunk]:
    """The output order, block by block, cut into chunks of about CHUNK_BYTES; a function of the arguments alone."""
    n = len(offsets) - 1
    rng = np.random.default_rng([seed, 1])
    index = 0
    for block in range(0, n, SHUFFLE_BLOCK):
        size = min(SHUFFLE_BLOCK, n - block)
        local = np.arange(size) if keep_order else rng.permutation(size)
        starts, ends = np.asarray(offsets[block + local]), np.asarray(offsets[block + local + 1])
        is_val = holdout.mask(block, block + size)[local]
        group = (np.cumsum(ends - starts) - (ends - starts)) // CHUNK_BYTES
        bounds = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), size]
        for a, b in itertools.pairwise(bounds):
            yield _Chunk(index, starts[a:b], ends[a:b], is_val[a:b])
            index += 1


class WorkFileDamaged(SuperposeError):
    """A part that fails its checks while the shards are assembled: unlike a bad input, this keeps the work folder
    (hours of encoding, perhaps); the message says whether the same command heals it or the folder must go."""


def _part_sha256(index: int, part: bytes) -> str:
    """SHA-256 of a chunk's number and its part: an index line vouches for that chunk's part and no other."""
    return hashlib.sha256(index.to_bytes(8, "little") + part).hexdigest()


_PART_LINE = re.compile(r"([0-9a-f]{64}) ([0-9]+) ([0-9]+) ([0-9]+)")


class _Parts:
    """Every encoded chunk (part) back to back in one file, parts.bin, and where each is in parts.index: a line
    ``SHA256 CHUNK OFFSET LENGTH`` per part, the latest line of a chunk counting (hash: _part_sha256).

    Only the main process writes both, and only by appending: the part first, then its line. So the file count is
    two whatever the corpus size or the number of workers, no two processes ever append to one file (not atomic on
    network file systems), a kill leaves at most a part no line points to and a cut line (no entry, as a damaged one
    is), and a part that does not match its line is encoded again and appended anew.
    """

    def __init__(self, work: Path) -> None:
        self.data, self.index = work / PARTS_FILE, work / PARTS_INDEX
        self.spans: dict[int, tuple[str, int, int]] = {}  # chunk -> (sha256, offset, length)
        if self.index.is_file():
            for line in self.index.read_bytes().decode("utf-8", "replace").split("\n"):
                if entry := _PART_LINE.fullmatch(line):
                    self.spans[int(entry[2])] = (entry[1], int(entry[3]), int(entry[4]))

    def read(self, index: int) -> bytes | None:
        """Chunk `index`'s part, or None when it has no line or does not match it."""
        if index not in self.spans or not self.data.is_file():
            return None
        sha256, offset, length = self.spans[index]
        with open(self.data, "rb") as f:
            part = os.pread(f.fileno(), length, offset)
        return part if len(part) == length and _part_sha256(index, part) == sha256 else None

    def add(self, index: int, part: bytes, sha256: str) -> None:
        """Append chunk `index`'s part (hashed by the worker that made it) and then its line."""
        with open(self.data, "ab") as f:
            offset = f.seek(0, os.SEEK_END)
            f.write(part)
        append_line(self.index, f"{sha256} {index} {offset} {len(part)}")
        self.spans[index] = (sha256, offset, len(part))


class _Encoder:
    """Turns a chunk into a part: an npz of train and val ids (each document followed by EOS) and their counts.

    Built once per worker process; `tokenizer_json` is None for pre-tokenized documents, which are copied.
    """

    def __init__(self, tokenizer_json: str | None, cache: str, eos: int, dtype: str) -> None:
        self.spec = (tokenizer_json, cache, eos, dtype)
        self.tok = Tokenizer.from_str(tokenizer_json) if tokenizer_json is not None else None
        self.cache, self.eos, self.dtype = cache, eos, DTYPES[dtype]

    def __call__(self, chunk: _Chunk) -> tuple[bytes, str]:
        """The chunk's part and its SHA-256 (_part_sha256), for the main process to append to parts.bin."""
        pieces: dict[bool, list[np.ndarray]] = {False: [], True: []}
        counts = {False: [0, 0], True: [0, 0]}  # documents, text bytes
        eos = np.array([self.eos], self.dtype)
        with open(self.cache, "rb") as f:
            for first, raw in _batches(f.fileno(), chunk.starts, chunk.ends):
                for i, ids in enumerate(self._ids(raw), first):
                    held_out = bool(chunk.is_val[i])
                    pieces[held_out] += [ids, eos]
                    counts[held_out][0] += 1
                    counts[held_out][1] += len(raw[i - first])
        out = {}
        for split, held_out in (("train", False), ("val", True)):
            out[split] = np.concatenate(pieces[held_out]) if pieces[held_out] else np.zeros(0, self.dtype)
            out[f"{split}_counts"] = np.array(counts[held_out], np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, **out)
        part = buffer.getvalue()
        return part, _part_sha256(chunk.index, part)

    def _ids(self, raw: list[bytes]) -> Iterator[np.ndarray]:
        if self.tok is None:
            return (np.frombuffer(r, "<u4").astype(self.dtype) for r in raw)
        encodings = self.tok.encode_batch_fast([r.decode("utf-8") for r in raw], add_special_tokens=False)
        return (np.array(enc.ids, self.dtype) for enc in encodings)


def _batches(fd: int, starts: np.ndarray, ends: np.ndarray) -> Iterator[tuple[int, list[bytes]]]:
    """(index of the first, documents) of consecutive runs of about ENCODE_BATCH_BYTES read from the cache, so a
    worker never holds more than one run's text and encodings."""
    batch: list[bytes] = []
    first = size = 0
    for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        batch.append(os.pread(fd, b - a, a))
        size += b - a
        if size >= ENCODE_BATCH_BYTES:
            yield first, batch
            batch, first, size = [], i + 1, 0
    if batch:
        yield first, batch


_WORKER: _Encoder | None = None


def _start_worker(*spec: Any) -> None:
    """Worker initializer: one tokenizer per process, encoding on one thread (the processes are the parallelism).

    A worker whose prepare is killed would wait for work forever: a watcher thread ends it with its parent.
    """
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = _Encoder(*spec)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def _run_worker(chunk: _Chunk) -> tuple[bytes, str]:
    return _WORKER(chunk)


def _encode(chunks: Iterator[_Chunk], encoder: _Encoder, workers: int, n_docs: int, progress: bool,
            parts: _Parts, say: Callable[[str], None]) -> int:
    """Encode every chunk without a part matching its line (in `workers` processes), at most 2 per worker queued,
    appending each new part to `parts`; returns the number of chunks."""
    total, remade = 0, []
    with tqdm(total=n_docs, desc="encoding", unit="doc", disable=not progress) as bar:

        def todo() -> Iterator[_Chunk]:
            nonlocal total
            for chunk in chunks:
                total += 1
                if parts.read(chunk.index) is not None:
                    bar.update(len(chunk.starts))
                    continue
                if chunk.index in parts.spans:
                    remade.append(str(chunk.index))  # damaged (one appended but not yet indexed is just made again)
                yield chunk

        if workers == 1:
            for chunk in todo():
                parts.add(chunk.index, *encoder(chunk))
                bar.update(len(chunk.starts))
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (torch, rayon)
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                     initargs=encoder.spec) as pool:
                pending: dict[Future, _Chunk] = {}
                for chunk in todo():
                    if len(pending) >= 2 * workers:
                        _collect(pending, bar, FIRST_COMPLETED, parts)
                    pending[pool.submit(_run_worker, chunk)] = chunk
                _collect(pending, bar, ALL_COMPLETED, parts)
    if remade:
        say(f"made again {len(remade)} part(s) that did not match their checksums in {parts.data}: chunk "
            f"{', '.join(remade[:3])}{', ...' if len(remade) > 3 else ''}")
    return total


def _collect(pending: dict[Future, _Chunk], bar: tqdm, when: str, parts: _Parts) -> None:
    done, _ = wait(pending, return_when=when)
    for future in done:
        chunk = pending.pop(future)
        parts.add(chunk.index, *future.result())  # a worker's error surfaces here
        bar.update(len(chunk.starts))


def _assemble(work: Path, parts: _Parts, n_chunks: int, dtype: np.dtype, vocab: int, eos: int, shard_tokens: int,
              ids: bool) -> dict[str, Any]:
    """Append the parts, in chunk order, to the train and validation shards; returns the splits' metadata."""
    with ShardWriter(work, "train", dtype, shard_tokens) as train, ShardWriter(work, "val", dtype, shard_tokens) as val:
        for index in range(n_chunks):
            part = _read_part(work, parts, index, dtype, vocab, eos)
            for name, writer in (("train", train), ("val", val)):
                documents, text_bytes = part[f"{name}_counts"].tolist()
                if documents:
                    writer.add(part[name], documents, text_bytes)
        splits = {"train": train.close(), "val": val.close()}
    if ids:
        for split in splits.values():
            split["bytes"] = None  # the text behind pre-tokenized ids is not known
    return splits


def _read_part(work: Path, parts: _Parts, index: int, dtype: np.dtype, vocab: int, eos: int) -> dict[str, Any]:
    """A part's arrays, read once: checked against its line in the index (it was verified before encoding, so a
    mismatch is a change since), then for the shape the encoder gives them and for ids in the vocabulary, so nothing
    but the encoder's tokens reaches a shard."""
    where = f"chunk {index} of {parts.data}"
    raw = parts.read(index)
    if raw is None:
        raise WorkFileDamaged(f"{where} changed while prepare ran (it does not match its checksum): run the same "
                              f"command again to make it anew")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            part = {key: npz[key] for key in ("train", "val", "train_counts", "val_counts")}
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise WorkFileDamaged(f"{where} is not a part prepare wrote ({first_line(e)}): delete {work} to start "
                              f"over") from None
    for split in ("train", "val"):
        tokens, counts = part[split], part[f"{split}_counts"]
        if (tokens.dtype != dtype or tokens.ndim != 1 or counts.shape != (2,) or counts.dtype != np.int64
                or counts.min() < 0 or (counts[0] == 0) != (len(tokens) == 0) or (len(tokens) and tokens[-1] != eos)):
            raise WorkFileDamaged(f"{where} is not a part prepare wrote (malformed {split} ids or counts): "
                                  f"delete {work} to start over")
        if len(tokens) and int(tokens.max()) >= vocab:
            raise WorkFileDamaged(f"{where} holds token id {int(tokens.max())}, outside the vocabulary of {vocab}: "
                                  f"delete {work} to start over")
    return part


def _meta(tmp: Path, dtype: np.dtype, vocab: int, eos: int, sources: list[str], seed: int, keep_order: bool,
          val_fraction: float, max_bytes: int | None, splits: dict[str, Any]) -> dict[str, Any]:
    """meta.json: the format, the tokenizer (and its checksum), how the corpus was read and split, the shards."""
    return {"format": FORMAT, "version": VERSION, "dtype": dtype_name(dtype), "vocab_size": vocab, "eos_id": eos,
            "tokenizer": TOKENIZER_FILE, "tokenizer_sha256": file_sha256(tmp / TOKENIZER_FILE), "source": list(sources),
            "seed": seed, "shuffled": not keep_order, "val_fraction": val_fraction, "max_bytes": max_bytes,
            "superpose_version": __version__, "splits": splits}
