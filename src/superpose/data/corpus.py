"""Where training text comes from: the embedded stdlib corpus, local files/folders, or the HF hub.

Every source is turned into a deterministic stream of document strings, so that preparing the
same source twice gives the same shards.
"""

from __future__ import annotations

import os
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from superpose.errors import SuperposeError

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
    if _looks_like_hub_name(source):
        return Source(source, "hub")
    raise SuperposeError(f"corpus not found: {source}")


def _looks_like_hub_name(source: str) -> bool:
    return bool(_HUB_NAME.match(source)) and Path(source).suffix.lower() not in _FILE_SUFFIXES


def iter_documents(
    source: str,
    *,
    text_field: str = "text",
    hf_config: str | None = None,
    hf_split: str = "train",
    max_bytes: int | None = None,
) -> Iterator[str]:
    """Yield the non-empty document texts of one source, in a deterministic order."""
    src = resolve_source(source)
    docs: Iterator[str]
    if src.kind == "embedded":
        docs = _iter_embedded(src.path)
    elif src.kind == "folder":
        docs = _iter_folder(src.path, text_field)
    elif src.kind == "records":
        docs = _iter_records(src.path, text_field)
    elif src.kind == "text":
        docs = iter([_read_text_file(src.path)])
    else:
        docs = _iter_hub(source, hf_config, hf_split, text_field)
    docs = (d for d in docs if d)
    return limit_bytes(docs, max_bytes) if max_bytes is not None else docs


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


def _iter_embedded(root: Path) -> Iterator[str]:
    files = _walk(root, lambda name: name in _EMBEDDED_SKIP)
    for path in files:
        if path.suffix == ".py":
            text = _decode_or_none(path)
            if text is not None:
                yield text


def _iter_folder(root: Path, text_field: str) -> Iterator[str]:
    """Walk a folder in sorted order; record files are read as records, binaries are skipped."""
    for path in _walk(root, lambda name: name.startswith(".")):
        if path.name.startswith("."):
            continue
        if path.name.lower().endswith(RECORD_SUFFIXES):
            yield from _iter_records(path, text_field)
        else:
            text = _decode_or_none(path)
            if text is not None:
                yield text


def _walk(root: Path, skip_dir: Callable[[str], bool]) -> list[Path]:
    """All files under root sorted by relative path, without descending into skipped folders."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not skip_dir(d)]
        files.extend(Path(folder, n) for n in names)
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _decode_or_none(path: Path) -> str | None:
    raw = path.read_bytes()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_text_file(path: Path) -> str:
    text = _decode_or_none(path)
    if text is None:
        raise SuperposeError(f"corpus file {path} is not UTF-8 text")
    return text


def _iter_records(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    builder = "parquet" if path.name.lower().endswith(".parquet") else "json"
    where = f"corpus file {path}"
    try:
        records = iter(datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True))
    except Exception as e:
        raise SuperposeError(f"could not read {where}: {short_error(e)}") from e
    yield from _texts(records, text_field, where, f"could not read {where}")


def _iter_hub(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    import datasets

    failure = f"could not load dataset '{name}' from the Hugging Face hub"
    try:
        records = iter(datasets.load_dataset(name, config, split=split, streaming=True))
    except Exception as e:
        raise SuperposeError(f"{failure}: {short_error(e)}") from e
    yield from _texts(records, text_field, f"dataset '{name}'", failure)


def _texts(records: Iterator[dict[str, Any]], text_field: str, where: str, failure: str) -> Iterator[str]:
    """Pull the text field out of each record, turning library errors into one-line SuperposeErrors."""
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as e:
            raise SuperposeError(f"{failure}: {short_error(e)}") from e
        if text_field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise SuperposeError(f"{where} has no field '{text_field}' (fields: {fields}); set text_field")
        value = record[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise SuperposeError(f"{where}: field '{text_field}' holds {type(value).__name__}, not text")
        yield value


def short_error(error: Exception) -> str:
    """First line of an exception, capped, because library errors can be pages long."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
