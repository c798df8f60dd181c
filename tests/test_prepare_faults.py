"""A damaged prepare work folder (`.prepare-NAME`) heals to the shards of an undisturbed run, or is one line.

Every work file's SHA-256 is logged when the file is complete, every encoded chunk's (part's) in the index of
parts.bin, the one file all parts are appended to; a continuing run keeps only what matches. Case count (hypothesis
max_examples): damaged work files 60.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_prepare_parallel import KW, make_docs, same_folders

import superpose.data.prepare as prep
from superpose.data.prepare import prepare
from superpose.data.tokenizer import train_tokenizer
from superpose.errors import SuperposeError
from superpose.files import ChecksumLog, file_sha256

SMALL_UNITS = {"CHUNK_BYTES": 1500, "SHUFFLE_BLOCK": 25}  # many parts from a tiny corpus


class Interrupt(KeyboardInterrupt):
    """Stands for a kill after the last part is encoded: the work folder is complete but for the shards."""


def interrupted(*args: object) -> None:
    raise Interrupt


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A corpus, the output of one undisturbed prepare, and pristine copies of work folders killed after the read
    ("read") and after the last part ("parts")."""
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60, seed=2)), encoding="utf-8")
    built = {"corpus": str(corpus)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SMALL_UNITS.items():
            patch.setattr(prep, name, value)
        built["reference"] = prepare([str(corpus)], root / "ref", **KW)
        for stage, step in (("read", "_encode"), ("parts", "_assemble")):
            with pytest.MonkeyPatch.context() as kill:
                kill.setattr(prep, step, interrupted)
                with pytest.raises(Interrupt):
                    prepare([str(corpus)], root / "out", **KW)
            built[stage] = root / stage
            (root / ".prepare-out").rename(built[stage])
    assert len(prep._Parts(built["parts"]).spans) > 4 and not (built["read"] / prep.PARTS_FILE).exists()
    return built


@pytest.fixture()
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SMALL_UNITS.items():
        monkeypatch.setattr(prep, name, value)


def damaged(built: dict, tmp_path: Path, name: str, edit, stage: str = "parts") -> Path:
    """A copy of a pristine work folder as `.prepare-out` under tmp_path, with file `name` replaced by edit(bytes);
    `name` "part N" edits chunk N's part inside parts.bin (in place: a part of another length moves those after
    it)."""
    work = tmp_path / ".prepare-out"
    for leftover in (work, tmp_path / "out"):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(built[stage], work)
    if name.startswith("part "):
        _, offset, length = prep._Parts(work).spans[int(name.split()[1])]
        name, edit = prep.PARTS_FILE, lambda blob, part=edit: (blob[:offset] + part(blob[offset:offset + length])
                                                               + blob[offset + length:])
    path = work / name
    path.write_bytes(edit(path.read_bytes()))
    return work


def continue_run(built: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    said: list[str] = []
    out = prepare([built["corpus"]], tmp_path / "out", **{**KW, "say": said.append})
    return out, said


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def change_one_id(blob: bytes) -> bytes:
    """The part as a valid npz, its first training id changed (an edit that parses)."""
    with np.load(io.BytesIO(blob)) as part:
        arrays = {key: part[key] for key in part.files}
    arrays["train"][0] = (int(arrays["train"][0]) + 1) % 300
    return npz(**arrays)


def pickled_part(blob: bytes) -> bytes:
    return npz(train=np.array([object()], dtype=object), val=np.zeros(0, np.uint16),
               train_counts=np.array([1, 1]), val_counts=np.array([0, 0]))


def half(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def index_lines(edit):
    """An edit of parts.index, line by line (the trailing empty string kept)."""
    return lambda blob: "\n".join(edit(blob.decode().split("\n"))).encode()


def relabel_chunk_2_as_3(lines: list[str]) -> list[str]:
    """Chunk 2's line, appended again as chunk 3's: the checksum covers the chunk's number, so 3 is made again."""
    sha256, _, offset, length = next(line for line in lines if line.split(" ")[1:2] == ["2"]).split(" ")
    return [*lines[:-1], f"{sha256} 3 {offset} {length}", ""]


@pytest.mark.parametrize(("name", "edit", "note"), [
    ("documents.cache", lambda blob: blob.replace(b"doc 7:", b"doc 8:"), None),  # before encoding: read again
    ("part 2", change_one_id, "made again 1 part(s) that did not match their checksums in "),
    ("part 0", pickled_part, "parts.bin: chunk 0, 1, 2, ..."),  # parts after a longer one have moved
    ("part 1", lambda blob: b"", "parts.bin: chunk 1, 2, 3, ..."),
    ("part 3", half, "parts.bin: chunk 3, 4, 5, ..."),
    ("parts.bin", half, "made again "),
    ("parts.bin", lambda blob: blob + b"PK\x03\x04 a part cut by a kill", None),
    ("parts.index", lambda blob: blob + b"0123abc", None),  # a line cut by a kill
    ("parts.index", index_lines(lambda lines: [line for line in lines if line.split(" ")[1:2] != ["2"]]), None),
    ("parts.index", index_lines(relabel_chunk_2_as_3), "parts.bin: chunk 3\n"),
    ("parts.index", lambda blob: b"", None),
    ("documents.cache", half, None),
    ("documents.offsets", half, None),
    ("documents.offsets", lambda blob: b"\xff" * len(blob), None),
    ("read.json", lambda blob: b"[", None),
    ("arguments.json", lambda blob: b"{not json", "arguments.json does not match its checksum"),
    ("arguments.json", lambda blob: b"42", "starting it over"),
    ("checksums.sha256", lambda blob: b"", None),
])
def test_damaged_work_file_is_made_again_to_identical_shards(built: dict, tmp_path: Path, small_units: None,
                                                             name: str, edit, note: str | None) -> None:
    damaged(built, tmp_path, name, edit, "parts" if name.startswith("part") else "read")
    out, said = continue_run(built, tmp_path)
    assert same_folders(out, built["reference"])
    assert not (tmp_path / ".prepare-out").exists()
    if note is not None:
        assert any(note in line + "\n" for line in said), said


def test_swapped_tokenizer_is_not_mixed_in(built: dict, tmp_path: Path, small_units: None) -> None:
    other = train_tokenizer(make_docs(30, seed=9), 300).to_str().encode()
    damaged(built, tmp_path, "tokenizer.json", lambda blob: other, "read")
    out, _ = continue_run(built, tmp_path)
    assert same_folders(out, built["reference"])


def test_an_intact_work_folder_is_continued_without_reading_or_encoding_again(
        built: dict, tmp_path: Path, small_units: None, monkeypatch: pytest.MonkeyPatch) -> None:
    damaged(built, tmp_path, "read.json", lambda blob: blob)
    monkeypatch.setattr(prep, "train_tokenizer", None)
    monkeypatch.setattr(prep._Encoder, "__call__", None)
    out, _ = continue_run(built, tmp_path)
    assert same_folders(out, built["reference"])


def out_of_vocabulary(blob: bytes) -> bytes:
    with np.load(io.BytesIO(blob)) as part:
        arrays = {key: part[key] for key in part.files}
    arrays["train"][0] = 60000  # fits the uint16 of a vocabulary of 300
    return npz(**arrays)


@pytest.mark.parametrize(("forge", "message"), [
    (out_of_vocabulary, r"^chunk 2 of .*parts\.bin holds token id 60000, outside the vocabulary of 300: delete "),
    (pickled_part, r"^chunk 2 of .*parts\.bin is not a part prepare wrote \(Object arrays cannot be loaded when "
                   r"allow_pickle=False\): delete .*\.prepare-out to start over$"),
])
def test_a_forged_part_with_a_matching_checksum_is_one_line(built: dict, tmp_path: Path, small_units: None,
                                                           forge, message: str) -> None:
    """Checksums stop damage, not a forged index: assembling still checks every id against the vocabulary and never
    loads a pickle."""
    work = damaged(built, tmp_path, "read.json", lambda blob: blob)
    parts = prep._Parts(work)
    part = forge(parts.read(2))
    parts.add(2, part, prep._part_sha256(2, part))
    with pytest.raises(SuperposeError, match=message) as error:
        continue_run(built, tmp_path)
    assert "\n" not in str(error.value) and work.is_dir() and not (tmp_path / "out").exists()


byte_edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 9), st.just(0)),
    st.tuples(st.just("empty"), st.just(0), st.just(0)),
)


def apply(edit: tuple[str, int, int], blob: bytes) -> bytes:
    kind, at, value = edit
    if kind == "append":
        return blob + bytes(at)
    if kind == "empty" or not blob:
        return b""
    if kind == "flip":
        i = at % len(blob)
        return blob[:i] + bytes([blob[i] ^ value]) + blob[i + 1:]
    return blob[: at % len(blob)]


WORK_FILES = ["arguments.json", "checksums.sha256", "documents.cache", "documents.offsets", "read.json",
              "tokenizer.json", ".lock", "parts.bin", "parts.index", "part 0", "part 4"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from(["read", "parts"]), name=st.sampled_from(WORK_FILES),
       edits=st.lists(byte_edits, min_size=1, max_size=2))
def test_any_damaged_work_file_heals_to_identical_shards(built: dict, tmp_path: Path, small_units: None,
                                                          stage: str, name: str, edits: list) -> None:
    """Any byte flip, truncation, append or emptying of any work file: the same command gives the shards of an
    undisturbed run (a one-line error would be allowed, if a second run then heals; none is needed today)."""

    def edit(blob: bytes) -> bytes:
        for e in edits:
            blob = apply(e, blob)
        return blob

    if stage == "read" and name.startswith("part"):
        name = "documents.cache"
    damaged(built, tmp_path, name, edit, stage)
    try:
        out, _ = continue_run(built, tmp_path)
    except SuperposeError as error:
        assert "\n" not in str(error)
        out, _ = continue_run(built, tmp_path)
    assert same_folders(out, built["reference"])


def test_checksum_log_survives_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    log = ChecksumLog(tmp_path)
    log.record("a")
    with open(log.path, "ab") as f:
        f.write(file_sha256(tmp_path / "b")[:20].encode())  # killed mid-line
    ChecksumLog(tmp_path).record("b")
    again = ChecksumLog(tmp_path)
    assert again.verified("a") and again.verified("b") and len(again.sums) == 2
    (tmp_path / "a").write_text("A")
    assert not again.verified("a")


def test_null_id_in_a_parquet_column_is_one_line_and_leaves_no_work_folder(tmp_path: Path) -> None:
    tok = train_tokenizer(make_docs(20), 300)
    tok.save(str(tmp_path / "tok.json"))
    path = tmp_path / "ids.parquet"
    rows = [[1, 2, 3]] * 1030 + [[4, None, 6]]
    pq.write_table(pa.table({"ids": pa.array(rows, pa.list_(pa.int64()))}), path, row_group_size=500)
    with pytest.raises(SuperposeError, match=rf"^column 'ids' of {path}: row 1030 holds a missing \(null\) token "
                                             r"id$"):
        prepare([str(path)], tmp_path / "o", tokenizer=str(tmp_path / "tok.json"), ids_column="ids", **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.parquet", "tok.json"]


def test_a_work_folder_of_the_old_layout_leaves_nothing_in_the_output(tmp_path, monkeypatch):
    """A folder killed under the one-file-per-chunk layout (parts/NNNNNN.npz) is continued with parts.bin: its old
    parts are not read, and none of them ends up in the finished dataset."""
    import superpose.data.prepare as prepare_module

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"document {i} " * 200)
    args = dict(vocab_size=300, progress=False, say=lambda line: None)

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands in for a kill after the read, before any chunk is encoded

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "_encode", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare([str(corpus)], tmp_path / "data", **args)
    work = tmp_path / ".prepare-data"
    assert (work / "arguments.json").is_file()
    (work / "parts").mkdir()
    (work / "parts" / "000000.npz").write_bytes(b"stale")
    out = prepare([str(corpus)], tmp_path / "data", **args)
    assert [p.name for p in out.iterdir() if p.is_dir()] == []
