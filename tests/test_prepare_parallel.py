"""`prepare --workers N`: identical output for any N, a bounded (block) shuffle, and resuming a killed run."""

from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import superpose.data.prepare as prep
from superpose.data.prepare import prepare
from superpose.data.shards import open_dataset
from superpose.errors import SuperposeError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu über café 東京".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for i in range(n)]


@pytest.fixture()
def sources(tmp_path: Path) -> list[str]:
    """Two sources of one call: a folder of text files and a jsonl file."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(make_docs(40)):
        (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(30, seed=1)), encoding="utf-8")
    return [str(folder), str(jsonl)]


@pytest.fixture()
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks and several shuffle blocks, so a tiny corpus exercises what a large one does."""
    monkeypatch.setattr(prep, "CHUNK_BYTES", 1500)
    monkeypatch.setattr(prep, "SHUFFLE_BLOCK", 25)


def same_folders(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def documents(folder: Path, split: str) -> list[str]:
    ds = open_dataset(folder)
    tokens = ds.split(split).read(0, len(ds.split(split)))
    ends = np.flatnonzero(tokens == ds.eos_id)
    return [ds.tokenizer.decode(piece.tolist()) for piece in np.split(tokens, ends + 1)[:-1]]


KW = {"vocab_size": 300, "val_fraction": 0.1, "shard_tokens": 700, "progress": False, "say": lambda line: None}


def test_one_and_two_workers_write_identical_folders(tmp_path: Path, sources: list[str], small_units: None) -> None:
    one = prepare(sources, tmp_path / "one", workers=1, **KW)
    two = prepare(sources, tmp_path / "two", workers=2, **KW)
    assert len(list(one.glob("train-*.bin"))) > 1
    assert same_folders(one, two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more.jsonl", "one", "texts", "two"]


def test_documents_are_shuffled_within_blocks_of_the_reading_order(tmp_path: Path, sources: list[str],
                                                                   small_units: None) -> None:
    kept = prepare(sources, tmp_path / "kept", keep_order=True, **KW)
    mixed = prepare(sources, tmp_path / "mixed", **KW)
    reading = documents(kept, "train") + documents(kept, "val")
    shuffled = documents(mixed, "train")
    assert sorted(shuffled + documents(mixed, "val")) == sorted(reading)
    assert shuffled != documents(kept, "train")
    # 70 documents in blocks of 25: the training documents of block b all come before those of block b + 1
    block_of = {doc: i // prep.SHUFFLE_BLOCK for i, doc in enumerate(d for d in make_docs(40) + make_docs(30, seed=1))}
    blocks = [block_of[d] for d in shuffled]
    assert blocks == sorted(blocks) and len(set(blocks)) == 3


@pytest.mark.parametrize(("n", "fraction", "min_val", "seed"),
                         [(1000, 0.05, 1, 0), (50, 0.001, 3, 7), (3, 0.9, 1, 2), (2, 0.99, 1, 5), (40, 0.5, 2, 1)])
def test_streamed_holdout_equals_one_draw_over_all_documents(monkeypatch: pytest.MonkeyPatch, n: int,
                                                             fraction: float, min_val: int, seed: int) -> None:
    monkeypatch.setattr(prep, "_SCORE_BLOCK", 7)
    scores = np.random.default_rng(seed).random(n)
    want = scores < fraction
    if want.sum() < min_val:
        want[np.argsort(scores, kind="stable")[:min_val]] = True
    if want.all():
        want[np.argmax(scores)] = False
    holdout = prep._Holdout(n, fraction, min_val, seed, ["c"])
    got = np.concatenate([holdout.mask(a, min(n, a + 6)) for a in range(0, n, 6)])
    assert np.array_equal(got, want) and 0 < got.sum() < n


class Interrupt(KeyboardInterrupt):
    """Stands for a kill: anything but a SuperposeError leaves the work folder to resume from."""


def test_interrupted_encoding_resumes_without_redoing_finished_chunks(tmp_path: Path, sources: list[str],
                                                                      small_units: None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reference = prepare(sources, tmp_path / "ref", **KW)
    encode, calls = prep._Encoder.__call__, []

    def dies_after_three(self: prep._Encoder, chunk: prep._Chunk) -> tuple[bytes, str]:
        if len(calls) == 3:
            raise Interrupt
        calls.append(chunk.index)
        return encode(self, chunk)

    monkeypatch.setattr(prep._Encoder, "__call__", dies_after_three)
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        prepare(sources, out, **KW)
    work = tmp_path / ".prepare-out"
    assert not out.exists() and sorted(prep._Parts(work).spans) == calls == [0, 1, 2]

    with pytest.raises(SuperposeError, match=r"^.*\.prepare-out holds an unfinished prepare of .*out with other "
                                             r"arguments \(seed: 0 then, 1 now\): re-run it as before"):
        prepare(sources, out, **{**KW, "seed": 1})
    assert sorted(prep._Parts(work).spans) == [0, 1, 2]

    seen: list[int] = []
    monkeypatch.setattr(prep._Encoder, "__call__", lambda self, chunk: (seen.append(chunk.index), encode(self, chunk))[1])
    prepare(sources, out, **KW)
    assert not set(seen) & set(calls) and seen
    assert same_folders(out, reference) and not work.exists()


@pytest.mark.parametrize(("chunk_bytes", "workers"), [(1500, 2), (400, 1), (10**6, 1)])
def test_the_work_folder_holds_the_same_files_for_any_number_of_chunks(tmp_path: Path, sources: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       chunk_bytes: int, workers: int) -> None:
    """Killed when every chunk is encoded: the parts are two files (parts.bin and its index), not one a chunk, so a
    terabyte does not put a quarter of a million files in one folder."""

    def killed(*args: object) -> None:
        raise Interrupt

    monkeypatch.setattr(prep, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(prep, "_assemble", killed)
    with pytest.raises(Interrupt):
        prepare(sources, tmp_path / "out", workers=workers, **KW)
    work = tmp_path / ".prepare-out"
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == [
        ".lock", "arguments.json", "checksums.sha256", "documents.cache", "documents.offsets", "parts.bin",
        "parts.index", "read.json", "tokenizer.json"]
    chunks = len(prep._Parts(work).spans)
    assert chunks > 10 if chunk_bytes < 2000 else chunks == 1


def test_interrupted_reading_starts_the_read_again(tmp_path: Path, sources: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reference = prepare(sources, tmp_path / "ref", **KW)
    real = prep.iter_documents

    def breaks(*args: object, **kwargs: object):
        yield from list(real(*args, **kwargs))[:5]
        raise Interrupt

    monkeypatch.setattr(prep, "iter_documents", breaks)
    with pytest.raises(Interrupt):
        prepare(sources, tmp_path / "out", **KW)
    assert (tmp_path / ".prepare-out" / "documents.cache").is_file()
    monkeypatch.setattr(prep, "iter_documents", real)
    assert same_folders(prepare(sources, tmp_path / "out", **KW), reference)


def test_bad_workers_is_refused_before_any_writing(tmp_path: Path, sources: list[str]) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SuperposeError, match="^workers must be at least 1, got 0$"):
        prepare(sources, tmp_path / "o", workers=0, **KW)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_sigkilled_cli_run_with_two_workers_resumes_to_the_same_output(tmp_path: Path) -> None:
    """A real kill (SIGKILL of the whole process group) in the middle of encoding, then the same command again."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(make_docs(3000, seed=4)):
        (folder / f"{i:04d}.txt").write_text(doc * 3, encoding="utf-8")
    script = ("import sys, superpose.data.prepare as p\n"
              "from superpose.cli import main\n"
              "if __name__ == '__main__':\n"
              "    p.CHUNK_BYTES = 20_000\n"
              "    sys.exit(main(sys.argv[1:]))\n")
    (tmp_path / "run.py").write_text(script, encoding="utf-8")
    argv = [sys.executable, str(tmp_path / "run.py"), "prepare", str(folder), "--vocab-size", "300", "--quiet",
            "--workers", "2", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(argv + [str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    job = subprocess.Popen(argv + [str(tmp_path / "out")], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = tmp_path / ".prepare-out" / "parts.index"
    deadline = time.monotonic() + 60
    while job.poll() is None and time.monotonic() < deadline and (not index.is_file() or
                                                                  index.read_bytes().count(b"\n") < 3):
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "out").exists(), "the run finished before it could be killed: make the corpus larger"
    done = len(prep._Parts(tmp_path / ".prepare-out").spans)
    subprocess.run(argv + [str(tmp_path / "out")], check=True, env=env, capture_output=True)
    assert done >= 3 and same_folders(tmp_path / "out", tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out", "ref", "run.py"]
