"""Where training text comes from: the embedded stdlib corpus, local files/folders, or the HF hub.

Every source is turned into a deterministic stream of document strings, so that preparing the
same source twice gives the same shards.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from superpose.errors import SuperposeError
from superpose.files import first_line
from superpose.hub import quiet_hub

EMBEDDED = "embedded"
RECORD_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")
# A source ending like this is meant as a file, so a missing one is "not found", not a hub name.
_FILE_SUFFIXES = {
    ".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".gz", ".parquet", ".csv", ".tsv",
    ".bin", ".arrow", ".zst", ".xz", ".bz2", ".zip", ".tar", ".html", ".xml",
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Stdlib folders that are tests, vendored tools or installed third-party code, not library source.
_EMBEDDED_SKIP = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__",
    "turtledemo", "ensurepip",
}

SourceKind = Literal["embedded", "text", "folder", "records", "hub"]
DECODE_ERRORS = ("skip", "replace")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Source:
    """A validated corpus source: what kind it is and where it lives."""

    spec: str
    kind: SourceKind
    path: Path | None = None


def resolve_source(source: str) -> Source:
    """Classify and validate a corpus source without reading it, so bad input fails before any writing."""
    if source == EMBEDDED:
        root = Path(sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise SuperposeError(f"embedded corpus unavailable: Python stdlib folder {root} not found")
        return Source(source, "embedded", root)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            return Source(source, "folder", path)
        if path.name.lower().endswith(RECORD_SUFFIXES):
            return Source(source, "records", path)
        return Source(source, "text", path)
    if not _looks_like_hub_name(source) or _looks_like_path(path):
        raise SuperposeError(f"corpus not found: {source}{_did_you_mean(path)}")
    return Source(source, "hub")


def _looks_like_hub_name(source: str) -> bool:
    return bool(_HUB_NAME.match(source)) and Path(source).suffix.lower() not in _FILE_SUFFIXES


def _looks_like_path(path: Path) -> bool:
    """``data/corpus_tx`` (its folder exists here) is a local path; ``owner/name`` (no folder ``owner``) a hub name."""
    return len(path.parts) > 1 and path.parent.is_dir()


def _did_you_mean(path: Path) -> str:
    """A hint naming a local file or folder whose name is close to a mistyped one ('' when there is none)."""
    try:
        names = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, names, n=1, cutoff=0.8)
    return f" (did you mean {path.parent / near[0]}?)" if near else ""


def check_decoding(encoding: str, errors: str) -> None:
    """Refuse an unknown text encoding or error policy before any corpus is read."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise SuperposeError(f"unknown text encoding {encoding!r}") from None
    if errors not in DECODE_ERRORS:
        raise SuperposeError(f"errors must be one of {', '.join(DECODE_ERRORS)}, got {errors!r}")


@dataclass
class Skipped:
    """Files of a folder (or of the embedded corpus) left out, by reason, so prepare can say what it dropped."""

    files: dict[str, list[Path]] = field(default_factory=dict)

    def add(self, path: Path, reason: str) -> None:
        self.files.setdefault(reason, []).append(path)

    def __len__(self) -> int:
        return sum(map(len, self.files.values()))

    def summary(self, shown: int = 3) -> str:
        """One line: how many files, each reason with its count and the first few names."""
        parts = []
        for reason, paths in self.files.items():
            names = ", ".join(str(p) for p in paths[:shown]) + (", ..." if len(paths) > shown else "")
            parts.append(f"{len(paths)} {reason} ({names})")
        return f"skipped {len(self)} file(s): " + "; ".join(parts)


def iter_documents(
    source: str,
    *,
    text_field: str = "text",
    hf_config: str | None = None,
    hf_split: str = "train",
    encoding: str = "utf-8",
    errors: str = "skip",
    skipped: Skipped | None = None,
) -> Iterator[str]:
    """Yield the non-empty document texts of one source, in a deterministic order.

    Text files are decoded with ``encoding``; with ``errors="skip"`` a file that does not decode is an error when
    named alone and is left out of a folder (recorded in ``skipped``), with ``errors="replace"`` its undecodable bytes
    become U+FFFD. Files holding NUL characters are binaries and always left out of a folder.
    """
    check_decoding(encoding, errors)
    src = resolve_source(source)
    decode = _Decoder(encoding, errors, skipped if skipped is not None else Skipped())
    docs: Iterator[str]
    if src.kind == "embedded":
        docs = _iter_embedded(src.path, decode)
    elif src.kind == "folder":
        docs = _iter_folder(src.path, text_field, decode)
    elif src.kind == "records":
        docs = _iter_records(src.path, text_field)
    elif src.kind == "text":
        docs = iter([decode.named(src.path)])
    else:
        docs = _iter_hub(source, hf_config, hf_split, text_field)
    return (d for d in docs if d)


def limit_bytes(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Stop after max_bytes UTF-8 bytes, cutting the last document, so demos can use a slice of a corpus."""
    left = max_bytes
    for doc in docs:
        if left <= 0:
            return
        raw = doc.encode("utf-8")
        if len(raw) > left:
            doc = raw[:left].decode("utf-8", errors="ignore")
        left -= len(raw)
        if doc:
            yield doc


def _iter_embedded(root: Path, decode: _Decoder) -> Iterator[str]:
    for path in _walk(root, lambda name: name in _EMBEDDED_SKIP):
        if path.suffix == ".py" and (text := decode(path)) is not None:
            yield text


def _iter_folder(root: Path, text_field: str, decode: _Decoder) -> Iterator[str]:
    """Walk a folder in sorted order; record files are read as records, files that are not text are skipped."""
    for path in _walk(root, lambda name: name.startswith(".")):
        if path.name.startswith("."):
            continue
        if path.name.lower().endswith(RECORD_SUFFIXES):
            yield from _iter_records(path, text_field)
        elif (text := decode(path)) is not None:
            yield text


def _walk(root: Path, skip_dir: Callable[[str], bool]) -> list[Path]:
    """All files under root sorted by relative path, without descending into skipped folders."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not skip_dir(d)]
        files.extend(Path(folder, n) for n in names)
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


@dataclass
class _Decoder:
    """Decode text files one way for a whole source, recording what it leaves out and why."""

    encoding: str
    errors: str
    skipped: Skipped

    def __call__(self, path: Path) -> str | None:
        """The file's text, or None (recorded in ``skipped``) for a binary or a file that does not decode."""
        text, reason = self._decode(path)
        if reason is not None:
            self.skipped.add(path, reason)
        return text

    def named(self, path: Path) -> str:
        """A file named as a source on its own: one that does not decode is an error, with the way out."""
        text, reason = self._decode(path)
        if reason is None:
            return text
        hint = "; pass --encoding, or --errors replace to keep it with U+FFFD" if reason.startswith("not ") else ""
        raise SuperposeError(f"corpus file {path} is {reason}{hint}")

    def _decode(self, path: Path) -> tuple[str | None, str | None]:
        try:
            raw = path.read_bytes()
        except OSError as e:
            return None, f"unreadable ({first_line(e)})"
        if b"\x00" in raw and "\x00".encode(self.encoding) == b"\x00":  # NUL bytes: a binary (not UTF-16 text)
            return None, "binary, not text"
        try:
            text = raw.decode(self.encoding, "strict" if self.errors == "skip" else self.errors)
        except UnicodeDecodeError:
            return None, f"not {self.encoding} text"
        return (None, "binary, not text") if "\x00" in text else (text, None)


def _iter_records(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    builder = "parquet" if path.name.lower().endswith(".parquet") else "json"
    where = f"corpus file {path}"
    try:
        records = iter(datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True))
    except Exception as e:
        raise SuperposeError(f"could not read {where}: {first_line(e)}") from e
    yield from _texts(records, text_field, where, f"could not read {where}")


def hub_failure(name: str) -> str:
    return f"could not load dataset '{name}' from the Hugging Face hub"


def open_hub_records(name: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    """A hub dataset's records, streamed; one that cannot be opened is a one-line error (saying so when the hub is
    switched off and nothing is cached). Errors while iterating are the caller's to word (see :func:`hub_failure`)."""
    import datasets

    try:
        with quiet_hub():
            return iter(datasets.load_dataset(name, config, split=split, streaming=True))
    except Exception as e:
        offline = [v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
        if offline:
            raise SuperposeError(f"corpus not found: {name} is no local file or folder{_did_you_mean(Path(name))},"
                                 f" and the hub is off ({offline[0]}) with no cached copy of it") from e
        raise SuperposeError(f"{hub_failure(name)}{_did_you_mean(Path(name))}: {first_line(e)}") from e


def _iter_hub(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    yield from _texts(open_hub_records(name, config, split), text_field, f"dataset '{name}'", hub_failure(name))


def _texts(records: Iterator[dict[str, Any]], text_field: str, where: str, failure: str) -> Iterator[str]:
    """Pull the text field out of each record, turning library errors into one-line SuperposeErrors."""
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as e:
            raise SuperposeError(f"{failure}: {first_line(e)}") from e
        if text_field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise SuperposeError(f"{where} has no field '{text_field}' (fields: {fields}); choose one with --text-field")
        value = record[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise SuperposeError(f"{where}: field '{text_field}' holds {type(value).__name__}, not text")
        yield value
