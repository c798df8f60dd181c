"""`prepare`, the shard format and `open_dataset` validation (superpose.data.prepare, .shards)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from superpose.data.prepare import prepare
from superpose.data.shards import (
    VERIFIED_FILE,
    ShardWriter,
    TokenStream,
    open_dataset,
    token_dtype,
)
from superpose.data.tokenizer import EOS_TOKEN, train_tokenizer
from superpose.errors import SuperposeError
from superpose.files import file_sha256

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu über café 東京".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for i in range(n)]


def write_corpus(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    docs = make_docs(60)
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs", docs), docs


DATASET_KW = {"vocab_size": 320, "val_fraction": 0.1, "shard_tokens": 1000, "seed": 3, "progress": False}


@pytest.fixture(scope="module")
def dataset(corpus: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare([str(corpus[0])], tmp_path_factory.mktemp("ds") / "out", **DATASET_KW)


def dataset_files(folder: Path) -> list[str]:
    """The files a prepared dataset consists of: all but the cache of verified shards that opening it writes."""
    return sorted(p.name for p in folder.iterdir() if p.name != VERIFIED_FILE)


def assert_same_files(a: Path, b: Path) -> None:
    """Folders ``a`` and ``b`` hold the same dataset file names with the same bytes."""
    names = dataset_files(a)
    assert names == dataset_files(b)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture()
def dataset_copy(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


def split_docs(tokens: np.ndarray, tok, eos: int) -> list[str]:
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document must end with EOS"
    return [tok.decode(piece.tolist()) for piece in np.split(tokens, ends + 1)[:-1]]


# --- dtype and raw shard files ----------------------------------------------------------------------


def test_token_dtype_choice() -> None:
    assert token_dtype(256) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(200_000) == np.dtype("<u4")
    with pytest.raises(SuperposeError):
        token_dtype(0)


def test_shard_writer_rolls_over_and_stream_reads_across_boundaries(tmp_path: Path) -> None:
    data = np.arange(13, dtype=np.int64) + 60_000
    with ShardWriter(tmp_path, "train", np.dtype("<u2"), shard_tokens=5) as w:
        w.add(data[:3], 1, 10)
        w.add(data[3:7], 2, 20)
        w.add(data[7:], 1, 5)
        info = w.close()

    def sha(part: np.ndarray) -> str:  # each shard's checksum is of exactly its bytes, hashed while writing
        return hashlib.sha256(part.astype("<u2").tobytes()).hexdigest()

    assert info == {
        "tokens": 13,
        "documents": 4,
        "bytes": 35,
        "shards": [
            {"file": "train-00000.bin", "tokens": 5, "sha256": sha(data[:5])},
            {"file": "train-00001.bin", "tokens": 5, "sha256": sha(data[5:10])},
            {"file": "train-00002.bin", "tokens": 3, "sha256": sha(data[10:])},
        ],
    }
    assert all(file_sha256(tmp_path / s["file"]) == s["sha256"] for s in info["shards"])
    raw = b"".join((tmp_path / s["file"]).read_bytes() for s in info["shards"])
    assert raw == data.astype("<u2").tobytes()
    stream = TokenStream("train", tmp_path, [tmp_path / s["file"] for s in info["shards"]], [5, 5, 3], np.dtype("<u2"))
    assert len(stream) == 13
    for start in range(13):
        for length in range(13 - start + 1):
            got = stream.read(start, length)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, data[start : start + length])
    with pytest.raises(IndexError):
        stream.read(10, 4)


# --- prepare ------------------------------------------------------------------------------------------


def test_prepare_meta_and_shards_are_consistent(dataset: Path, corpus: tuple[Path, list[str]]) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["format"] == "superpose-tokens" and meta["version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 320
    assert meta["tokenizer"] == "tokenizer.json"
    assert meta["tokenizer_sha256"] == file_sha256(dataset / "tokenizer.json")
    assert meta["seed"] == 3 and meta["val_fraction"] == 0.1 and meta["source"] == [str(corpus[0])]
    assert [name for name in dataset_files(dataset) if not name.endswith(".bin")] == ["meta.json", "tokenizer.json"]
    assert meta["shuffled"] is True
    bins = sorted(p.name for p in dataset.glob("*.bin"))
    listed = sorted(s["file"] for split in meta["splits"].values() for s in split["shards"])
    assert bins == listed
    for split in meta["splits"].values():
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        assert all(s["tokens"] <= 1000 for s in split["shards"])
        for s in split["shards"]:
            assert (dataset / s["file"]).stat().st_size == 2 * s["tokens"]
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(corpus[1])
    assert not list(dataset.parent.glob(".*tmp*"))


def test_prepare_shards_hold_exactly_the_documents(dataset: Path, corpus: tuple[Path, list[str]]) -> None:
    ds = open_dataset(dataset)
    assert ds.tokenizer.token_to_id(EOS_TOKEN) == ds.eos_id
    train = split_docs(ds.split("train").read(0, len(ds.split("train"))), ds.tokenizer, ds.eos_id)
    val = split_docs(ds.split("val").read(0, len(ds.split("val"))), ds.tokenizer, ds.eos_id)
    docs = corpus[1]
    assert len(val) == ds.meta["splits"]["val"]["documents"] >= 1
    assert len(train) == ds.meta["splits"]["train"]["documents"]
    # together the splits are the corpus, each document once, in an order shuffled by the seed
    assert sorted(train + val) == sorted(docs)
    assert ds.meta["shuffled"] and train != [d for d in docs if d not in val]
    for name, split in (("train", train), ("val", val)):
        assert ds.meta["splits"][name]["bytes"] == sum(len(d.encode("utf-8")) for d in split)


def test_keep_order_keeps_the_reading_order_and_the_same_validation_documents(
    dataset: Path, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    kept = open_dataset(prepare([str(corpus[0])], tmp_path / "kept", vocab_size=320, val_fraction=0.1,
                                shard_tokens=1000, seed=3, keep_order=True, progress=False))
    shuffled = open_dataset(dataset)

    def docs_of(ds, split: str) -> list[str]:
        return split_docs(ds.split(split).read(0, len(ds.split(split))), ds.tokenizer, ds.eos_id)

    assert not kept.meta["shuffled"]
    assert docs_of(kept, "train") == [d for d in corpus[1] if d not in docs_of(kept, "val")]
    assert sorted(docs_of(kept, "val")) == sorted(docs_of(shuffled, "val"))


def test_prepare_reports_skipped_files_and_split_sizes(tmp_path: Path) -> None:
    src = write_corpus(tmp_path / "c", make_docs(6))
    (src / "latin.txt").write_bytes("caf\xe9 " .encode("latin-1") * 20)
    (src / "blob.bin").write_bytes(b"\x00\x01" * 10)
    lines: list[str] = []
    out = prepare([str(src)], tmp_path / "o", vocab_size=300, val_fraction=0.2, progress=False, say=lines.append)
    meta = open_dataset(out).meta["splits"]
    assert lines == [
        f"skipped 2 file(s): 1 binary, not text ({src / 'blob.bin'}); 1 not utf-8 text ({src / 'latin.txt'}); "
        "read them with --encoding, or --errors replace",
        f"train: {meta['train']['documents']:,} documents, {meta['train']['tokens']:,} tokens, {meta['train']['bytes']:,} bytes",
        f"val: {meta['val']['documents']:,} documents, {meta['val']['tokens']:,} tokens, {meta['val']['bytes']:,} bytes",
    ]
    assert meta["train"]["documents"] + meta["val"]["documents"] == 6
    lines.clear()
    out = prepare([str(src)], tmp_path / "o2", vocab_size=300, val_fraction=0.2, errors="replace", progress=False,
                  say=lines.append)
    assert lines[0] == f"skipped 1 file(s): 1 binary, not text ({src / 'blob.bin'})"
    meta = open_dataset(out).meta["splits"]
    assert meta["train"]["documents"] + meta["val"]["documents"] == 7  # the latin-1 file, with U+FFFD


def test_prepare_is_deterministic_and_seed_picks_validation(corpus: tuple[Path, list[str]], dataset: Path, tmp_path: Path) -> None:
    assert_same_files(prepare([str(corpus[0])], tmp_path / "again", **DATASET_KW), dataset)
    other = prepare([str(corpus[0])], tmp_path / "other", **{**DATASET_KW, "seed": 4})
    assert (other / "val-00000.bin").read_bytes() != (dataset / "val-00000.bin").read_bytes()


def test_min_val_documents_is_guaranteed(tmp_path: Path) -> None:
    src = write_corpus(tmp_path / "c", make_docs(6))
    out = prepare([str(src)], tmp_path / "o", vocab_size=300, val_fraction=0.001, min_val_documents=2, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 2
    assert meta["splits"]["train"]["documents"] == 4


def test_too_few_documents_fails_and_writes_nothing(tmp_path: Path) -> None:
    src = write_corpus(tmp_path / "c", make_docs(2))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SuperposeError, match="has 2 document.*too few for 2 validation"):
        prepare([str(src)], tmp_path / "o", vocab_size=300, min_val_documents=2, progress=False)
    assert sorted(tmp_path.iterdir()) == before


def test_missing_corpus_fails_and_writes_nothing(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    with pytest.raises(SuperposeError, match="corpus not found: .*missing.txt"):
        prepare([str(corpus[0]), str(tmp_path / "missing.txt")], tmp_path / "sub" / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given_tokenizer", [False, True])
def test_bad_record_mid_corpus_fails_and_writes_nothing(tmp_path: Path, given_tokenizer: bool) -> None:
    src = write_corpus(tmp_path / "c", make_docs(5))
    (src / "z.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n", encoding="utf-8")
    kwargs: dict = {"vocab_size": 300}
    if given_tokenizer:
        train_tokenizer(make_docs(5), 300).save(str(tmp_path / "tok.json"))
        kwargs = {"tokenizer": str(tmp_path / "tok.json")}
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SuperposeError, match=r"z\.jsonl has no field 'text' \(fields: body\)"):
        prepare([str(src)], tmp_path / "o", progress=False, **kwargs)
    assert sorted(tmp_path.rglob("*")) == before


def test_nonempty_output_folder_is_refused_and_untouched(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(SuperposeError, match=r"output folder .*o exists and is not empty"):
        prepare([str(corpus[0])], out, vocab_size=300, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_existing_empty_output_folder_is_used(tmp_path: Path, corpus: tuple[Path, list[str]], dataset: Path) -> None:
    """An empty folder is filled with the dataset a new folder would get, and nothing is written beside it."""
    out = tmp_path / "o"
    out.mkdir()
    assert prepare([str(corpus[0])], out, **DATASET_KW) == out
    assert_same_files(out, dataset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 100}, "vocab_size 100 is too small"),
        ({"val_fraction": 0.0}, "val_fraction must be between 0 and 1"),
        ({"val_fraction": 1.0}, "val_fraction must be between 0 and 1"),
        ({"min_val_documents": 0}, "min_val_documents must be at least 1"),
        ({"tokenizer": "./nope/tokenizer.json"}, "tokenizer not found"),
    ],
)
def test_bad_settings_fail_and_write_nothing(tmp_path: Path, corpus: tuple[Path, list[str]], kwargs: dict, message: str) -> None:
    with pytest.raises(SuperposeError, match=message):
        prepare([str(corpus[0])], tmp_path / "o", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_prepare_with_given_tokenizer_and_mixed_sources(tmp_path: Path, dataset: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(5, seed=9)), encoding="utf-8")
    txt = tmp_path / "b.txt"
    txt.write_text("a single text document", encoding="utf-8")
    out = prepare([str(jsonl), str(txt)], tmp_path / "o", tokenizer=str(dataset), val_fraction=0.5, progress=False)
    assert file_sha256(out / "tokenizer.json") == file_sha256(dataset / "tokenizer.json")
    ds = open_dataset(out, tokenizer=str(dataset / "tokenizer.json"))
    meta = ds.meta["splits"]
    assert meta["train"]["documents"] + meta["val"]["documents"] == 6
    assert ds.meta["source"] == [str(jsonl), str(txt)]


def test_prepare_embedded_with_max_bytes(tmp_path: Path) -> None:
    out = prepare(["embedded"], tmp_path / "o", vocab_size=400, max_bytes=200_000, progress=False)
    ds = open_dataset(out)
    text = ds.tokenizer.decode(ds.split("train").read(0, len(ds.split("train"))).tolist())
    assert "def " in text and "import " in text
    assert ds.meta["splits"]["train"]["documents"] >= 5
    assert ds.meta["max_bytes"] == 200_000


# --- open_dataset validation ----------------------------------------------------------------------


def test_open_dataset_accepts_a_good_folder(dataset: Path) -> None:
    ds = open_dataset(dataset, tokenizer=str(dataset))
    assert ds.path == dataset and ds.vocab_size == 320 and ds.eos_id == 0
    assert len(ds.split("train")) == ds.meta["splits"]["train"]["tokens"]
    with pytest.raises(SuperposeError, match="no split 'test'"):
        ds.split("test")


def test_open_dataset_detects_tampered_tokenizer(dataset_copy: Path) -> None:
    tok = dataset_copy / "tokenizer.json"
    tok.write_text(tok.read_text() + " ", encoding="utf-8")
    with pytest.raises(SuperposeError, match="tokenizer.json was modified"):
        open_dataset(dataset_copy)


def test_open_dataset_detects_truncated_shard(dataset_copy: Path) -> None:
    shard = dataset_copy / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(SuperposeError, match=r"train-00000\.bin has 1998 bytes but meta.json says 1000 tokens"):
        open_dataset(dataset_copy)


@pytest.mark.parametrize("damage", ["zeroed", "bit flip"])
def test_open_dataset_names_a_damaged_shard(dataset_copy: Path, damage: str) -> None:
    """Damage that keeps the size and every id in the vocabulary is caught by the sha256 recorded at writing."""
    shard = dataset_copy / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    if damage == "zeroed":
        raw[:] = bytes(len(raw))
    else:
        raw[7] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(SuperposeError, match=r"^shard .*train-00001\.bin is damaged: its sha256 differs from the one "
                                             r"meta.json recorded when it was written; prepare the dataset again$"):
        open_dataset(dataset_copy)
    assert len(open_dataset(dataset_copy, verify=False).split("train")) > 0  # opt-out: size checks only


def test_open_dataset_detects_missing_shard(dataset_copy: Path) -> None:
    (dataset_copy / "train-00001.bin").unlink()
    with pytest.raises(SuperposeError, match="missing shard train-00001.bin of split 'train'"):
        open_dataset(dataset_copy)


def test_open_dataset_detects_mismatching_tokenizer(dataset: Path, tmp_path: Path) -> None:
    other = train_tokenizer(make_docs(30, seed=1) + ["zzz yyy xxx www"] * 50, 320)
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SuperposeError, match=r"tokenizer .*tokenizer\.json does not match the shards in .*: \d+ of 320 token ids differ"):
        open_dataset(dataset, tokenizer=str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: (p / "meta.json").unlink(), "has no meta.json"),
        (lambda p: (p / "meta.json").write_text("{broken"), "meta.json is not valid JSON"),
        (lambda p: _edit_meta(p, format="other"), "format is not 'superpose-tokens'"),
        (lambda p: _edit_meta(p, version=2), "version 2 is not supported"),
        (lambda p: _edit_meta(p, dtype="int8"), "dtype 'int8'"),
        (lambda p: _edit_meta(p, vocab_size=999), "has 320 token ids but meta.json says 999"),
        (lambda p: _edit_meta(p, tokenizer="../x.json"), "not a plain file name"),
        (lambda p: _edit_shard(p, sha256="abc"), "malformed sha256"),
    ],
)
def test_open_dataset_rejects_bad_meta(dataset_copy: Path, edit, message: str) -> None:
    edit(dataset_copy)
    with pytest.raises(SuperposeError, match=message):
        open_dataset(dataset_copy)


def test_open_dataset_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SuperposeError, match="dataset not found"):
        open_dataset(tmp_path / "none")


def _edit_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def _edit_shard(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0].update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))
