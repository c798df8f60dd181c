"""Pre-tokenized inputs: ids in parquet, a `datasets` folder or flat .npy/.bin files become the same shards."""

from __future__ import annotations

import filecmp
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from superpose.data.prepare import prepare
from superpose.data.shards import open_dataset
from superpose.data.tokenizer import eos_id, train_tokenizer
from superpose.errors import SuperposeError

WORDS = "the quick brown fox jumps over lazy dog river stone light shadow über naïve 東京 café".split()
KW = {"val_fraction": 0.2, "shard_tokens": 400, "progress": False, "say": lambda line: None}


def sample_docs(n: int) -> list[str]:
    rng = random.Random(3)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Documents, their ids under a small BPE, and the shards made from the text itself."""
    root = tmp_path_factory.mktemp("pretok")
    docs = sample_docs(30)
    tok = train_tokenizer(docs, 300)
    tok.save(str(root / "tok.json"))
    ids = [enc.ids for enc in tok.encode_batch(docs, add_special_tokens=False)]
    text = root / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    reference = prepare([str(text)], root / "from-text", tokenizer=str(root / "tok.json"), **KW)
    return {"root": root, "docs": docs, "ids": ids, "eos": eos_id(tok), "tok": str(root / "tok.json"),
            "reference": reference}


def same_shards(a: Path, b: Path) -> bool:
    """Every shard and the tokenizer byte for byte; meta.json too, except the text byte counts and the sources."""
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".bin") + ["tokenizer.json"]
    meta_a, meta_b = (json.loads((f / "meta.json").read_text()) for f in (a, b))
    for meta in (meta_a, meta_b):
        meta.pop("source")
        for split in meta["splits"].values():
            split.pop("bytes")
    return names == sorted(p.name for p in b.iterdir() if p.suffix == ".bin") + ["tokenizer.json"] and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names) and meta_a == meta_b


def test_parquet_ids_column_gives_the_shards_of_the_text(corpus: dict, tmp_path: Path) -> None:
    # one row already ends with EOS, as many tokenized datasets do: it is not doubled
    rows = [ids + [corpus["eos"]] if i == 4 else ids for i, ids in enumerate(corpus["ids"])]
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": rows, "n": list(range(len(rows)))}), path, row_group_size=7)
    out = prepare([str(path)], tmp_path / "o", tokenizer=corpus["tok"], ids_column="input_ids", **KW)
    assert same_shards(out, corpus["reference"])
    meta = open_dataset(out).meta
    assert meta["splits"]["train"]["bytes"] is None and meta["source"] == [str(path)]


def test_hub_ids_column_gives_the_shards_of_the_text(corpus: dict, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub dataset's ids column is read like a local one; an unreachable hub is the corpus reader's one line."""
    calls = []

    def hub(*args: object, **kwargs: object) -> list[dict]:
        calls.append((args, kwargs))
        return [{"input_ids": ids, "n": i} for i, ids in enumerate(corpus["ids"])]

    monkeypatch.setattr(datasets, "load_dataset", hub)
    out = prepare(["owner/ids"], tmp_path / "o", tokenizer=corpus["tok"], ids_column="input_ids", **KW)
    assert same_shards(out, corpus["reference"])
    assert calls[0] == (("owner/ids", None), {"split": "train", "streaming": True})

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'owner/ids' on the Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SuperposeError, match=r"^corpus not found: owner/ids is no local file or folder, and the hub "
                                             r"is off \(HF_HUB_OFFLINE\) with no cached copy of it$"):
        prepare(["owner/ids"], tmp_path / "off", tokenizer=corpus["tok"], ids_column="input_ids", **KW)


@pytest.mark.parametrize("as_dict", [False, True])
def test_datasets_folder_gives_the_shards_of_the_text(corpus: dict, tmp_path: Path, as_dict: bool) -> None:
    ds = datasets.Dataset.from_dict({"input_ids": corpus["ids"], "text": corpus["docs"]})
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(tmp_path / "saved"))
    out = prepare([str(tmp_path / "saved")], tmp_path / "o", tokenizer=corpus["tok"], ids_column="input_ids", **KW)
    assert same_shards(out, corpus["reference"])


@pytest.mark.parametrize(("suffix", "dtype"), [(".npy", np.int64), (".bin", np.uint16)])
def test_flat_id_files_split_at_eos_give_the_shards_of_the_text(corpus: dict, tmp_path: Path, suffix: str,
                                                                 dtype: type) -> None:
    eos = corpus["eos"]
    flat = [eos, eos]  # empty documents are dropped, as empty text documents are; the last one has no EOS
    for ids in corpus["ids"]:
        flat += ids + [eos]
    array = np.array(flat[:-1], dtype=dtype)
    path = tmp_path / f"ids{suffix}"
    np.save(path, array) if suffix == ".npy" else array.astype("<u2").tofile(path)
    out = prepare([str(path)], tmp_path / "o", tokenizer=corpus["tok"], **KW)
    assert same_shards(out, corpus["reference"])


def test_an_id_outside_the_vocabulary_names_the_file_and_the_id(corpus: dict, tmp_path: Path) -> None:
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5000, 6]]}), path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SuperposeError, match=rf"^corpus file {path}: row 1 holds token id 5000, outside the "
                                             r"vocabulary of 300 of the tokenizer"):
        prepare([str(path)], tmp_path / "o", tokenizer=corpus["tok"], ids_column="input_ids", **KW)
    np.save(tmp_path / "ids.npy", np.array([1, 2, 0, 7, -1]))
    with pytest.raises(SuperposeError, match=r"ids\.npy: token 4 has id -1, outside the vocabulary of 300"):
        prepare([str(tmp_path / "ids.npy")], tmp_path / "o", tokenizer=corpus["tok"], **KW)
    assert sorted(tmp_path.rglob("*")) == sorted(before + [tmp_path / "ids.npy"])


def test_bad_pre_tokenized_inputs_are_one_line_errors(corpus: dict, tmp_path: Path) -> None:
    parquet = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2]], "text": ["a b"]}), parquet)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    tok = corpus["tok"]
    cases = [
        (dict(sources=[str(parquet)], ids_column="input_ids"), r"^pre-tokenized input needs --tokenizer"),
        (dict(sources=[str(parquet)], ids_column="ids", tokenizer=tok), r"has no column 'ids' \(columns: input_ids, "
                                                                        r"text\); choose one with --ids-column$"),
        (dict(sources=[str(parquet)], ids_column="text", tokenizer=tok), r"column 'text' of .* holds string, not "
                                                                         r"lists of integer token ids$"),
        (dict(sources=[str(tmp_path / "a.txt")], ids_column="input_ids", tokenizer=tok), r"cannot hold a column"),
        (dict(sources=[str(tmp_path)], ids_column="input_ids", tokenizer=tok), r"is not a datasets folder"),
        (dict(sources=[str(tmp_path / "odd.bin")], tokenizer=tok), r"odd\.bin has 3 bytes, not a whole number of "
                                                                   r"uint16 ids"),
        (dict(sources=[str(tmp_path / "odd.bin"), str(tmp_path / "a.txt")], tokenizer=tok),
         r"a\.txt is not a \.npy/\.bin file of token ids: name its ids column with --ids-column$"),
        (dict(sources=[str(parquet)], ids_column="input_ids", tokenizer=tok, max_bytes=10), r"does not apply"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for kwargs, message in cases:
        sources = kwargs.pop("sources")
        with pytest.raises(SuperposeError, match=message):
            prepare(sources, tmp_path / "o", **kwargs, **KW)
        assert sorted(tmp_path.rglob("*")) == before


def test_cli_reads_an_ids_column(corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from superpose.cli import main

    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": corpus["ids"]}), path)
    argv = ["prepare", str(path), "--ids-column", "input_ids", "--tokenizer", corpus["tok"], "--val-fraction", "0.2",
            "--quiet", "--workers", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "pre-tokenized" in capsys.readouterr().out
    # the CLI writes one shard per split (no --shard-tokens), the reference several: the token streams are compared
    got, want = open_dataset(tmp_path / "o"), open_dataset(corpus["reference"])
    assert got.tokenizer.to_str() == want.tokenizer.to_str()
    for name in ("train", "val"):
        ours, theirs = got.split(name), want.split(name)
        assert np.array_equal(ours.read(0, len(ours)), theirs.read(0, len(theirs))), name
        assert got.meta["splits"][name]["documents"] == want.meta["splits"][name]["documents"]
