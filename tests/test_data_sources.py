"""Corpus sources and tokenizers (superpose.data.corpus, superpose.data.tokenizer)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models

from superpose.data.corpus import Skipped, iter_documents, limit_bytes, resolve_source
from superpose.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, train_tokenizer
from superpose.errors import SuperposeError

WORDS = "the quick brown fox jumps over lazy dog river stone light shadow über naïve 東京 café".split()


def sample_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "\n" for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# --- corpus sources -----------------------------------------------------------------------------


def test_text_file_is_one_document(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    assert resolve_source(str(f)).kind == "text"
    assert list(iter_documents(str(f))) == ["héllo\nworld\n"]


def test_non_utf8_text_file_is_an_error_that_names_the_ways_out(tmp_path: Path) -> None:
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SuperposeError, match=r"latin.txt is not utf-8 text; pass --encoding, or --errors replace"):
        list(iter_documents(str(f)))
    assert list(iter_documents(str(f), encoding="latin-1")) == ["café"]
    assert list(iter_documents(str(f), errors="replace")) == ["caf\ufffd"]
    with pytest.raises(SuperposeError, match="unknown text encoding 'klingon'"):
        list(iter_documents(str(f), encoding="klingon"))
    with pytest.raises(SuperposeError, match="errors must be one of skip, replace, got 'ignore'"):
        list(iter_documents(str(f), errors="ignore"))


def test_folder_is_recursive_sorted_and_skips_binaries_and_hidden(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "z.md").write_text("zeta", encoding="utf-8")
    (root / "a.txt").write_text("alpha", encoding="utf-8")
    (root / "b" / "deep" / "c.rst").write_text("gamma", encoding="utf-8")
    (root / "b" / "noext").write_text("no extension but utf-8", encoding="utf-8")
    (root / "b" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (root / "b" / "latin.dat").write_bytes(b"caf\xe9")
    (root / ".git" / "HEAD").write_text("hidden", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    write_jsonl(root / "m.jsonl", [{"text": "from jsonl 1"}, {"text": "from jsonl 2"}])
    assert resolve_source(str(root)).kind == "folder"
    skipped = Skipped()
    docs = list(iter_documents(str(root), skipped=skipped))
    # sorted by relative path: a.txt, b/deep/c.rst, b/noext, empty.txt (skipped), m.jsonl, z.md
    assert docs == ["alpha", "gamma", "no extension but utf-8", "from jsonl 1", "from jsonl 2", "zeta"]
    # nothing is dropped without a word: the binary and the latin-1 file are recorded with their reasons
    assert skipped.files == {"binary, not text": [root / "b" / "image.png"], "not utf-8 text": [root / "b" / "latin.dat"]}
    assert skipped.summary() == (
        f"skipped 2 file(s): 1 binary, not text ({root / 'b' / 'image.png'}); 1 not utf-8 text ({root / 'b' / 'latin.dat'})")
    replaced = Skipped()
    docs = list(iter_documents(str(root), errors="replace", skipped=replaced))
    assert "caf\ufffd" in docs and list(replaced.files) == ["binary, not text"]


def test_jsonl_json_and_gz_records(tmp_path: Path) -> None:
    records = [{"text": "one", "id": 1}, {"text": None, "id": 2}, {"text": "three", "id": 3}]
    jsonl = tmp_path / "d.jsonl"
    write_jsonl(jsonl, records)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(records), encoding="utf-8")
    for path in (jsonl, gz, arr):
        assert resolve_source(str(path)).kind == "records"
        assert list(iter_documents(str(path))) == ["one", "three"], path


def test_custom_text_field_and_missing_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [{"content": "abc"}, {"content": "def"}])
    assert list(iter_documents(str(f), text_field="content")) == ["abc", "def"]
    with pytest.raises(SuperposeError, match=r"d\.jsonl has no field 'text' \(fields: content\); choose one with --text-field"):
        list(iter_documents(str(f)))


def test_parquet_records(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "n": [1, 2]}), f)
    assert list(iter_documents(str(f))) == ["first doc", "second doc"]
    with pytest.raises(SuperposeError, match=r"d\.parquet has no field 'body'"):
        list(iter_documents(str(f), text_field="body"))


def test_missing_corpus_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in (str(tmp_path / "nope"), "missing.txt", "data/missing.jsonl", "./local", "~/surely-not-here-xyz"):
        with pytest.raises(SuperposeError, match="corpus not found"):
            resolve_source(spec)
    # a mistyped folder inside an existing folder is a path, not a hub name: no hub look-up at all
    (tmp_path / "corpus_txt").mkdir()
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(SuperposeError, match=rf"^corpus not found: {tmp_path.name}/corpus_tx \(did you mean "
                                             rf"{tmp_path.name}/corpus_txt\?\)$"):
        resolve_source(f"{tmp_path.name}/corpus_tx")


def test_offline_hub_lookup_is_a_quiet_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A bare name is tried on the hub; offline, its failure is one line that also points at a near local name."""
    import logging

    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError("Couldn't reach 'corpus_tx' on the Hub (LocalEntryNotFoundError)")

    (tmp_path / "corpus_txt").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING), pytest.raises(SuperposeError) as info:
        list(iter_documents("corpus_tx"))
    assert str(info.value) == ("corpus not found: corpus_tx is no local file or folder (did you mean corpus_txt?), "
                               "and the hub is off (HF_HUB_OFFLINE) with no cached copy of it")
    assert "Retrying" not in caplog.text


def test_hub_names_are_recognised_without_network() -> None:
    for name in ("wikitext", "roneneldan/TinyStories", "HuggingFaceFW/fineweb-edu"):
        assert resolve_source(name).kind == "hub"


def test_hub_failure_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SuperposeError) as info:
        list(iter_documents("owner/name"))
    assert str(info.value) == (
        "could not load dataset 'owner/name' from the Hugging Face hub: "
        "Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)"
    )


def test_hub_call_passes_config_split_and_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(*args: object, **kwargs: object) -> list[dict]:
        calls.append((args, kwargs))
        return [{"body": "x"}, {"body": "y"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    docs = list(iter_documents("owner/name", text_field="body", hf_config="en", hf_split="validation"))
    assert docs == ["x", "y"]
    assert calls == [(("owner/name", "en"), {"split": "validation", "streaming": True})]


def test_limit_bytes_cuts_exactly() -> None:
    assert list(limit_bytes(["abc", "defg", "hi"], 5)) == ["abc", "de"]
    assert list(limit_bytes(["abc", "defg"], 100)) == ["abc", "defg"]
    # never splits a multi-byte character: "é" is 2 bytes
    assert list(limit_bytes(["aé"], 2)) == ["a"]


def test_embedded_corpus_offline_and_deterministic() -> None:
    docs = list(limit_bytes(iter_documents("embedded"), 400_000))
    assert len(docs) >= 10
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 400_000 - 4 <= total <= 400_000
    assert sum("def " in d or "import " in d for d in docs) >= len(docs) - 1
    assert docs == list(limit_bytes(iter_documents("embedded"), 400_000))


# --- tokenizers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    return train_tokenizer(sample_docs(200), 300)


def test_trained_tokenizer_roundtrips(small_tok: Tokenizer) -> None:
    assert small_tok.get_vocab_size() == 300
    assert eos_id(small_tok) == small_tok.token_to_id(EOS_TOKEN) == 0
    for text in ["the quick brown fox", "  leading spaces\tand tabs\n", "unseen: ÆØÅ ∑ 🙂 zebra", "<|endoftext|>x"]:
        ids = small_tok.encode(text, add_special_tokens=False).ids
        assert small_tok.decode(ids, skip_special_tokens=False) == text
    # merges were learned: a frequent word is a single token
    assert len(small_tok.encode("the").ids) == 1


def test_vocab_too_small_is_an_error() -> None:
    with pytest.raises(SuperposeError, match="vocab_size 256 is too small"):
        train_tokenizer(["abc"], 256)


def test_load_tokenizer_from_file_and_folder(tmp_path: Path, small_tok: Tokenizer) -> None:
    small_tok.save(str(tmp_path / "tokenizer.json"))
    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        tok = load_tokenizer(spec)
        assert tok.get_vocab() == small_tok.get_vocab()
        assert tok.encode("lazy dog café").ids == small_tok.encode("lazy dog café").ids


def test_load_tokenizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SuperposeError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(SuperposeError, match="could not read tokenizer file .*bad.json"):
        load_tokenizer(str(bad))

    import transformers

    def offline(spec: str) -> None:
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {spec}.\nmore")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(SuperposeError, match=r"^could not load tokenizer 'gpt2': We couldn't connect"):
        load_tokenizer("gpt2")


def test_eos_id_alternatives_and_missing() -> None:
    assert eos_id(Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))) == 1
    assert eos_id(Tokenizer(models.WordLevel({"a": 0, "<|end_of_text|>": 7}, unk_token="a"))) == 7
    with pytest.raises(SuperposeError, match="no end-of-text token"):
        eos_id(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
