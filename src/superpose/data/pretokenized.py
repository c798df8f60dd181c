"""Pre-tokenized corpora: token ids users already have, copied into shards without decoding.

Three shapes: a column of id lists (one row, one document) in a `datasets` folder saved with ``save_to_disk``, a
parquet file or a hub dataset; or a flat ``.npy``/``.bin`` array of ids, split into documents at EOS. Every id is
checked against the tokenizer's vocabulary as it is read, so ids made by another tokenizer are a one-line error naming
the file and the id, not a shard that fails deep inside training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from superpose.data.corpus import hub_failure, open_hub_records, resolve_source
from superpose.data.shards import token_dtype
from superpose.errors import SuperposeError
from superpose.files import first_line

FLAT_SUFFIXES = (".npy", ".bin")
_DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_FLAT_CHUNK = 1 << 24  # tokens of a flat file split at EOS per step, so a file of any size streams
_ROW_BATCH = 1024


def is_flat_ids(source: str) -> bool:
    """A ``.npy``/``.bin`` source holds token ids, never text."""
    return Path(source).suffix.lower() in FLAT_SUFFIXES


def check_ids_source(source: str, ids_column: str | None) -> None:
    """Refuse, before anything is read, a source that cannot hold token ids in the way it is named."""
    if is_flat_ids(source):
        if not Path(source).expanduser().is_file():
            raise SuperposeError(f"corpus not found: {source}")
        return
    src = resolve_source(source)
    if ids_column is None:
        raise SuperposeError(f"corpus {source} is not a .npy/.bin file of token ids: name its ids column with "
                             f"--ids-column")
    if src.kind == "folder" and not any((src.path / m).is_file() for m in _DATASETS_MARKERS):
        raise SuperposeError(f"corpus folder {source} is not a datasets folder saved with save_to_disk "
                             f"(no {' or '.join(_DATASETS_MARKERS)}): pre-tokenized folders must be one")
    if src.kind in ("text", "embedded") or (src.kind == "records" and not src.path.name.endswith(".parquet")):
        raise SuperposeError(f"corpus {source} cannot hold a column of token ids: use parquet, a datasets folder, "
                             f"a hub dataset, or a .npy/.bin file")


def iter_id_documents(source: str, *, ids_column: str | None, vocab_size: int, eos: int, hf_config: str | None = None,
                      hf_split: str = "train") -> Iterator[np.ndarray]:
    """Yield each non-empty document of a pre-tokenized source as uint32 ids, without its trailing EOS."""
    check_ids_source(source, ids_column)
    path = Path(source).expanduser()
    if is_flat_ids(source):
        yield from _split_at_eos(_flat_array(path, vocab_size), eos, vocab_size, f"corpus file {path}")
        return
    kind = resolve_source(source).kind
    if kind == "folder":
        rows = _datasets_folder_rows(path, ids_column, hf_split)
    elif kind == "records":
        rows = _parquet_rows(path, ids_column)
    else:
        rows = _hub_rows(source, ids_column, hf_config, hf_split)
    where = f"corpus {'file ' + str(path) if kind != 'hub' else source}"
    for row, ids in enumerate(rows):
        _check_ids(ids, vocab_size, lambda i: f"{where}: row {row} holds token id {int(ids[i])}")
        if len(ids) and ids[-1] == eos:
            ids = ids[:-1]
        if len(ids):
            yield ids.astype(np.uint32, copy=False)


def _check_ids(ids: np.ndarray, vocab_size: int, where: Any) -> None:
    """One line naming the first id outside [0, vocab_size); ``where(i)`` says where token i is."""
    if len(ids) and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        i = int(np.argmax((ids >= vocab_size) | (ids < 0)))
        raise SuperposeError(f"{where(i)}, outside the vocabulary of {vocab_size} of the tokenizer: were these ids "
                             f"made by another tokenizer?")


def _flat_array(path: Path, vocab_size: int) -> np.ndarray:
    """The file's ids memory-mapped: ``.npy`` says its dtype, ``.bin`` has the shards' dtype for this vocabulary."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r")
        else:
            dtype = token_dtype(vocab_size)
            if path.stat().st_size % dtype.itemsize:
                raise SuperposeError(f"corpus file {path} has {path.stat().st_size} bytes, not a whole number of "
                                     f"{dtype.name} ids (a .bin file holds {dtype.name} ids for this vocabulary; use "
                                     f".npy for another dtype)")
            array = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    except (OSError, ValueError) as e:
        raise SuperposeError(f"could not read corpus file {path}: {first_line(e)}") from e
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise SuperposeError(f"corpus file {path} holds a {array.ndim}-d {array.dtype} array, not a flat array of "
                             f"integer token ids")
    return array


def _split_at_eos(array: np.ndarray, eos: int, vocab_size: int, where: str) -> Iterator[np.ndarray]:
    """Documents of a flat id array, read _FLAT_CHUNK tokens at a time; a tail without EOS is the last document."""
    carry = np.zeros(0, np.uint32)
    for start in range(0, len(array), _FLAT_CHUNK):
        chunk = np.asarray(array[start : start + _FLAT_CHUNK])
        _check_ids(chunk, vocab_size, lambda i: f"{where}: token {start + i} has id {int(chunk[i])}")
        chunk = np.concatenate([carry, chunk.astype(np.uint32)])
        ends = np.flatnonzero(chunk == eos)
        begin = 0
        for end in ends.tolist():
            if end > begin:
                yield chunk[begin:end]
            begin = end + 1
        carry = chunk[begin:]
    if len(carry):
        yield carry


def _column_rows(column: Any, where: str, first_row: int) -> Iterator[np.ndarray]:
    """Rows of an Arrow list-of-integers column as numpy arrays, read through the flat values (no per-id Python);
    `first_row` is the column's first row in the file, for naming a row with a missing (null) id."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        kind = chunk.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
            raise SuperposeError(f"{where} holds {kind}, not lists of integer token ids")
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        missing = chunk.values.is_null().to_numpy(zero_copy_only=False) if chunk.values.null_count else None
        for i in range(len(chunk)):
            if not valid[i]:
                continue
            if missing is not None and missing[offsets[i] : offsets[i + 1]].any():
                raise SuperposeError(f"{where}: row {first_row + i} holds a missing (null) token id")
            yield values[offsets[i] : offsets[i + 1]]
        first_row += len(chunk)


def _datasets_folder_rows(path: Path, column: str, split: str) -> Iterator[np.ndarray]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SuperposeError(f"could not read datasets folder {path}: {first_line(e)}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SuperposeError(f"datasets folder {path} has no split '{split}' (splits: {', '.join(ds)}); choose one "
                                 f"with --hf-split")
        ds = ds[split]
    where = f"column '{column}' of {path}"
    if column not in ds.column_names:
        raise SuperposeError(f"datasets folder {path} has no column '{column}' (columns: {', '.join(ds.column_names)});"
                             f" choose one with --ids-column")
    row = 0
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=_ROW_BATCH):
        yield from _column_rows(table[column], where, row)
        row += table.num_rows


def _parquet_rows(path: Path, column: str) -> Iterator[np.ndarray]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:
        raise SuperposeError(f"could not read corpus file {path}: {first_line(e)}") from e
    names = reader.schema_arrow.names
    if column not in names:
        raise SuperposeError(f"corpus file {path} has no column '{column}' (columns: {', '.join(names)}); choose one "
                             f"with --ids-column")
    row = 0
    for batch in reader.iter_batches(batch_size=_ROW_BATCH, columns=[column]):  # batches may be shorter
        yield from _column_rows(batch.column(0), f"column '{column}' of {path}", row)
        row += batch.num_rows


def _hub_rows(name: str, column: str, config: str | None, split: str) -> Iterator[np.ndarray]:
    records = open_hub_records(name, config, split)
    try:
        for record in records:
            if column not in record:
                raise SuperposeError(f"dataset '{name}' has no column '{column}' (columns: {', '.join(sorted(record))});"
                                     f" choose one with --ids-column")
            if record[column] is not None:
                yield np.asarray(record[column], dtype=np.int64)
    except SuperposeError:
        raise
    except Exception as e:
        raise SuperposeError(f"{hub_failure(name)}: {first_line(e)}") from e
