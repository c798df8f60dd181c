"""Token shards on disk: flat little-endian arrays plus meta.json, memory-mapped for reading.

A flat array (documents joined by EOS) lets the loader read any window with one slice and lets a
resumed run find its exact position from a single integer offset.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import os
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from superpose.data.tokenizer import eos_id as find_eos_id
from superpose.data.tokenizer import load_tokenizer, vocab_size_of
from superpose.errors import SuperposeError
from superpose.files import file_sha256

FORMAT = "superpose-tokens"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
VERIFIED_FILE = ".superpose-verified.json"
"""The cache of shards already hashed, beside meta.json when the folder is writable (else under the user's cache)."""
VERIFIED_FORMAT = "superpose-verified"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits in 16 bits."""
    if vocab_size < 1:
        raise SuperposeError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise SuperposeError(f"vocab_size {vocab_size} does not fit in uint32 token ids")
    return DTYPES["uint16"] if vocab_size <= 2**16 else DTYPES["uint32"]


def dtype_name(dtype: np.dtype) -> str:
    """The meta.json name of a shard dtype."""
    return {v: k for k, v in DTYPES.items()}[np.dtype(dtype)]


class ShardWriter:
    """Append documents' tokens to `<split>-NNNNN.bin` files of at most shard_tokens tokens each.

    Documents may straddle shard boundaries: readers see one logical stream per split. Each shard's sha256 is hashed
    from the bytes as they are written (no second read) and recorded in its meta.json entry.
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise SuperposeError(f"shard_tokens must be at least 1, got {shard_tokens}")
        self.folder = Path(folder)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.tokens = 0
        self.documents = 0
        self.text_bytes = 0
        self._shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()

    def add(self, tokens: np.ndarray, documents: int, text_bytes: int = 0) -> None:
        """Append tokens holding `documents` whole documents (each already followed by EOS) of `text_bytes` UTF-8."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.documents += documents
        self.text_bytes += text_bytes
        self.tokens += len(data)
        while len(data):
            if self._file is None or self._shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            shard = self._shards[-1]
            take = min(len(data), self.shard_tokens - shard["tokens"])
            raw = data[:take].tobytes()
            self._file.write(raw)
            self._digest.update(raw)
            shard["tokens"] += take
            data = data[take:]

    def _open_next(self) -> None:
        self._finish_shard()
        name = f"{self.split}-{len(self._shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self._shards.append({"file": name, "tokens": 0})

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._shards[-1]["sha256"] = self._digest.hexdigest()
            self._digest = hashlib.sha256()

    def close(self) -> dict[str, Any]:
        """Finish the last shard and return the split's entry for meta.json."""
        self._finish_shard()
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.text_bytes,
                "shards": [dict(s) for s in self._shards]}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TokenStream:
    """One split as a single logical token array over memory-mapped shards (nothing is copied up front)."""

    def __init__(
        self, name: str, dataset_path: Path, files: list[Path], counts: list[int], dtype: np.dtype,
        vocab_size: int | None = None,
    ) -> None:
        self.name = name
        self.dataset_path = dataset_path
        self.vocab_size = vocab_size
        self._files = [f for f, n in zip(files, counts) if n > 0]
        self._maps = [np.memmap(f, dtype=dtype, mode="r") for f in self._files]
        self._starts = [0]
        for m in self._maps:
            self._starts.append(self._starts[-1] + len(m))
        self._bounds = np.array(self._starts, dtype=np.int64)

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, stitched across shard boundaries.

        Ids are checked against the vocabulary as they are read (O(window)), so a corrupt shard is a one-line
        error naming the file, not an index error deep inside the embedding.
        """
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) is outside split '{self.name}' of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        shard = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < length:
            local = start + done - self._starts[shard]
            take = min(length - done, len(self._maps[shard]) - local)
            chunk = self._maps[shard][local : local + take]
            if self.vocab_size is not None and take and int(chunk.max()) >= self.vocab_size:
                i = int(np.argmax(chunk >= self.vocab_size))
                raise SuperposeError(
                    f"shard {self._files[shard]} is corrupt: token {local + i} has id {int(chunk[i])}, outside the "
                    f"vocabulary of {self.vocab_size}"
                )
            out[done : done + take] = chunk
            done += take
            shard += 1
        return out

    def read_windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Windows [len(starts), length] as int64, each read cyclically (past the end it continues at token 0).

        Every split ends with EOS, so a wrapped window joins two documents at a document boundary. Windows inside one
        shard are gathered with one fancy index per shard, which keeps a batch of scattered windows as cheap as a few
        sequential reads; the rest (straddling a shard or the end) go through :meth:`read`.
        """
        n = len(self)
        starts = np.asarray(starts, dtype=np.int64) % n
        out = np.empty((len(starts), length), dtype=np.int64)
        shard_of = np.searchsorted(self._starts, starts, side="right") - 1
        inside = starts + length <= self._bounds[shard_of + 1]
        steps = np.arange(length)
        for shard in np.unique(shard_of[inside]):
            rows = np.flatnonzero(inside & (shard_of == shard))
            chunk = self._maps[shard][(starts[rows] - self._starts[shard])[:, None] + steps]
            if self.vocab_size is not None and int(chunk.max()) >= self.vocab_size:
                self.read(int(starts[rows[int(np.argmax((chunk >= self.vocab_size).any(axis=1)))]]), length)  # raises
            out[rows] = chunk
        for row in np.flatnonzero(~inside):
            start = int(starts[row])
            head = min(length, n - start)
            out[row, :head] = self.read(start, head)
            out[row, head:] = self.read(0, length - head)
        return out


class TokenDataset:
    """A validated prepared dataset folder: meta, tokenizer and per-split token streams."""

    def __init__(self, path: Path, meta: dict[str, Any], tokenizer: Tokenizer) -> None:
        self.path = path
        self.meta = meta
        self.tokenizer = tokenizer
        self.vocab_size: int = meta["vocab_size"]
        self.eos_id: int = meta["eos_id"]
        self._dtype = DTYPES[meta["dtype"]]

    def split(self, name: str) -> TokenStream:
        """The token stream of split `name` ("train" or "val")."""
        if name not in self.meta["splits"]:
            raise SuperposeError(f"dataset {self.path} has no split '{name}'")
        shards = self.meta["splits"][name]["shards"]
        return TokenStream(
            name, self.path, [self.path / s["file"] for s in shards], [s["tokens"] for s in shards], self._dtype,
            self.vocab_size,
        )

    def verify(self, share: Share | None = None) -> None:
        """Check every shard against the sha256 meta.json recorded, once per job and not again on a restart.

        Each rank hashes only its share (:func:`assign_shares`) and skips any shard the cache (:data:`VERIFIED_FILE`)
        holds with the same size, mtime, ctime and expected sha256; ``share.combine`` gathers every rank's digests,
        so every rank judges all shards and names the same damaged one. Rank 0 then records the good ones.
        """
        share = share or Share()
        shards = [s for split in self.meta["splits"].values() for s in split["shards"] if "sha256" in s]
        cache = _cache_path(self.path)
        known = _read_cache(cache)
        owners = assign_shares([s["tokens"] * self._dtype.itemsize for s in shards], share.world)
        mine = [s for s, owner in zip(shards, owners) if owner == share.rank]
        seen = share.combine(_digests(self.path, mine, known))
        good: dict[str, dict[str, Any]] = {}
        for shard in shards:
            entry = seen.get(shard["file"])
            if entry is None:
                raise SuperposeError(f"shard {self.path / shard['file']} was verified by no rank: the ranks read "
                                     f"different {META_FILE} files in {self.path}")
            if entry["sha256"] == shard["sha256"]:
                good[shard["file"]] = entry
        if share.rank == 0 and good != known:
            _write_cache(cache, self.path, good)
        for shard in shards:
            if shard["file"] not in good:
                raise SuperposeError(f"shard {self.path / shard['file']} is damaged: its sha256 differs from the one "
                                     f"{META_FILE} recorded when it was written; prepare the dataset again")


def _alone(part: dict[str, Any]) -> dict[str, Any]:
    return part


@dataclass(frozen=True)
class Share:
    """This process's part in verifying a dataset: rank ``rank`` of ``world`` hashes its share of the shards and
    ``combine`` returns the union of every rank's part, on every rank (the trainer passes
    ``train.distributed.merge_across_ranks``; data/ does not know about process groups)."""

    rank: int = 0
    world: int = 1
    combine: Callable[[dict[str, Any]], dict[str, Any]] = _alone


def assign_shares(sizes: list[int], world: int) -> list[int]:
    """The rank that hashes each shard: largest first to the least-loaded rank (ties to the lower shard, the lower
    rank), so every rank computes the same plan and none hashes more than ``sum(sizes) / world`` plus one shard (the
    last shard a rank took found it at or below the mean)."""
    loads = [(0, rank) for rank in range(world)]
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + sizes[i], rank))
    return owners


def _file_key(file: Path) -> dict[str, int]:
    """What a change to a file changes: its size, mtime and ctime (which restoring the mtime with touch or utime
    sets to now, and which a copy gets afresh). Taken before hashing, so a write during the hash is seen next time."""
    st = file.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _digests(root: Path, shards: list[dict[str, Any]], known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each shard's key and sha256: from the cache when the file is unchanged since it was verified, else hashed
    (in threads: hashlib releases the GIL, so several shards hash at once)."""
    out: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    for shard in shards:
        key = _file_key(root / shard["file"])
        cached = known.get(shard["file"])
        if cached == {**key, "sha256": shard["sha256"]}:
            out[shard["file"]] = cached
        else:
            out[shard["file"]] = key
            todo.append(shard)
    if todo:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(todo))) as pool:
            for shard, digest in zip(todo, pool.map(file_sha256, [root / s["file"] for s in todo])):
                out[shard["file"]]["sha256"] = digest
    return out


def _cache_path(root: Path) -> Path:
    """The dataset folder's own cache when it is writable (every user of the dataset shares it); else one per
    dataset path under ``$XDG_CACHE_HOME/superpose/verified`` (default ``~/.cache``)."""
    if os.access(root, os.W_OK):
        return root / VERIFIED_FILE
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "superpose" / "verified" / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]}.json"


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The verified shards a cache file lists; a missing, foreign or damaged one lists none (everything is hashed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != VERIFIED_FORMAT or not isinstance(data.get("shards"), dict):
        return {}
    return {k: v for k, v in data["shards"].items() if isinstance(v, dict)}


def _write_cache(path: Path, root: Path, good: dict[str, dict[str, Any]]) -> None:
    """Replace the cache in one rename, under a unique temporary name (jobs sharing the dataset may write at once),
    readable by every user of the dataset. A cache that cannot be written is skipped: it only saves time."""
    text = json.dumps({"format": VERIFIED_FORMAT, "dataset": str(root.resolve()), "shards": good}, indent=1) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-verified-", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write meta.json (the last file of a prepared dataset)."""
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def open_dataset(path: str | Path, tokenizer: str | None = None, verify: bool = True) -> TokenDataset:
    """Open a prepared dataset, refusing anything inconsistent before training spends time on it.

    If `tokenizer` is given (e.g. the tokenizer of a model being continued), it must have the same
    vocabulary as the tokenizer the shards were made with. With `verify` every shard whose meta.json entry records a
    sha256 is checked here, by this process alone (:meth:`TokenDataset.verify`); ``verify=False`` leaves that to the
    caller, e.g. the trainer, which verifies once its ranks can share the work.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SuperposeError(f"dataset not found: {path} is not a folder")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise SuperposeError(f"{root} has no {META_FILE}: not a prepared dataset")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SuperposeError(f"{meta_path} is not valid JSON: {e}") from e
    _check_meta(meta, meta_path)

    tok_path = root / meta["tokenizer"]
    if not tok_path.is_file():
        raise SuperposeError(f"{root} is missing its tokenizer file {meta['tokenizer']}")
    if file_sha256(tok_path) != meta["tokenizer_sha256"]:
        raise SuperposeError(f"{tok_path} was modified: its sha256 differs from {META_FILE}")
    tok = load_tokenizer(str(tok_path))
    if vocab_size_of(tok) != meta["vocab_size"]:
        raise SuperposeError(f"{tok_path} has {vocab_size_of(tok)} token ids but {META_FILE} says {meta['vocab_size']}")
    if find_eos_id(tok) != meta["eos_id"]:
        raise SuperposeError(f"{tok_path} has EOS id {find_eos_id(tok)} but {META_FILE} says {meta['eos_id']}")

    itemsize = DTYPES[meta["dtype"]].itemsize
    for split_name, split in meta["splits"].items():
        for shard in split["shards"]:
            file = root / shard["file"]
            if not file.is_file():
                raise SuperposeError(f"{root} is missing shard {shard['file']} of split '{split_name}'")
            size, expected = file.stat().st_size, shard["tokens"] * itemsize
            if size != expected:
                raise SuperposeError(
                    f"shard {file} has {size} bytes but {META_FILE} says {shard['tokens']} tokens ({expected} bytes)"
                )

    dataset = TokenDataset(root, meta, tok)
    if verify:
        dataset.verify()
    if tokenizer is not None:
        check_same_vocab(load_tokenizer(tokenizer), tok, tokenizer, root)
    return dataset


def _check_meta(meta: Any, meta_path: Path) -> None:
    """Structural checks on meta.json, so later code can index it without KeyErrors."""

    def bad(problem: str) -> SuperposeError:
        return SuperposeError(f"{meta_path} is not a valid dataset description: {problem}")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"format is not '{FORMAT}'")
    if meta.get("version") != VERSION:
        raise bad(f"version {meta.get('version')!r} is not supported (expected {VERSION})")
    if meta.get("dtype") not in DTYPES:
        raise bad(f"dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    for key in ("vocab_size", "eos_id"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise bad(f"{key} is not a non-negative integer")
    for key in ("tokenizer", "tokenizer_sha256"):
        if not isinstance(meta.get(key), str):
            raise bad(f"{key} is missing")
    if "/" in meta["tokenizer"] or "\\" in meta["tokenizer"]:
        raise bad(f"tokenizer {meta['tokenizer']!r} is not a plain file name")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise bad("no 'train' split")
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise bad(f"split '{name}' has no shard list")
        total = 0
        for shard in split["shards"]:
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("tokens"), int)):
                raise bad(f"split '{name}' has a malformed shard entry {shard!r}")
            if "/" in shard["file"] or "\\" in shard["file"] or shard["tokens"] < 0:
                raise bad(f"split '{name}' has a bad shard entry {shard!r}")
            if "sha256" in shard and not re.fullmatch(r"[0-9a-f]{64}", str(shard["sha256"])):
                raise bad(f"split '{name}' has a malformed sha256 in {shard!r}")
            total += shard["tokens"]
        if split.get("tokens") != total:
            raise bad(f"split '{name}' says {split.get('tokens')} tokens but its shards hold {total}")


def check_same_vocab(given: Tokenizer, ours: Tokenizer, spec: str, root: Path) -> None:
    """Token ids are only meaningful with the vocabulary that produced them."""
    a = given.get_vocab(with_added_tokens=True)
    b = ours.get_vocab(with_added_tokens=True)
    if a == b:
        return
    if len(a) != len(b):
        problem = f"vocabulary of {len(a)} tokens vs {len(b)}"
    else:
        differing = sum(1 for token, i in b.items() if a.get(token) != i)
        problem = f"{differing} of {len(b)} token ids differ"
    raise SuperposeError(f"tokenizer {spec} does not match the shards in {root}: {problem}")
